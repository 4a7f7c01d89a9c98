"""A local stand-in for the OpenAI HTTP API, for tests that drive the real `openai` client.

Speaks `POST /v1/responses` and `POST /v1/chat/completions`, records every request, replies
with scripted text (by default an echo, or a sample valid for the requested JSON schema) or
scripted function calls (a `reply` that returns a list of `FakeCall`), and can fail the next
requests with an OpenAI-style error body. A request with `stream: true` is answered with
Server-Sent Events (tests/fake_openai_stream.py), `stream_delay` seconds apart, and cut off
after `cut_stream_after` events when that is set; a stream the client closes before its end
is counted (`streams_closed`, `stream_closed`). Stdlib only.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple

from chorus.llm.offline import sample_for_schema
from tests.fake_openai_stream import chat_chunks, responses_events

RESPONSES = "/v1/responses"
CHAT = "/v1/chat/completions"
_ERROR_KINDS = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    429: ("requests", "rate_limit_exceeded"),
}


class FakeCall(NamedTuple):
    """A function call the fake model makes: `arguments` is JSON text."""

    call_id: str
    name: str
    arguments: str


def prompt_of(path: str, body: dict[str, Any]) -> tuple[str, str]:
    """The (instructions, input) of a Responses or Chat Completions request body."""
    if path == CHAT:
        messages = body.get("messages", [])
        system = [m["content"] for m in messages if m.get("role") in ("system", "developer")]
        user = [m["content"] for m in messages if m.get("role") == "user"]
        return "\n".join(system), "\n".join(user)
    return body.get("instructions") or "", str(body.get("input", ""))


def schema_of(path: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema a request asks the reply to follow, if any."""
    if path == CHAT:
        fmt = body.get("response_format") or {}
        fmt = {"type": fmt.get("type"), **(fmt.get("json_schema") or {})}
    else:
        fmt = (body.get("text") or {}).get("format") or {}
    return fmt.get("schema") if fmt.get("type") == "json_schema" else None


def default_reply(path: str, body: dict[str, Any]) -> str:
    schema = schema_of(path, body)
    if schema is not None:
        return json.dumps(sample_for_schema(schema))
    return f"echo: {prompt_of(path, body)[1]}"


def _words(text: str) -> int:
    return len(text.split())


class FakeOpenAI:
    """`with FakeOpenAI() as fake: AsyncOpenAI(base_url=fake.base_url, ...)`."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.headers: list[dict[str, str]] = []
        self.reply: Callable[[str, dict[str, Any]], str | list[FakeCall]] = default_reply
        self.disable_responses = False
        self.stream_delay = 0.0  # between the events of a streamed reply
        self.cut_stream_after: int | None = None  # events, then the connection is dropped
        # A streamed reply under way, and one the client closed before its end (a cancel).
        self.stream_started = threading.Event()
        self.stream_closed = threading.Event()
        self.streams_closed = 0
        self._failures: list[tuple[int, float | None]] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None, "FakeOpenAI is not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def fail_next(self, status: int, count: int = 1, *, retry_after: float | None = None) -> None:
        """Answer the next `count` requests with HTTP `status` (and a `retry-after` header)."""
        with self._lock:
            self._failures.extend([(status, retry_after)] * count)

    def paths(self) -> list[str]:
        with self._lock:
            return [path for path, _ in self.requests]

    def start(self) -> FakeOpenAI:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                status, payload, headers = fake._handle(
                    self.path, body, {k.lower(): v for k, v in self.headers.items()}
                )
                if status == 200 and body.get("stream"):
                    self._stream(fake._events(self.path, body, payload))
                    return
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, events: list[bytes]) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.end_headers()  # HTTP/1.0: the body ends when the connection closes
                cut = fake.cut_stream_after
                fake.stream_started.set()
                try:
                    for number, event in enumerate(events):
                        if cut is not None and number >= cut:
                            return
                        if number and fake.stream_delay:
                            time.sleep(fake.stream_delay)  # the model writing the next token
                        self.wfile.write(event)
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    with fake._lock:  # the client went away mid-stream
                        fake.streams_closed += 1
                    fake.stream_closed.set()

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @staticmethod
    def _events(path: str, body: dict[str, Any], payload: dict[str, Any]) -> list[bytes]:
        if path == CHAT:
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return chat_chunks(payload, include_usage=usage)
        return responses_events(payload)

    def _handle(
        self, path: str, body: dict[str, Any], headers: dict[str, str]
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        with self._lock:
            self.requests.append((path, body))
            self.headers.append(headers)
            failure = self._failures.pop(0) if self._failures else None
            number = next(self._ids)
        if failure is not None:
            status, retry_after = failure
            extra = {} if retry_after is None else {"retry-after": str(retry_after)}
            return status, _error(status, f"fake failure {status}"), extra
        if path not in (RESPONSES, CHAT) or (path == RESPONSES and self.disable_responses):
            return 404, _error(404, f"Invalid URL (POST {path})"), {}
        instructions, user_input = prompt_of(path, body)
        answer = self.reply(path, body)
        text, calls = (answer, []) if isinstance(answer, str) else ("", answer)
        prompt_tokens, output_tokens = _words(instructions) + _words(user_input), _words(text)
        output_tokens += sum(_words(c.arguments) for c in calls)
        model = str(body.get("model", "fake-model"))
        if path == CHAT:
            completion = _chat_completion(number, model, text, prompt_tokens, output_tokens)
            if calls:
                choice = completion["choices"][0]
                choice["finish_reason"] = "tool_calls"
                choice["message"]["content"] = None
                choice["message"]["tool_calls"] = [
                    {
                        "id": c.call_id,
                        "type": "function",
                        "function": {"name": c.name, "arguments": c.arguments},
                    }
                    for c in calls
                ]
            return 200, completion, {}
        response = _response(number, model, text, prompt_tokens, output_tokens)
        if calls:
            response["output"] = [
                {
                    "type": "function_call",
                    "id": f"fc_{number:08d}_{index}",
                    "call_id": c.call_id,
                    "name": c.name,
                    "arguments": c.arguments,
                    "status": "completed",
                }
                for index, c in enumerate(calls)
            ]
        return 200, response, {}


def _error(status: int, message: str) -> dict[str, Any]:
    kind, code = _ERROR_KINDS.get(status, ("server_error", "server_error"))
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _response(
    number: int, model: str, text: str, tokens_in: int, tokens_out: int
) -> dict[str, Any]:
    return {
        "id": f"resp_{number:08d}",
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "model": model,
        "output": [
            {
                "type": "message",
                "id": f"msg_{number:08d}",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "temperature": 1.0,
        "top_p": 1.0,
        "usage": {
            "input_tokens": tokens_in,
            "output_tokens": tokens_out,
            "total_tokens": tokens_in + tokens_out,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }


def _chat_completion(
    number: int, model: str, text: str, tokens_in: int, tokens_out: int
) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{number:08d}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": tokens_in,
            "completion_tokens": tokens_out,
            "total_tokens": tokens_in + tokens_out,
        },
    }
