"""The coordinator service: registry, health, routing and durable dispatch until SIGTERM."""

from __future__ import annotations

import asyncio
import signal

from chorus.config import Settings
from chorus.connection import connect
from chorus.coordinator.service import Coordinator


async def serve(settings: Settings) -> int:
    nc = await connect(settings, "coordinator", service=True)
    coordinator = Coordinator(nc, settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await coordinator.start()
    await stop.wait()
    await coordinator.stop()
    # Subscriptions are gone already; drain() can hang on JetStream pull inboxes.
    await nc.flush(timeout=5)
    await nc.close()
    return 0
