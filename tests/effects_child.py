"""A process that makes one side-effect tool call through the effect ledger, for
tests/test_effect_ledger.py: `python -m tests.effects_child SCOPE COUNT_FILE`.

The tool (`SendMail`) appends its arguments to COUNT_FILE (one line per execution),
announces `<prefix>.test.started`, then blocks until `<prefix>.test.release` arrives: the
test decides whether the call finishes or the process is killed in the middle of it.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from nats.aio.client import Client

from chorus.config import Settings
from chorus.messages import encode
from chorus.nats.connection import connect
from chorus.subjects import Subjects
from chorus.tools.base import ToolCallContext, ToolDefinition
from chorus.tools.ledger import EffectLedger

ARGUMENTS = {"to": "ada@example.com", "body": "The launch is on."}


class SendMail:
    """A side effect whose every execution is counted in a file."""

    definition = ToolDefinition(name="send_mail", side_effect=True, timeout_s=60)

    def __init__(self, nc: Client, subjects: Subjects, count: Path) -> None:
        self.nc = nc
        self.prefix = subjects.prefix
        self.count = count

    async def call(self, arguments: dict[str, Any], ctx: ToolCallContext) -> Any:
        with self.count.open("a") as sink:
            sink.write(json.dumps(arguments) + "\n")
        release = await self.nc.subscribe(f"{self.prefix}.test.release", max_msgs=1)
        await self.nc.publish(f"{self.prefix}.test.started", ctx.instance.encode())
        await self.nc.flush()
        msg = await release.next_msg(timeout=60)
        return {"sent_to": arguments["to"], "message_id": msg.data.decode()}


def executions(count: Path) -> int:
    return len(count.read_text().splitlines()) if count.exists() else 0


async def main(scope: str, count: Path) -> None:
    settings = Settings.from_env()
    nc = await connect(settings, "effects-child")
    try:
        tool = EffectLedger(nc, settings.subjects).wrap(SendMail(nc, settings.subjects, count))
        ctx = ToolCallContext(agent="mailer", instance="mailer-child", effect_scope=scope)
        output = await tool.call(ARGUMENTS, ctx)
        sys.stdout.write(encode(output).decode() + "\n")
    finally:
        await nc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2])))
