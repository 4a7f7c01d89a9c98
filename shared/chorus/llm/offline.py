"""A deterministic model with no network: for the demo, the tests and CI.

Without a script it answers `[<model>] <first line of instructions>: <input>`. When a JSON
schema is asked for it returns a value valid for that schema. Tests script it with
`OfflineModel(script=...)`: a callable from request to text or data.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from chorus.llm.base import ModelReply, ModelRequest
from chorus.messages import Usage

Script = Callable[[ModelRequest], Any | Awaitable[Any]]


def _count_tokens(text: str) -> int:
    return len(text.split())


def sample_for_schema(schema: dict[str, Any], defs: dict[str, Any] | None = None) -> Any:
    """A small value that validates against `schema` (the subset msgspec and OpenAI emit)."""
    defs = defs if defs is not None else schema.get("$defs", {})
    if "$ref" in schema:
        return sample_for_schema(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
    for combinator in ("anyOf", "oneOf", "allOf"):
        if combinator in schema:
            return sample_for_schema(schema[combinator][0], defs)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    if "default" in schema:
        return schema["default"]
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        properties: dict[str, Any] = schema.get("properties", {})
        return {name: sample_for_schema(sub, defs) for name, sub in properties.items()}
    if kind == "array":
        return [sample_for_schema(schema.get("items", {}), defs)] * schema.get("minItems", 1)
    if kind == "string":
        return "x" * schema.get("minLength", 0) if schema.get("minLength") else "offline"
    if kind == "integer":
        return int(schema.get("minimum", 0))
    if kind == "number":
        return float(schema.get("minimum", 0))
    if kind == "boolean":
        return True
    return None


class OfflineModel:
    """Deterministic, instant (or `delay` seconds), scriptable."""

    def __init__(self, name: str = "offline", *, script: Script | None = None, delay: float = 0.0):
        self.name = name
        self.script = script
        self.delay = delay
        self.calls: list[ModelRequest] = []

    async def complete(self, request: ModelRequest) -> ModelReply:
        self.calls.append(request)
        if self.delay:
            await asyncio.sleep(self.delay)  # simulated model latency
        if self.script is not None:
            answer = self.script(request)
            if isinstance(answer, Awaitable):
                answer = await answer
        elif request.json_schema is not None:
            answer = sample_for_schema(request.json_schema)
        else:
            headline = request.instructions.strip().splitlines()[0] if request.instructions else ""
            answer = f"[{request.model}] {headline}: {request.input}".strip()
        if isinstance(answer, str):
            text, data = answer, None
            if request.json_schema is not None:
                data = json.loads(answer)
        else:
            text, data = json.dumps(answer), answer
        prompt_tokens = _count_tokens(request.instructions) + _count_tokens(request.input)
        completion_tokens = _count_tokens(text)
        usage = Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)
        return ModelReply(text=text, data=data, usage=usage, model=request.model)

    async def close(self) -> None:
        return None
