"""Every NATS header Chorus sets or reads, built and read here and nowhere else.

Builders return a fresh dict per message; `read` turns a received message's headers into
one typed value. `chorus.nats.wire` sends every message with these, and is the one place
where headers every message should carry (trace context, caller identity, deadlines) are
added on the way out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import msgspec

from chorus.messages.agents import Event, Task

RUN_ID_HEADER: Final = "Chorus-Run-Id"
TASK_ID_HEADER: Final = "Chorus-Task-Id"
ATTEMPT_HEADER: Final = "Chorus-Attempt"
TRACEPARENT_HEADER: Final = "traceparent"  # W3C trace context
MSG_ID_HEADER: Final = "Nats-Msg-Id"  # JetStream de-duplication
# The NATS micro convention for error replies, set beside the JSON error body.
SERVICE_ERROR_HEADER: Final = "Nats-Service-Error"
SERVICE_ERROR_CODE_HEADER: Final = "Nats-Service-Error-Code"

Headers = dict[str, str]


class Received(msgspec.Struct, frozen=True, kw_only=True):
    """What Chorus reads from a message's headers (empty strings when absent)."""

    task_id: str = ""
    run_id: str = ""
    attempt: int = 0
    msg_id: str = ""
    traceparent: str = ""
    error: str = ""
    error_code: str = ""


def read(headers: Mapping[str, str] | None) -> Received:
    if not headers:
        return Received()
    attempt = headers.get(ATTEMPT_HEADER, "")
    return Received(
        task_id=headers.get(TASK_ID_HEADER, ""),
        run_id=headers.get(RUN_ID_HEADER, ""),
        attempt=int(attempt) if attempt.isdigit() else 0,
        msg_id=headers.get(MSG_ID_HEADER, ""),
        traceparent=headers.get(TRACEPARENT_HEADER, ""),
        error=headers.get(SERVICE_ERROR_HEADER, ""),
        error_code=headers.get(SERVICE_ERROR_CODE_HEADER, ""),
    )


def _with_run(headers: Headers, run_id: str) -> Headers:
    if run_id:
        headers[RUN_ID_HEADER] = run_id
    return headers


def for_task(task: Task) -> Headers:
    """A task sent by request-reply (and its reply)."""
    headers = {TASK_ID_HEADER: task.task_id, ATTEMPT_HEADER: str(task.attempt)}
    return _with_run(headers, task.run_id)


def for_result(task_id: str, run_id: str = "") -> Headers:
    return _with_run({TASK_ID_HEADER: task_id}, run_id)


def for_queued_task(task: Task) -> Headers:
    """A task stored in the dispatch work queue: de-duplicated by its id."""
    return {**for_task(task), MSG_ID_HEADER: task.task_id}


def for_event(event: Event) -> Headers:
    return _with_run({MSG_ID_HEADER: event.event_id}, event.run_id)


def for_run_request(run_id: str) -> Headers:
    return {MSG_ID_HEADER: run_id, RUN_ID_HEADER: run_id}


def for_dead_letter(task: Task) -> Headers:
    return _with_run({MSG_ID_HEADER: task.task_id, TASK_ID_HEADER: task.task_id}, task.run_id)


def for_error(code: str, reason: str) -> Headers:
    return {SERVICE_ERROR_HEADER: reason, SERVICE_ERROR_CODE_HEADER: code}
