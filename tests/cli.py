"""Running the `chorus` command line as a real subprocess in tests."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from chorus.config import Settings
from tests.helpers import child_env


def chorus(
    settings: Settings, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chorus", *args],
        env=child_env(settings),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def achorus(
    settings: Settings, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(chorus, settings, *args, stdin=stdin)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The command failed with exit 2 and exactly one readable line, no traceback."""
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("chorus: error: ")
    return lines[0]
