"""The one interface every model provider implements."""

from __future__ import annotations

from typing import Any, Protocol

import msgspec

from chorus.messages import Usage


class ModelRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One model call: the agent's instructions, the task's input, optionally a JSON schema."""

    model: str
    instructions: str
    input: str
    json_schema: dict[str, Any] | None = None
    schema_name: str = "output"


class ModelReply(msgspec.Struct, frozen=True, kw_only=True):
    """The model's answer. `data` is the parsed JSON when a schema was asked for."""

    text: str
    data: Any = None
    usage: Usage = Usage()
    model: str = ""


class Model(Protocol):
    """A provider. Implementations must be safe to call concurrently from many tasks."""

    name: str

    async def complete(self, request: ModelRequest) -> ModelReply: ...

    async def close(self) -> None: ...
