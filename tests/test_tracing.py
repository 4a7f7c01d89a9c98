"""Tracing across real processes: a run submitted with `chorus run` goes through an
orchestrator, a coordinator and two agents (one asks the other as a peer tool), each process
writing its spans to a file of its own (CHORUS_TRACE_FILE); the spans form one trace whose
parent links follow the run from the submitter to the model calls. Also: the JSON log lines
of a process carry the trace and span ids, with ISO 8601 UTC timestamps."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

from chorus.config import Settings
from chorus.logs import JsonFormatter
from chorus.telemetry.setup import configure_tracing, wanted_exporters
from tests.fake_openai import FakeCall, FakeOpenAI
from tests.helpers import SpawnAgent, child_env, stop_child, write_spec

LEAD = """
name: lead
model: openai:gpt-lead
instructions: Answer with the researcher's help.
tools:
  - agent: researcher
"""
RESEARCHER = """
name: researcher
model: openai:gpt-research
instructions: Find facts.
"""
ASK_LEAD = """
type: pipeline
name: traced
steps:
  - agent: lead
"""
ASK_RESEARCHER_TWICE = """
type: pipeline
name: retried
steps:
  - agent: researcher
    retries: 1
"""


def lead_asks_the_researcher(path: str, body: dict[str, Any]) -> str | list[FakeCall]:
    """The lead's first model call asks for the peer tool; every other call answers."""
    offered = {tool.get("name") for tool in body.get("tools") or []}
    conversation = body.get("input")
    if "agent_researcher" in offered and not isinstance(conversation, list):
        return [FakeCall("call_1", "agent_researcher", json.dumps({"input": "tides"}))]
    return f"answer to: {str(conversation)[:40]}"


@dataclass
class Span:
    name: str
    span_id: str
    trace_id: str
    parent_id: str | None
    kind: str
    service: str
    attributes: dict[str, Any]
    links: list[str]
    status: str


def read_spans(files: list[Path]) -> list[Span]:
    spans = []
    for path in files:
        for line in path.read_text().splitlines():
            raw = json.loads(line)
            spans.append(
                Span(
                    name=raw["name"],
                    span_id=raw["context"]["span_id"],
                    trace_id=raw["context"]["trace_id"],
                    parent_id=raw["parent_id"],
                    kind=raw["kind"].removeprefix("SpanKind."),
                    service=raw["resource"]["attributes"]["service.name"],
                    attributes=raw["attributes"],
                    links=[link["context"]["span_id"] for link in raw["links"]],
                    status=raw["status"]["status_code"],
                )
            )
    return spans


@dataclass
class TracedSystem:
    """A coordinator and an orchestrator as processes, agents spawned alongside; every
    process writes its spans to its own file in `folder`."""

    settings: Settings
    folder: Path
    spawn_agent: SpawnAgent
    monkeypatch: pytest.MonkeyPatch
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def trace_file(self, name: str) -> Path:
        return self.folder / f"{name}.spans.jsonl"

    def env(self, name: str) -> dict[str, str]:
        env = child_env(self.settings)
        env.update(
            {
                "CHORUS_TRACE_FILE": str(self.trace_file(name)),
                "CHORUS_LOG_LEVEL": "INFO",
                "CHORUS_CLAIM_TIMEOUT": "5",
                "CHORUS_RETRY_BACKOFF": "0.05",
            }
        )
        return env

    def start(self, name: str, *args: str, **env: str) -> None:
        with (self.folder / f"{name}.log").open("wb") as log:
            self.processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "chorus", *args],
                    env={**self.env(name), **env},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )

    async def agent(self, name: str, spec: str) -> None:
        self.monkeypatch.setenv("CHORUS_TRACE_FILE", str(self.trace_file(name)))
        child = await self.spawn_agent(write_spec(self.folder, name, spec))
        self.processes.append(child.process)

    async def run(self, workflow: str, question: str) -> dict[str, Any]:
        """`chorus run FILE QUESTION --json` as a process of its own: the run record."""
        path = self.folder / "workflow.yaml"
        path.write_text(workflow)
        cli = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "chorus", "run", str(path), question, "--json"),
            env=self.env("cli"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(cli.communicate(), 90)
        assert cli.returncode == 0, f"{err.decode()}\n{self.logs()}"
        record: dict[str, Any] = json.loads(out)
        return record

    async def stop(self) -> None:
        """SIGTERM every process (each flushes its spans as it exits)."""
        codes = await asyncio.gather(*(asyncio.to_thread(stop_child, p) for p in self.processes))
        assert codes == [0] * len(codes), self.logs()

    def spans(self) -> list[Span]:
        return read_spans(sorted(self.folder.glob("*.spans.jsonl")))

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-3000:]}" for p in self.folder.glob("*.log")
        )


