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
from chorus.messages.rejected import RejectedMessage

RUN_ID_HEADER: Final = "Chorus-Run-Id"
TASK_ID_HEADER: Final = "Chorus-Task-Id"
ATTEMPT_HEADER: Final = "Chorus-Attempt"
DEPTH_HEADER: Final = "Chorus-Depth"  # agents-as-tools hops (chorus.tools.peers)
TRACEPARENT_HEADER: Final = "traceparent"  # W3C trace context
MSG_ID_HEADER: Final = "Nats-Msg-Id"  # JetStream de-duplication
# JetStream and KV headers Chorus sets on shared-state writes (chorus.state.bucket).
EXPECTED_LAST_SUBJECT_SEQUENCE_HEADER: Final = "Nats-Expected-Last-Subject-Sequence"
# Makes the revision check apply to another key (nats-server 2.11+): the fencing of locks.
EXPECTED_SUBJECT_HEADER: Final = "Nats-Expected-Last-Subject-Sequence-Subject"
ROLLUP_HEADER: Final = "Nats-Rollup"
MSG_TTL_HEADER: Final = "Nats-TTL"
KV_OPERATION_HEADER: Final = "KV-Operation"  # DEL or PURGE on a delete marker
MARKER_REASON_HEADER: Final = "Nats-Marker-Reason"  # set on markers the server writes
# The NATS micro convention for error replies, set beside the JSON error body.
SERVICE_ERROR_HEADER: Final = "Nats-Service-Error"
SERVICE_ERROR_CODE_HEADER: Final = "Nats-Service-Error-Code"
# What nats-server puts on the status messages of a push consumer (nats-py parses the
# status line into STATUS_HEADER): an idle heartbeat is status 100 and names the last
# delivery sequence the consumer sent.
STATUS_HEADER: Final = "Status"
LAST_CONSUMER_HEADER: Final = "Nats-Last-Consumer"
IDLE_HEARTBEAT_STATUS: Final = "100"

Headers = dict[str, str]

# The micro convention wants a number in Nats-Service-Error-Code: Chorus's text codes as the
# HTTP statuses they mean (the text code stays in the JSON error body). Anything else is 500.
SERVICE_ERROR_NUMBERS: Final[Mapping[str, int]] = {
    "invalid_message": 400,
    "invalid_config": 400,
    "invalid_spec": 400,
    "invalid_workflow": 400,
    "invalid_expression": 400,
    "invalid_plan": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "conflict": 409,
    "lease_lost": 409,
    "session_busy": 409,
    "payload_too_large": 413,
    "too_many_requests": 429,
    "draining": 503,
    "no_responders": 503,
    "no_helper": 503,
    "timeout": 504,
    "depth_exceeded": 508,  # Loop Detected: agents asking each other round in circles
}


def service_error_number(code: str) -> int:
    """The number a text error code becomes in `Nats-Service-Error-Code`."""
    return SERVICE_ERROR_NUMBERS.get(code, 500)


class Received(msgspec.Struct, frozen=True, kw_only=True):
    """What Chorus reads from a message's headers (empty strings when absent)."""

    task_id: str = ""
    run_id: str = ""
    attempt: int = 0
    depth: int = 0
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
        depth=depth_of(headers),
        msg_id=headers.get(MSG_ID_HEADER, ""),
        traceparent=headers.get(TRACEPARENT_HEADER, ""),
        error=headers.get(SERVICE_ERROR_HEADER, ""),
        error_code=headers.get(SERVICE_ERROR_CODE_HEADER, ""),
    )


def depth_of(headers: Mapping[str, str] | None) -> int:
    """The agents-as-tools depth a message says it is at (0 when absent or not a number)."""
    value = (headers or {}).get(DEPTH_HEADER, "")
    return int(value) if value.isdigit() and len(value) < 6 else 0


def _with_run(headers: Headers, run_id: str) -> Headers:
    if run_id:
        headers[RUN_ID_HEADER] = run_id
    return headers


def for_task(task: Task) -> Headers:
    """A task sent by request-reply (and its reply); its depth when it came from a peer."""
    headers = {TASK_ID_HEADER: task.task_id, ATTEMPT_HEADER: str(task.attempt)}
    if task.depth:
        headers[DEPTH_HEADER] = str(task.depth)
    return _with_run(headers, task.run_id)


