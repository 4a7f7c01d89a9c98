"""The agent service: one instance of an agent, until SIGTERM or SIGINT drains it."""

from __future__ import annotations

import asyncio
import signal

from chorus.agent.host import AgentHost
from chorus.agent.loader import load_agent
from chorus.config import Settings


async def serve(spec: str, settings: Settings, *, instance: str | None = None) -> int:
    agent = load_agent(spec)
    host = AgentHost(agent, settings, instance=instance)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await host.start()
    await stop.wait()
    await host.stop()
    return 0
