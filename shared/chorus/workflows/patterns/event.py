"""Event-driven: publish a starting event, follow the run's chain of events until `until`.

Agents that subscribe to the start topic react, and the events they emit carry the run id
(the host gives a handler the run id of the event it handles), so the chain stays traceable.
The run keeps every event of its chain in its record. The start event's id is derived from
the run id, so a resumed run that publishes it again is de-duplicated by JetStream.
"""

from __future__ import annotations

from chorus.errors import ConfigError, RunFailed
from chorus.messages import Event, Usage, now
from chorus.specs.expressions import as_text
from chorus.specs.templates import Template
from chorus.specs.workflow import EventDriven
from chorus.workflows.events import topic_matches
from chorus.workflows.run import Run

# Replay the stream from a little before the run started: clocks of the orchestrator and the
# server differ, and only events carrying this run's id are kept anyway.
CLOCK_MARGIN_S = 10.0


async def execute(run: Run, spec: EventDriven) -> None:
    bus = run.services.events
    if bus is None:
        raise ConfigError("an event-driven workflow needs an event bus; give the engine one")
    record = run.record
    start, wait = run.step("start"), run.step("until")
    seen = {e.event_id for e in record.events}
    async with bus.watch(record.run_id, since=record.started_at - CLOCK_MARGIN_S) as events:
        if run.done("start") is None:
            start.started_at = now()
            event = Event(
                topic=spec.start,
                data=await _start_data(run, spec),
                event_id=f"{record.run_id}-start",
                source=f"workflow:{spec.name}",
                run_id=record.run_id,
            )
            await bus.publish(event)
            start.output = spec.start
            run.end_step(start, "completed")
            wait.status, wait.started_at, wait.input = "running", now(), spec.until
            await run.checkpoint(start, wait)
            await run.report("step_finished", "start", f"published {spec.start}")
        deadline = start.started_at + spec.timeout
        while True:
            left = deadline - now()
            try:
                if left <= 0:
                    raise TimeoutError
                event = await events.next(timeout=left)
            except TimeoutError:
                chain = ", ".join(e.topic for e in record.events) or "none"
                wait.error = f"no {spec.until} event within {spec.timeout}s"
                run.end_step(wait, "failed")
                raise RunFailed(
                    f"no event on {spec.until} for this run within {spec.timeout}s "
                    f"(events seen: {chain})"
                ) from None
            if event.event_id in seen:
                continue
            seen.add(event.event_id)
            await run.add_event(event)
            await run.report("event_seen", event.topic, event.source)
            if topic_matches(spec.until, event.topic):
                break
    wait.output, wait.data, wait.agent = as_text(event.data), event.data, event.source
    wait.usage = sum((e.usage for e in record.events), Usage())  # the agents' reactions
    run.end_step(wait, "completed")
    record.output, record.output_data = wait.output, event.data
    await run.checkpoint(wait)
    await run.report("step_finished", "until", f"{event.topic} from {event.source}")


async def _start_data(run: Run, spec: EventDriven) -> object:
    if spec.data:
        return await Template(spec.data).render_async(run.context())
    return run.record.data if run.record.data is not None else run.record.input
