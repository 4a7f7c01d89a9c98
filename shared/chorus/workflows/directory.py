"""`DiscoveryDirectory`: which agents run, from their NATS micro `$SRV.PING` replies."""

from __future__ import annotations

from collections.abc import Mapping

from chorus.client import ChorusClient


class DiscoveryDirectory:
    """Asks every agent instance at once and collects replies for `timeout` seconds."""

    def __init__(self, client: ChorusClient, *, timeout: float = 0.3) -> None:
        self.client = client
        self.timeout = timeout

    async def agents(self) -> Mapping[str, frozenset[str]]:
        found: dict[str, frozenset[str]] = {}
        for reply in await self.client.discover(timeout=self.timeout):
            metadata = reply.get("metadata") or {}
            name = metadata.get("agent")
            if not name:
                continue
            capabilities = {c for c in metadata.get("capabilities", "").split(",") if c}
            found[name] = found.get(name, frozenset()) | capabilities
        return found