def for_result(task_id: str, run_id: str = "") -> Headers:
    return _with_run({TASK_ID_HEADER: task_id}, run_id)


def for_queued_task(task: Task) -> Headers:
    """A task stored in the dispatch work queue: de-duplicated by its id."""
    return {**for_task(task), MSG_ID_HEADER: task.task_id}


def for_resume_task(task: Task) -> Headers:
    """The task that resumes a parked one: same task id, de-duplicated per approval (the
    parked task's own message may be inside the de-duplication window still)."""
    return {**for_task(task), MSG_ID_HEADER: f"{task.task_id}.resume.{task.resume}"}


def for_event(event: Event) -> Headers:
    return _with_run({MSG_ID_HEADER: event.event_id}, event.run_id)


def for_run(run_id: str) -> Headers:
    """A message about a run (its progress)."""
    return {RUN_ID_HEADER: run_id}


def for_run_request(run_id: str) -> Headers:
    return {MSG_ID_HEADER: run_id, RUN_ID_HEADER: run_id}


def for_run_resume(run_id: str, step: str) -> Headers:
    """One resume per human step: a person's answer and its timeout resume it once."""
    return {MSG_ID_HEADER: f"{run_id}-resume-{step}", RUN_ID_HEADER: run_id}


def for_dead_letter(task: Task) -> Headers:
    return _with_run({MSG_ID_HEADER: task.task_id, TASK_ID_HEADER: task.task_id}, task.run_id)


def for_rejected(letter: RejectedMessage) -> Headers:
    """De-duplicated by queue and stream sequence: giving up twice keeps one letter."""
    msg_id = f"rejected-{letter.queue}-{letter.stream_sequence}"
    return _with_run({MSG_ID_HEADER: msg_id}, letter.run_id or "")


def for_stream_chunk(publisher: str, seq: int) -> Headers:
    """A chunk of live output: de-duplicated per publisher (one attempt as one instance runs
    it), so a retried publish is dropped but the same attempt run again elsewhere is not."""
    return {MSG_ID_HEADER: f"{publisher}-{seq}"}


def for_error(code: str, reason: str) -> Headers:
    """An error reply: the reason and the code's number (the micro convention); the body
    carries the text code."""
    return {
        SERVICE_ERROR_HEADER: reason,
        SERVICE_ERROR_CODE_HEADER: str(service_error_number(code)),
    }


def for_kv_write(
    *,
    expect: int | None = None,
    expect_subject: str | None = None,
    operation: str | None = None,
    rollup: bool = False,
    ttl_s: int | None = None,
) -> Headers:
    """A conditional write to a KV bucket's stream: `expect` the revision the key (or, with
    `expect_subject`, that other key's subject) must be at; a KV `operation` (DEL, PURGE);
    a rollup of the key's history; a per-message TTL in seconds."""
    headers: Headers = {}
    if expect is not None:
        headers[EXPECTED_LAST_SUBJECT_SEQUENCE_HEADER] = str(expect)
    if expect_subject is not None:
        headers[EXPECTED_SUBJECT_HEADER] = expect_subject
    if operation is not None:
        headers[KV_OPERATION_HEADER] = operation
    if rollup:
        headers[ROLLUP_HEADER] = "sub"
    if ttl_s is not None:
        headers[MSG_TTL_HEADER] = str(ttl_s)
    return headers


def kv_operation(headers: Mapping[str, str] | None) -> str:
    """`DEL`, `PURGE`, `MARKER` (the server removed the value: TTL or max age) or `PUT`."""
    if not headers:
        return "PUT"
    if headers.get(KV_OPERATION_HEADER):
        return headers[KV_OPERATION_HEADER]
    return "MARKER" if headers.get(MARKER_REASON_HEADER) else "PUT"


def status(headers: Mapping[str, str] | None) -> str:
    """The status code of a server status message ("100": idle heartbeat); "" otherwise."""
    return (headers or {}).get(STATUS_HEADER, "")


def last_delivered(headers: Mapping[str, str] | None) -> int:
    """The last delivery sequence a consumer's idle heartbeat says it sent (0 when absent)."""
    value = (headers or {}).get(LAST_CONSUMER_HEADER, "")
    return int(value) if value.isdigit() else 0
