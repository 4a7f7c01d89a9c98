"""Human steps: a run waits for a person, parked in storage, and any orchestrator resumes it.

The orchestrator runs in this process or as a child process (the SIGKILL tests); answers
are given with the real `chorus runs respond` command.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from chorus.agent import Agent, Context
from chorus.agent.host import AgentHost
from chorus.client.runs import RunClient
from chorus.config import Settings
from chorus.coordinator.service import Coordinator
from chorus.errors import InvalidAnswer, NotWaiting
from chorus.messages import RunProgress, RunRequest, Task, decode
from chorus.nats.connection import connect
from chorus.nats.server import NatsServer
from chorus.specs.workflow import decode_workflow
from tests.cli import achorus
from tests.helpers import Reap, StartHost, StartOrchestrator, child_env, stop_child
from tests.test_gateway import running_gateway

REVIEW = """\
type: pipeline
name: review
steps:
  - name: draft
    agent: writer
  - name: approve
    type: human
    prompt: "Publish this? {{ steps.draft.output }}"
    schema:
      type: object
      required: [approved]
      properties:
        approved: {type: boolean}
        note: {type: string}
{timeout}
  - name: publish
    agent: writer
    input: "approved={{ steps.approve.data.approved }}"
"""


def review(timeout: str = "") -> Any:
    return decode_workflow(REVIEW.replace("{timeout}", timeout))


def writer() -> Agent:
    agent = Agent(name="writer")

    @agent.on_task
    async def write(task: Task, ctx: Context) -> str:
        return f"wrote[{task.input}]"

    return agent


async def progress_of(
    nc: Client, settings: Settings, run_id: str, kind: str
) -> asyncio.Future[RunProgress]:
    """A future set by the run's first progress message of `kind`."""
    seen: asyncio.Future[RunProgress] = asyncio.get_running_loop().create_future()

    async def on_progress(msg: Msg) -> None:
        progress = decode(msg.data, RunProgress)
        if progress.kind == kind and not seen.done():
            seen.set_result(progress)

    await nc.subscribe(settings.subjects.run_all(run_id), cb=on_progress)
    return seen


async def submit_and_wait_parked(
    nc: Client, settings: Settings, workflow: Any, input: str = "a post"
) -> str:
    runs = RunClient(nc, settings.subjects)
    request = RunRequest(workflow=workflow, input=input)
    parked = await progress_of(nc, settings, request.run_id, "run_waiting")
    await runs.submit(request)
    await asyncio.wait_for(parked, 20)
    return request.run_id


@pytest.fixture
async def system(
    coordinator: Coordinator, start_orchestrator: StartOrchestrator, start_host: StartHost
) -> None:
    await start_host(writer())
    await start_orchestrator()


@pytest.mark.usefixtures("system")
async def test_a_bad_answer_is_refused_and_a_good_one_completes_the_run(
    settings: Settings, nc: Client
) -> None:
    runs = RunClient(nc, settings.subjects)
    run_id = await submit_and_wait_parked(nc, settings, review())

    waiting = await runs.get(run_id)
    listed = await achorus(settings, "runs")
    refused = await achorus(settings, "runs", "respond", run_id, '{"approved": "yes"}')
    still = await runs.get(run_id)
    taken = await achorus(settings, "runs", "respond", run_id, "-", stdin='{"approved": true}')
    record = await runs.wait(run_id, timeout=20)

    assert waiting.status == "waiting"
    assert [s.status for s in waiting.steps] == ["completed", "waiting"]
    assert waiting.steps[1].input == "Publish this? wrote[a post]"
    assert "waiting" in listed.stdout
    assert refused.returncode == 2
    assert "at $.approved: 'yes' is not of type 'boolean'" in refused.stderr
    assert "still waiting" in refused.stderr
    assert still.status == "waiting"
    assert taken.returncode == 0, taken.stderr
    assert record.status == "completed", record.error
    assert record.steps[1].data == {"approved": True}
    assert record.steps[2].output == "wrote[approved=true]"


@pytest.mark.usefixtures("system")
async def test_an_answer_to_a_run_that_waits_for_nothing_is_refused(
    settings: Settings, nc: Client
) -> None:
    runs = RunClient(nc, settings.subjects)
    run_id = await submit_and_wait_parked(nc, settings, review())
    with pytest.raises(InvalidAnswer):
        await runs.respond(run_id, {"note": "no approved field"})
    await runs.respond(run_id, {"approved": False})
    await runs.wait(run_id, timeout=20)

    with pytest.raises(NotWaiting, match="completed, not waiting"):
        await runs.respond(run_id, {"approved": True})


@pytest.mark.usefixtures("system")
@pytest.mark.parametrize(
    ("action", "status", "approved"),
    [("approve", "completed", True), ("reject", "completed", False), ("fail", "failed", None)],
)
async def test_a_timed_out_human_step_takes_its_on_timeout_action(
    settings: Settings, nc: Client, action: str, status: str, approved: bool | None
) -> None:
    runs = RunClient(nc, settings.subjects)
    workflow = review(f"    timeout: 0.5\n    on_timeout: {action}")
    run_id = await submit_and_wait_parked(nc, settings, workflow)

    record = await runs.wait(run_id, timeout=20)

    assert record.status == status, record.error
    if approved is None:
        assert record.steps[1].status == "failed"
        assert "no answer within the step's timeout of 0.5s" in record.error
        assert len(record.steps) == 2  # publish never ran
    else:
        assert record.steps[1].data == {"approved": approved, "timed_out": True}
        assert record.steps[2].output == f"wrote[approved={json.dumps(approved)}]"


