"""The streamed (`stream: true`) replies of the fake OpenAI server, as Server-Sent Events.

Responses API: `response.created`, then per output item `response.output_item.added`, for a
message `response.content_part.added`, one `response.output_text.delta` per word and the
`.done` events, for a function call `response.function_call_arguments.delta` pieces, then
`response.completed` with the whole response and its usage. Chat Completions: one
`chat.completion.chunk` per word or argument piece, a last chunk with `finish_reason`, with
`stream_options.include_usage` a chunk with no choices and the usage, then `data: [DONE]`.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

_WORDS = re.compile(r"\S+\s*|\s+")


def words(text: str) -> list[str]:
    """`text` in pieces of a word each, which join back to it."""
    return _WORDS.findall(text)


def argument_pieces(arguments: str, count: int = 3) -> list[str]:
    size = max(1, -(-len(arguments) // count))
    return [arguments[i : i + size] for i in range(0, len(arguments), size)] or [""]


def sse(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    body = data if isinstance(data, str) else json.dumps(data)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {body}\n\n".encode()


def responses_events(response: dict[str, Any]) -> list[bytes]:
    """The events of a Responses stream whose completed response is `response`."""
    events: list[bytes] = []

    def send(kind: str, **fields: Any) -> None:
        events.append(sse({"type": kind, "sequence_number": len(events), **fields}, kind))

    started = {**response, "status": "in_progress", "output": [], "usage": None}
    send("response.created", response=started)
    for index, item in enumerate(response["output"]):
        if item["type"] == "message":
            text = "".join(p["text"] for p in item["content"] if p["type"] == "output_text")
            send(
                "response.output_item.added",
                output_index=index,
                item={**item, "status": "in_progress", "content": []},
            )
            part = {"type": "output_text", "text": "", "annotations": []}
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            send("response.content_part.added", part=part, **where)
            for piece in words(text):
                send("response.output_text.delta", delta=piece, logprobs=[], **where)
            send("response.output_text.done", text=text, logprobs=[], **where)
            send("response.content_part.done", part={**part, "text": text}, **where)
        else:
            send(
                "response.output_item.added",
                output_index=index,
                item={**item, "status": "in_progress", "arguments": ""},
            )
            for piece in argument_pieces(item["arguments"]):
                send(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=index,
                    delta=piece,
                )
            send(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                name=item["name"],
                arguments=item["arguments"],
            )
        send("response.output_item.done", output_index=index, item=item)
    send("response.completed", response=response)
    return events


def chat_chunks(completion: dict[str, Any], *, include_usage: bool) -> list[bytes]:
    """The chunks of a Chat Completions stream that add up to `completion`."""
    chunks: list[bytes] = []

    def send(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> None:
        chunk = {
            "id": completion["id"],
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": completion["model"],
            "choices": choices,
        }
        if include_usage:
            chunk["usage"] = usage
        chunks.append(sse(chunk))

    def delta(fields: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": fields, "finish_reason": finish, "logprobs": None}]

    choice = completion["choices"][0]
    message = choice["message"]
    send(delta({"role": "assistant", "content": ""}))
    for piece in words(message.get("content") or ""):
        send(delta({"content": piece}))
    for index, call in enumerate(message.get("tool_calls") or []):
        function = call["function"]
        first = {"index": index, "id": call["id"], "type": "function"}
        send(delta({"tool_calls": [{**first, "function": {"name": function["name"]}}]}))
        for piece in argument_pieces(function["arguments"]):
            send(delta({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}))
    send(delta({}, choice["finish_reason"]))
    if include_usage:
        send([], completion["usage"])
    chunks.append(sse("[DONE]"))
    return chunks
