"""What an agent instance answers on `$SRV.INFO` (NATS micro), as far as Chorus reads it."""

from __future__ import annotations

import msgspec


class ServiceInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A micro `INFO` reply. The metadata is set by the agent host: `agent`, `instance`,
    `capabilities` (comma-separated), `description`, `input_schema` (JSON, when declared)."""

    id: str = ""
    name: str = ""
    description: str = ""
    metadata: dict[str, str] = {}