@pytest.mark.usefixtures("system")
async def test_cancelling_a_waiting_run_cancels_it_at_once(settings: Settings, nc: Client) -> None:
    runs = RunClient(nc, settings.subjects)
    run_id = await submit_and_wait_parked(nc, settings, review())

    result = await achorus(settings, "runs", "cancel", run_id)
    record = await runs.get(run_id)

    assert result.returncode == 0, result.stdout + result.stderr
    assert record.status == "cancelled"
    assert [s.status for s in record.steps] == ["completed", "cancelled"]
    with pytest.raises(NotWaiting):
        await runs.respond(run_id, {"approved": True})


def spawn_orchestrator(settings: Settings, log: Path, **env: str) -> subprocess.Popen[bytes]:
    variables = {**child_env(settings), "CHORUS_CLAIM_TIMEOUT": "2", **env}
    with log.open("ab") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "chorus", "orchestrator"],
            env=variables,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


async def test_an_answer_resumes_a_run_parked_by_a_killed_orchestrator(
    coordinator: Coordinator,
    start_host: StartHost,
    nc: Client,
    settings: Settings,
    tmp_path: Path,
    reap: Reap,
) -> None:
    await start_host(writer())
    log = tmp_path / "orchestrator.log"
    first = reap(spawn_orchestrator(settings, log))
    run_id = await submit_and_wait_parked(nc, settings, review())

    first.kill()
    first.wait(10)
    second = reap(spawn_orchestrator(settings, log))
    answered = await achorus(settings, "runs", "respond", run_id, '{"approved": true}')
    record = await RunClient(nc, settings.subjects).wait(run_id, timeout=30)
    assert stop_child(second) == 0, log.read_text()

    assert answered.returncode == 0, answered.stderr
    assert record.status == "completed", record.error
    assert [s.attempts for s in record.steps] == [1, 1, 1]  # the draft was not written again
    assert record.steps[2].output == "wrote[approved=true]"


async def test_a_timeout_is_applied_by_another_orchestrator_when_the_parking_one_died(
    coordinator: Coordinator,
    start_host: StartHost,
    nc: Client,
    settings: Settings,
    tmp_path: Path,
    reap: Reap,
) -> None:
    await start_host(writer())
    log = tmp_path / "orchestrator.log"
    first = reap(spawn_orchestrator(settings, log))
    workflow = review("    timeout: 3\n    on_timeout: reject")
    run_id = await submit_and_wait_parked(nc, settings, workflow)

    first.kill()
    first.wait(10)
    # It learns of the wait from storage (its first read, at start), not from the dead one.
    second = reap(spawn_orchestrator(settings, log, CHORUS_WAIT_SWEEP="30"))
    record = await RunClient(nc, settings.subjects).wait(run_id, timeout=30)
    assert stop_child(second) == 0, log.read_text()

    assert record.status == "completed", record.error
    assert record.steps[1].data == {"approved": False, "timed_out": True}


async def test_a_waiting_run_survives_a_nats_server_restart(
    own_nats_server: NatsServer, tmp_path: Path, reap: Reap
) -> None:
    settings = Settings(
        nats_url=own_nats_server.url, prefix="restart", heartbeat_interval=0.2, connect_wait=10
    )
    log = tmp_path / "system.log"
    env = {**child_env(settings), "CHORUS_CLAIM_TIMEOUT": "2"}
    with log.open("ab") as sink:
        for role in ("coordinator", "orchestrator"):
            reap(
                subprocess.Popen(
                    [sys.executable, "-m", "chorus", role],
                    env=env,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                )
            )
    reconnected = asyncio.Event()
    nc = await connect(settings, "test", service=True, reconnected=reconnected)
    host = AgentHost(writer(), settings)
    try:
        await host.start()
        run_id = await submit_and_wait_parked(nc, settings, review())

        own_nats_server.stop()
        own_nats_server.start()
        await asyncio.wait_for(reconnected.wait(), 30)
        runs = RunClient(nc, settings.subjects)
        assert (await runs.get(run_id)).status == "waiting"
        answered = await achorus(settings, "runs", "respond", run_id, '{"approved": true}')
        record = await runs.wait(run_id, timeout=40)
    finally:
        await host.stop(timeout=5)
        await nc.close()

    assert answered.returncode == 0, answered.stderr + log.read_text()
    assert record.status == "completed", record.error + log.read_text()


@pytest.mark.usefixtures("system")
async def test_the_gateway_takes_answers_and_steer_messages(settings: Settings, nc: Client) -> None:
    runs = RunClient(nc, settings.subjects)
    run_id = await submit_and_wait_parked(nc, settings, review())
    async with running_gateway(nc, settings) as http:
        steered = await http.post(f"/api/runs/{run_id}/steer", json={"message": "Be brief."})
        refused = await http.post(f"/api/runs/{run_id}/input", json={"approved": 1})
        taken = await http.post(f"/api/runs/{run_id}/input", json={"approved": True})
        record = await runs.wait(run_id, timeout=20)
        again = await http.post(f"/api/runs/{run_id}/input", json={"approved": True})

    assert steered.status_code == 202, steered.text
    control = await runs.controls.get(run_id)
    assert control is not None and [m.text for m in control.steer] == ["Be brief."]
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "invalid_answer"
    assert "at $.approved: 1 is not of type 'boolean'" in refused.json()["error"]["reason"]
    assert taken.status_code == 202, taken.text
    assert record.status == "completed"
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "not_waiting"
