"""A task in a conversation session: load the session's history for the model, run the task
in the session's turn, append what happened (the input, the tool calls, the answer).

The history is kept as plain JSON items (`chorus.agent.sessions`), the model interface's
conversation items encoded, so any replica (and any later version) reads them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec

from chorus.agent.sessions import SessionStore
from chorus.llm.base import AssistantMessage, FunctionCall, FunctionCallOutput, Item, UserMessage
from chorus.messages import Task, ToolCallRecord
from chorus.specs.agent import SessionSpec

Handler = Callable[[Sequence[Item]], Awaitable[tuple[str, list[ToolCallRecord]]]]


def history_items(stored: Sequence[dict[str, Any]]) -> tuple[Item, ...]:
    """The session's items as conversation items; items this version cannot read are left
    out (a newer replica may have written them)."""
    items: list[Item] = []
    for raw in stored:
        try:
            items.append(msgspec.convert(raw, Item))
        except msgspec.ValidationError:
            continue
    return tuple(items)


def turn_items(
    text: str, tool_calls: Sequence[ToolCallRecord], answer: str
) -> list[dict[str, Any]]:
    """One turn as session items: the user's input, each tool call and its output, the answer."""
    items: list[Item] = [UserMessage(text=text)]
    for call in tool_calls:
        items.append(FunctionCall(call_id=call.call_id, name=call.name, arguments=call.arguments))
        output = call.output if not call.error else _error_output(call.error)
        items.append(FunctionCallOutput(call_id=call.call_id, output=output))
    items.append(AssistantMessage(text=answer))
    return [msgspec.to_builtins(item) for item in items]


def _error_output(error: str) -> str:
    return msgspec.json.encode({"error": error}).decode()


async def in_session(store: SessionStore, spec: SessionSpec, task: Task, handle: Handler) -> str:
    """Run `handle(history)` in the turn of the store's agent's session (its policy decides
    about a turn already running), then append the turn; returns the answer."""
    async with store.turn(task.session_id, spec.policy):
        session = await store.load(task.session_id)
        answer, tool_calls = await handle(history_items(session.items))
        await store.append(
            task.session_id,
            turn_items(task.input, tool_calls, answer),
            max_items=spec.max_items,
            max_bytes=spec.max_bytes,
        )
    return answer
