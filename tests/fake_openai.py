"""A local stand-in for the OpenAI HTTP API, for tests that drive the real `openai` client.

Speaks `POST /v1/responses` and `POST /v1/chat/completions`, records every request, replies
with scripted text (by default an echo, or a sample valid for the requested JSON schema) or
scripted function calls (a `reply` that returns a list of `FakeCall`), and can fail the next
requests (of one model, or any) with an OpenAI-style error body and a `retry-after`. A
request with `stream: true` is answered with Server-Sent Events (tests/fake_openai_stream.py),
`stream_delay` seconds apart, and cut off after `cut_stream_after` events when that is set;
a stream the client closes before its end is counted (`streams_closed`, `stream_closed`).
Each request's arrival time and tokens are kept (`arrivals`), so a test can ask what the
server received in any window (`peak`), as a provider's rate limit would count it. `delay`
makes every answer take that long (a model's latency). Stdlib only.
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


class Arrival(NamedTuple):
    """One request as the server received it."""

    time: float  # time.time() when it arrived
    model: str
    status: int
    tokens: int  # input + output, as the reply's usage says (0 for a failure)
    instructions: str


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
        self.delay = 0.0  # seconds every successful answer takes
        self.cached_tokens = 0  # of each prompt, reported as served from the prompt cache
        self.arrivals: list[Arrival] = []
        # A streamed reply under way, and one the client closed before its end (a cancel).
        self.stream_started = threading.Event()
        self.stream_closed = threading.Event()
        self.streams_closed = 0
        self._failures: list[tuple[int, float | None, str | None]] = []
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._ids = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None, "FakeOpenAI is not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def fail_next(
        self,
        status: int,
        count: int = 1,
        *,
        retry_after: float | None = None,
        model: str | None = None,
    ) -> None:
        """Answer the next `count` requests (for `model` only, when given) with HTTP
        `status` and, when given, a `retry-after` header."""
        with self._lock:
            self._failures.extend([(status, retry_after, model)] * count)

    def reset(self) -> None:
        """Forget what arrived so far (requests, headers, arrivals)."""
        with self._lock:
            self.requests.clear()
            self.headers.clear()
            self.arrivals.clear()

    def wait_for(self, count: int, timeout: float) -> list[Arrival]:
        """Block until at least `count` requests arrived (run it in a thread from async
        code); AssertionError after `timeout` seconds."""
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.arrivals) >= count, timeout):
                raise AssertionError(f"{len(self.arrivals)} requests arrived, not {count}")
            return list(self.arrivals)

    def peak(self, window_s: float) -> tuple[int, int]:
        """The most requests, and the most tokens, that arrived within any `window_s`."""
        with self._lock:
            arrivals = sorted(self.arrivals)
        most_requests = most_tokens = 0
        end = 0
        tokens = 0
        for start, first in enumerate(arrivals):
            while end < len(arrivals) and arrivals[end].time < first.time + window_s:
                tokens += arrivals[end].tokens
                end += 1
            most_requests = max(most_requests, end - start)
            most_tokens = max(most_tokens, tokens)
            tokens -= first.tokens
        return most_requests, most_tokens

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

        self._server = _Server(("127.0.0.1", 0), Handler)
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
        arrived = time.time()
        model = str(body.get("model", "fake-model"))
        instructions, user_input = prompt_of(path, body)
        with self._lock:
            self.requests.append((path, body))
            self.headers.append(headers)
            failure = next((f for f in self._failures if f[2] in (None, model)), None)
            if failure is not None:
                self._failures.remove(failure)
                self.arrivals.append(Arrival(arrived, model, failure[0], 0, instructions))
                self._arrived.notify_all()
            number = next(self._ids)
        if failure is not None:
            status, retry_after, _ = failure
            extra = {} if retry_after is None else {"retry-after": str(retry_after)}
            return status, _error(status, f"fake failure {status}"), extra
        if path not in (RESPONSES, CHAT) or (path == RESPONSES and self.disable_responses):
            return 404, _error(404, f"Invalid URL (POST {path})"), {}
        answer = self.reply(path, body)
        text, calls = (answer, []) if isinstance(answer, str) else ("", answer)
        prompt_tokens, output_tokens = _words(instructions) + _words(user_input), _words(text)
        output_tokens += sum(_words(c.arguments) for c in calls)
        with self._lock:
            tokens = prompt_tokens + output_tokens
            self.arrivals.append(Arrival(arrived, model, 200, tokens, instructions))
            self._arrived.notify_all()
        if self.delay:
            time.sleep(self.delay)  # the model's latency, in the server's own thread
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
        cached = min(self.cached_tokens, prompt_tokens)
        response["usage"]["input_tokens_details"]["cached_tokens"] = cached
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


class _Server(ThreadingHTTPServer):
    # The stdlib's backlog of 5 drops connections past it, and the client's retry of the SYN
    # comes a second later: many agents calling at once would see 1 s stalls that are the
    # fake's, not theirs.
    request_queue_size = 256
    daemon_threads = True


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