@pytest.fixture
async def system(
    settings: Settings,
    spawn_agent: SpawnAgent,
    fake_openai: FakeOpenAI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[TracedSystem]:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.base_url)
    traced = TracedSystem(settings, tmp_path, spawn_agent, monkeypatch)
    traced.start("coordinator", "coordinator", CHORUS_MAX_ATTEMPTS="1")
    traced.start("orchestrator", "orchestrator")
    yield traced
    for process in traced.processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def chain(spans: list[Span], leaf: Span) -> list[Span]:
    """`leaf` and its ancestors, up to the root."""
    by_id = {s.span_id: s for s in spans}
    path = [leaf]
    while path[-1].parent_id is not None:
        assert path[-1].parent_id in by_id, f"{path[-1].name} has a parent no process exported"
        path.append(by_id[path[-1].parent_id])
    return path


def only(spans: list[Span], match: Callable[[Span], bool]) -> Span:
    found = [s for s in spans if match(s)]
    assert len(found) == 1, [s.name for s in found]
    return found[0]


@pytest.mark.slow
async def test_a_run_through_every_process_is_one_trace_from_submit_to_model_calls(
    system: TracedSystem, fake_openai: FakeOpenAI, settings: Settings
) -> None:
    fake_openai.reply = lead_asks_the_researcher
    await system.agent("researcher", RESEARCHER)
    await system.agent("lead", LEAD)

    record = await system.run(ASK_LEAD, "How do tides work?")
    await system.stop()
    spans = system.spans()

    assert record["status"] == "completed"
    assert {s.trace_id for s in spans} == {spans[0].trace_id}
    researcher_chat = only(spans, lambda s: s.name == "chat gpt-research")
    subjects = settings.subjects
    assert [(s.name, s.service) for s in chain(spans, researcher_chat)] == [
        ("chat gpt-research", "chorus-agent"),
        ("invoke_agent researcher", "chorus-agent"),
        (f"process {subjects.dispatch('agent.researcher')}", "chorus-coordinator"),
        (f"send {subjects.dispatch('agent.researcher')}", "chorus-agent"),
        ("execute_tool agent_researcher", "chorus-agent"),
        ("invoke_agent lead", "chorus-agent"),
        (f"process {subjects.dispatch('agent.lead')}", "chorus-coordinator"),
        (f"send {subjects.dispatch('agent.lead')}", "chorus-orchestrator"),
        ("step lead", "chorus-orchestrator"),
        ("invoke_workflow traced", "chorus-orchestrator"),
        (f"process {subjects.run_submit()}", "chorus-orchestrator"),
        (f"send {subjects.run_submit()}", "chorus-run"),
    ]
    lead = only(spans, lambda s: s.name == "invoke_agent lead")
    lead_calls = [s for s in spans if s.parent_id == lead.span_id]
    assert sorted(s.name for s in lead_calls) == [
        "chat gpt-lead",
        "chat gpt-lead",
        "execute_tool agent_researcher",
    ]
    # semantic conventions: a model call, a message processed, the run's token total
    assert researcher_chat.kind == "CLIENT"
    assert researcher_chat.attributes["gen_ai.operation.name"] == "chat"
    assert researcher_chat.attributes["gen_ai.request.model"] == "gpt-research"
    assert researcher_chat.attributes["gen_ai.usage.input_tokens"] > 0
    dispatch = only(spans, lambda s: s.name == f"process {subjects.dispatch('agent.lead')}")
    assert dispatch.kind == "CONSUMER"
    assert dispatch.attributes["messaging.system"] == "nats"
    assert dispatch.attributes["messaging.operation.type"] == "process"
    assert dispatch.attributes["messaging.destination.name"] == subjects.dispatch("agent.lead")
    run = only(spans, lambda s: s.name == "invoke_workflow traced")
    assert run.attributes["chorus.run.id"] == record["run_id"]
    assert run.attributes["gen_ai.usage.input_tokens"] == record["usage"]["input_tokens"]
    assert run.attributes["gen_ai.usage.output_tokens"] == record["usage"]["output_tokens"]
    # the run head names the trace, so a resumed run joins it
    submit = only(spans, lambda s: s.service == "chorus-run")
    assert record["traceparent"].startswith(f"00-{submit.trace_id[2:]}-{submit.span_id[2:]}-")
    # the orchestrator's log lines inside the run carry its trace id
    logged = [
        json.loads(line)
        for line in (system.folder / "orchestrator.log").read_text().splitlines()
        if line.startswith("{")
    ]
    started = next(line for line in logged if line["msg"] == "run started")
    assert started["trace_id"] == run.trace_id[2:]
    assert started["span_id"] == run.span_id[2:]


