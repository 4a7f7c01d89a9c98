"""The orchestrator service: takes runs from the queue and drives them until SIGTERM."""

from __future__ import annotations

import asyncio
import signal

from chorus.config import Settings
from chorus.connection import connect
from chorus.orchestrator.service import Orchestrator


async def serve(settings: Settings, *, durable_tasks: bool = True) -> int:
    nc = await connect(settings, "orchestrator", service=True)
    orchestrator = Orchestrator(nc, settings, durable_tasks=durable_tasks)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await orchestrator.start()
    await stop.wait()
    await orchestrator.stop()
    await nc.flush(timeout=5)
    await nc.close()
    return 0
