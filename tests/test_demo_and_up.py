"""The README's main job (`chorus demo`) and `chorus up`, through the real entry point."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from chorus.config import Settings
from chorus.errors import NatsAuthRefused
from chorus.local import wait_for_instances
from chorus.nats.connection import connect


def demo_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "OPENAI_"))}


def test_demo_runs_a_task_and_every_pattern_offline(tmp_path: Path) -> None:
    env = demo_env()

    result = subprocess.run(
        [sys.executable, "-m", "chorus", "demo", "--approve", "--data-dir", str(tmp_path / "demo")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "answered by researcher" in result.stdout
    assert "tool call turn 1: define" in result.stdout  # the glossary agent's Python tool
    # The announcer's tool waited for an approval, which the demo gave itself (--approve).
    [approval_id] = re.findall(r"approval pending (\w+): announcer calls announce", result.stdout)
    assert f"as `chorus approve {approval_id}` would" in result.stdout
    assert "(approved) → posted to the notice board" in result.stdout
    for pattern in ("pipeline", "parallel", "event-driven", "hierarchical", "business process"):
        line = next(line for line in result.stdout.splitlines() if f" {pattern} " in line)
        assert "completed" in line, line
        # Counted as `chorus runs` counts them: a completed run has every step done or skipped.
        [(done, total)] = re.findall(r"│ (\d+)/(\d+) +│", line)
        assert done == total != "0", line
    assert not re.search(r"(?<![\d.])0\.0 ms", result.stdout)  # "10.0 ms" is a latency
    assert re.search(r"answered by researcher .*: [\d.]+ (ms|µs) round trip", result.stdout)
    assert (tmp_path / "demo" / "logs" / "coordinator.log").exists()


LINE_WAIT_S = 120.0  # the demo starts a whole system first, on a loaded machine


async def line_matching(
    stream: asyncio.StreamReader, pattern: str, seen: list[str]
) -> re.Match[str]:
    """The first line of the demo's output matching `pattern` (everything read kept in
    `seen` for the failure message)."""
    async with asyncio.timeout(LINE_WAIT_S):
        while line := (await stream.readline()).decode():
            seen.append(line)
            if found := re.search(pattern, line):
                return found
    raise AssertionError(f"no line matching {pattern!r} in:\n{''.join(seen)}")


async def test_demo_waits_for_an_approval_given_with_chorus_approve_in_another_terminal(
    tmp_path: Path,
) -> None:
    demo = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "chorus", "demo", "--no-approve", "--task", "ship it"),
        *("--data-dir", str(tmp_path / "demo")),
        env=demo_env(),
        stdin=subprocess.DEVNULL,  # not a terminal: only --no-approve makes it wait
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert demo.stdout is not None
    seen: list[str] = []
    try:
        pending = await line_matching(demo.stdout, r"approval pending (\w+): announcer", seen)
        approval_id = pending.group(1)
        setup = (await line_matching(demo.stdout, r"^  (set -a; .*)$", seen)).group(1)
        printed = await line_matching(demo.stdout, rf"^  (chorus approve {approval_id})$", seen)

        # What the demo told the user to type in another terminal, as they would type it.
        terminal = {**demo_env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        approve = await asyncio.to_thread(
            subprocess.run,
            ["bash", "-c", f"{setup}; {printed.group(1)}"],
            env=terminal,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert approve.returncode == 0, approve.stdout + approve.stderr
        assert f"{approval_id} approved: announce of announcer resumes" in approve.stdout

        await line_matching(demo.stdout, r"approved by cli:", seen)
        await line_matching(
            demo.stdout, r"announce\(.*\) \(approved\) → posted to the notice board: ship it", seen
        )
        rest = (await asyncio.wait_for(demo.stdout.read(), LINE_WAIT_S)).decode()
        code = await asyncio.wait_for(demo.wait(), LINE_WAIT_S)
    finally:
        if demo.returncode is None:
            demo.kill()
            await demo.wait()
    shown = "".join(seen) + rest
    assert code == 0, shown
    # The model heard the tool's output once the task resumed (the line wraps when piped).
    assert "(tool announce: posted to the notice board: ship it)" in " ".join(shown.split())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_up_starts_every_part_and_ctrl_c_stops_them_keeping_data(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chorus",
            "up",
            "--data-dir",
            str(data),
            "--port",
            str(port),
            "--no-gateway",
            "--agent",
            "researcher=2",
            "--agent",
            "writer",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        anonymous = Settings(nats_url=f"nats://127.0.0.1:{port}", connect_wait=30)
        settings = await asyncio.to_thread(operator_settings, data, anonymous)
        nc = await connect(settings, "test")
        try:
            seen = await wait_for_instances(
                nc, settings.subjects, {"researcher": 2, "writer": 1}, timeout=60
            )
        finally:
            await nc.close()
        assert len(seen["researcher"]) == 2 and len(seen["writer"]) == 1
        with pytest.raises(NatsAuthRefused):
            await connect(anonymous, "test-without-credentials")
    finally:
        up.send_signal(signal.SIGINT)
        code = await asyncio.to_thread(up.wait, 60)

    errors = up.stderr.read() if up.stderr else ""
    if up.stderr:
        up.stderr.close()
    assert code == 0, errors
    assert (data / "jetstream" / "jetstream").is_dir()  # kept for the next `chorus up`
    assert (data / "logs" / "coordinator.log").exists()
    assert mode(data) == mode(data / "logs") == 0o700
    assert mode(data / "logs" / "coordinator.log") == mode(data / "nats-server.log") == 0o600
    assert mode(data / "auth" / "creds" / "operator.nk") == 0o600


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def operator_settings(data: Path, settings: Settings, timeout: float = 30) -> Settings:
    """The operator's credentials from `.chorus/auth/creds/operator.env`, once written."""
    env_file = data / "auth" / "creds" / "operator.env"
    deadline = time.monotonic() + timeout
    while not env_file.is_file():  # written before the server starts, by `chorus up`
        if time.monotonic() > deadline:
            raise AssertionError(f"{env_file} was not written")
        time.sleep(0.1)  # a file to appear: no event to wait on across processes
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    return msgspec.structs.replace(
        settings, nats_nkey_seed=env["NATS_NKEY_SEED"], nats_inbox_prefix=env["NATS_INBOX_PREFIX"]
    )


def test_demo_latencies_are_readable_at_any_size() -> None:
    from chorus.demo import milliseconds

    shown = [milliseconds(v) for v in (1520.4, 3.42, 0.042, 0.0004, 0.0)]

    assert shown == ["1520 ms", "3.4 ms", "42 µs", "1 µs", "under 1 µs"]