@pytest.mark.slow
async def test_a_retried_step_attempt_is_linked_to_the_attempt_it_retries(
    system: TracedSystem, fake_openai: FakeOpenAI
) -> None:
    await system.agent("researcher", RESEARCHER)
    fake_openai.fail_next(400)  # the first attempt's model call; the coordinator gives up

    record = await system.run(ASK_RESEARCHER_TWICE, "What is a neap tide?")
    await system.stop()
    spans = system.spans()

    assert record["status"] == "completed"
    assert record["steps"][0]["attempts"] == 2
    first, second = sorted(
        (s for s in spans if s.name == "step researcher"),
        key=lambda s: s.attributes["chorus.attempt"],
    )
    run = only(spans, lambda s: s.name == "invoke_workflow retried")
    assert first.parent_id == second.parent_id == run.span_id
    assert first.status == "ERROR"
    assert second.links == [first.span_id]
    failed = only(spans, lambda s: s.name == "invoke_agent researcher" and s.status == "ERROR")
    assert failed.attributes["error.type"] == "model_error"
    assert chain(spans, failed)[-1].service == "chorus-run"  # the failed attempt is in the trace


def test_json_log_lines_carry_the_current_trace_and_an_iso_utc_timestamp() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("chorus.test.tracing")
    logger.addHandler(handler)
    logger.propagate = False
    tracer = TracerProvider().get_tracer("test")  # not the global provider: nothing exported
    try:
        logger.warning("outside")
        with tracer.start_as_current_span("work") as span:
            logger.warning("inside")
    finally:
        logger.removeHandler(handler)
    outside, inside = (json.loads(line) for line in stream.getvalue().splitlines())

    context = span.get_span_context()
    assert "trace_id" not in outside
    assert inside["trace_id"] == f"{context.trace_id:032x}"
    assert inside["span_id"] == f"{context.span_id:016x}"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", inside["ts"])


@pytest.mark.parametrize(
    ("env", "trace_file", "exporters"),
    [
        ({}, "", []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "", ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, "", ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "console,otlp"}, "", ["console", "otlp"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, "", []),
        ({}, "spans.jsonl", ["file"]),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, "spans.jsonl", []),
    ],
)
def test_tracing_is_switched_on_only_by_the_standard_variables_or_a_trace_file(
    env: dict[str, str], trace_file: str, exporters: list[str]
) -> None:
    assert wanted_exporters(env, trace_file) == exporters
    if not exporters:
        assert configure_tracing("chorus-test", trace_file=trace_file, env=env) is None
