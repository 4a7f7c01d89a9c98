"""Human steps: the run waits for a person, parked in storage, not in a process.

When a run reaches a step of `type: human` without an answer, the step is saved `waiting`,
the run's head `waiting`, and a `HumanWait` (`<run>.wait`: prompt, schema, deadline) is
stored; the engine then stops advancing the run (`RunParked`) and the orchestrator lets go
of it. An answer is stored once (`<run>.answer.<step>`, create: a person's answer and the
timeout race, the first wins) and a `RunResume` on the runs queue makes any orchestrator take
the run up again: this module then finds the answer and the step completes with it.
"""

from __future__ import annotations

import json
import logging

from chorus.errors import ConfigError, InvalidAnswer
from chorus.messages import HumanAnswer, HumanWait, StepRecord, now
from chorus.specs.answers import check_answer
from chorus.specs.templates import Template
from chorus.specs.workflow import ProcessStep, Step
from chorus.workflows.protocols import WaitStore
from chorus.workflows.run import Run, StepFailed

log = logging.getLogger("chorus.workflows.human")


class RunParked(Exception):
    """The run waits for an answer to `step`; it is saved `waiting`, nothing holds it."""

    def __init__(self, step: str) -> None:
        super().__init__(f"waiting for an answer to step {step}")
        self.step = step


def timeout_answer(approved: bool) -> dict[str, bool]:
    """What a timed-out step answers with `on_timeout: approve` or `reject`."""
    return {"approved": approved, "timed_out": True}


def _store(run: Run) -> WaitStore:
    store = run.services.store
    if not isinstance(store, WaitStore):
        raise ConfigError(
            f"run {run.run_id} has a human step, and its run store ({type(store).__name__}) "
            "cannot park runs: run it on NATS (an orchestrator, or Engine.on_nats)"
        )
    return store


async def ask(run: Run, spec: Step | ProcessStep) -> StepRecord:
    """The step with its answer, completed; RunParked when there is no answer yet;
    StepFailed when it timed out with `on_timeout: fail` (or its stored answer is invalid)."""
    store = _store(run)
    name, record = spec.key, run.record
    step = run.step(name)
    answer = await store.answer(run.run_id, name)
    if answer is None:
        if step.status != "waiting":
            step.input = await Template(spec.prompt).render_async(run.context())
            step.status, step.error, step.code = "waiting", "", ""
            step.started_at = step.started_at or now()
        # From when the step started waiting: a resumed or re-parked run keeps its deadline.
        deadline = step.started_at + spec.timeout if spec.timeout else 0.0
        await store.park(
            HumanWait(
                run_id=run.run_id,
                step=name,
                prompt=step.input,
                schema=spec.schema,
                deadline=deadline,
                on_timeout=spec.on_timeout or "fail",
            )
        )
        record.status = "waiting"
        await run.checkpoint(step)
        # An answer stored while we parked resumed nothing (the run was not waiting yet).
        answer = await store.answer(run.run_id, name)
        if answer is None:
            await run.report("step_waiting", name, step.input)
            log.info("run waiting", extra={"run_id": run.run_id, "step": name})
            raise RunParked(name)
    record.status = "running"
    await store.unpark(run.run_id)
    return await _answered(run, spec, step, answer)


async def _answered(
    run: Run, spec: Step | ProcessStep, step: StepRecord, answer: HumanAnswer
) -> StepRecord:
    name = step.name
    step.started_at = step.started_at or now()
    step.attempts = 1
    if answer.source == "timeout":
        action = spec.on_timeout or "fail"
        if action == "fail":
            await _fail(run, step, f"no answer within the step's timeout of {spec.timeout:g}s")
        value: object = timeout_answer(action == "approve")
    else:
        try:
            check_answer(spec.schema, answer.value, step=name)
        except InvalidAnswer as exc:  # stored by something that did not check it
            await _fail(run, step, exc.reason)
        value = answer.value
    step.data = value
    step.output = value if isinstance(value, str) else json.dumps(value)
    step.agent, step.instance = "", answer.by
    run.end_step(step, "completed")
    await run.checkpoint(step)
    detail = "timed out: " + step.output if answer.source == "timeout" else "answered"
    await run.report("step_finished", name, detail)
    return step


async def _fail(run: Run, step: StepRecord, reason: str) -> None:
    step.error, step.code = reason, "timeout"
    run.end_step(step, "failed")
    await run.checkpoint(step)
    await run.report("step_failed", step.name, reason)
    raise StepFailed(step)
