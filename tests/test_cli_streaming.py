"""The live output of tasks in the command line: `chorus req --stream`, `chorus run`, `chorus
tail`, each a real child process against agents in this one."""

from __future__ import annotations

import asyncio
import io
import json
import sys
from pathlib import Path

from chorus.agent import Agent
from chorus.cli.live import Condenser, StepLines, TextPrinter
from chorus.client import ChorusClient
from chorus.config import Settings
from chorus.llm.offline import OfflineModel
from chorus.messages import ChunkKind, Result, StreamChunk, Task, decode
from tests.cli import achorus, one_line_error
from tests.helpers import StartHost, StartOrchestrator, child_env

QUESTION = "why do agents need a message bus that keeps what it carried?"


def worker() -> Agent:
    return Agent(name="worker", instructions="Work.", capabilities=["work"])


async def test_req_stream_prints_the_text_as_it_comes_then_the_reply(
    start_host: StartHost, settings: Settings
) -> None:
    await start_host(worker(), model=OfflineModel(chunk_delay=0.005))
    subject = settings.subjects.capability_task("work")

    result = await achorus(settings, "req", "--stream", subject, json.dumps({"input": QUESTION}))

    assert result.returncode == 0, result.stderr
    reply = decode(result.stdout.encode(), Result)
    assert result.stderr.splitlines() == [reply.output]  # the text, then a line end
    assert reply.output == f"[offline] Work.: {QUESTION}"


def test_req_stream_on_a_subject_that_is_no_task_is_one_line(settings: Settings) -> None:
    from tests.cli import chorus

    error = one_line_error(chorus(settings, "req", "--stream", "some.subject", "{}"))

    assert "--stream follows a task" in error


async def test_run_prints_each_steps_text_as_plain_lines(
    start_host: StartHost, start_orchestrator: StartOrchestrator, settings: Settings, tmp_path: Path
) -> None:
    await start_host(worker(), model=OfflineModel(chunk_delay=0.002))
    await start_orchestrator(durable_tasks=False)
    flow = tmp_path / "flow.yaml"
    flow.write_text("type: pipeline\nname: chain\nsteps:\n  - name: draft\n    agent: worker\n")

    result = await achorus(settings, "run", str(flow), QUESTION)

    assert result.returncode == 0, result.stderr
    said = [line.split(None, 2)[2] for line in result.stdout.splitlines() if " text " in line]
    assert said == [f"draft: [offline] Work.: {QUESTION}"]


async def test_tail_shows_a_tasks_deltas_gathered_then_its_final(
    start_host: StartHost, settings: Settings, client: ChorusClient
) -> None:
    host = await start_host(worker())
    tail = await asyncio.create_subprocess_exec(
        *(
            sys.executable,
            "-m",
            "chorus",
            "tail",
            settings.subjects.all_task_streams,
            "--count",
            "1",
        ),
        env=child_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert tail.stderr and tail.stdout
        assert b"following" in await asyncio.wait_for(tail.stderr.readline(), 20)
        task = Task(input="short", run_id="r1")
        result = await client.run_task(task, instance=host.instance)
        out, _ = await asyncio.wait_for(tail.communicate(), 20)
    finally:
        if tail.returncode is None:
            tail.kill()
            await tail.wait()

    gathered, final = out.decode().splitlines()
    assert f"{task.task_id}#1.1" in gathered and "delta" in gathered
    assert repr(result.output) in gathered  # every delta in one line
    assert "final" in final and "run=r1" in final and "agent=worker" in final


def chunk(kind: ChunkKind, seq: int, text: str = "", *, attempt: int = 1) -> StreamChunk:
    return StreamChunk(
        run_id="r", task_id="draft", attempt=attempt, seq=seq, kind=kind, text=text, tool=""
    )


def test_step_lines_are_whole_lines_and_a_superseded_attempt_says_so() -> None:
    lines: list[tuple[str, str]] = []
    view = StepLines(lambda step, text: lines.append((step, text)))

    for c in (
        chunk("delta", 1, "first li"),
        chunk("delta", 2, "ne\nsecond"),
        chunk("superseded", 0, "attempt 2 replaces it"),
        chunk("delta", 1, "again", attempt=2),
        chunk("final", 2, "again", attempt=2),
    ):
        view.show(c)

    assert lines == [
        ("draft", "first line"),
        ("draft", "second"),  # what attempt 1 said, then that it does not count
        ("draft", "[attempt 1 superseded]"),
        ("draft", "again"),
    ]


def test_text_printer_ends_the_text_with_a_line() -> None:
    out = io.StringIO()
    printer = TextPrinter(out)

    for c in (chunk("delta", 1, "one "), chunk("delta", 2, "two"), chunk("final", 3, "one two")):
        printer.show(c)

    assert out.getvalue() == "one two\n"


def test_condenser_prints_a_line_once_enough_text_gathered() -> None:
    condenser = Condenser()
    words = [chunk("delta", n, "word " * 5) for n in range(1, 6)]

    printed = [condenser.lines("s", c) for c in words]

    assert printed[:3] == [[], [], []]
    assert printed[3] == [f"draft#1.1-4 delta {('word ' * 20).strip()!r}"]
    assert condenser.lines("s", chunk("final", 6, "done")) == [
        "draft#1.5 delta 'word word word word word'",
        "draft#1.6 final 'done'",
    ]


def test_the_live_view_shows_what_a_running_step_is_writing() -> None:
    from rich.console import Console

    from chorus.cli.run_progress import LiveProgress
    from chorus.messages import RunProgress
    from chorus.specs.workflow import Pipeline, Step

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    workflow = Pipeline(name="chain", steps=[Step(name="draft", agent="worker")])
    display = LiveProgress(console, workflow, "r")
    display.show(RunProgress(run_id="r", kind="step_started", step="draft", detail="worker"))

    display.text(chunk("delta", 1, "NATS keeps "))
    display.text(chunk("delta", 2, "what it carried"))
    display.close(None)

    assert "NATS keeps what it carried" in out.getvalue()
