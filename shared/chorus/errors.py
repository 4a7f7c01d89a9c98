"""One exception hierarchy; each class has a stable code that is also the wire error code."""

from __future__ import annotations

from typing import Any


class ChorusError(Exception):
    """Base of every error Chorus raises on purpose. `code` is stable and goes on the wire."""

    code = "chorus_error"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidMessage(ChorusError):
    """A message failed validation: bad JSON, a wrong type, a missing field."""

    code = "invalid_message"


class UnreadableRecord(ChorusError):
    """A stored record (a run) exists but does not decode: written by something else or
    another version, or nested too deep. Not the caller's fault, unlike InvalidMessage."""

    code = "unreadable_record"


class PayloadTooLarge(ChorusError):
    code = "payload_too_large"


class ConfigError(ChorusError):
    """Configuration, a spec file or a workflow file is wrong."""

    code = "invalid_config"


class NatsUnreachable(ChorusError):
    code = "nats_unreachable"


class NatsAuthRefused(ChorusError):
    """The server refused the credentials (user/password, token or creds file)."""

    code = "nats_auth_refused"


class NatsTlsFailed(ChorusError):
    """The TLS handshake with the server failed: an unknown CA, or a client certificate
    the server requires and did not get."""

    code = "nats_tls_failed"


class NoResponders(ChorusError):
    """Nobody listens on the subject: no agent has that name or capability."""

    code = "no_responders"


class NoHelper(ChorusError):
    """A help request found no agent with the capability."""

    code = "no_helper"


class RequestTimeout(ChorusError):
    code = "timeout"


class TaskFailed(ChorusError):
    """The agent's handler raised; the reason is the handler's message."""

    code = "task_failed"


class Draining(ChorusError):
    """The instance is shutting down and takes no new work."""

    code = "draining"


class ModelError(ChorusError):
    code = "model_error"


class RateLimited(ModelError):
    """The provider answered 429 (too many requests or tokens). `retry_after` is its
    `retry-after` in seconds, None when it gave none."""

    code = "rate_limited"

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class BudgetExceeded(ChorusError):
    """A run's or an agent's budget (tokens or dollars) is spent, and its policy is `stop`
    (or the `wrap_up` turn was already given). The reason says which budget and what was
    spent."""

    code = "budget_exceeded"


class MissingApiKey(ChorusError):
    code = "missing_api_key"


class NotFound(ChorusError):
    code = "not_found"


class Conflict(ChorusError):
    code = "conflict"


class InvalidKey(ChorusError):
    """A shared-state key or lock name is not a valid KV key."""

    code = "invalid_key"


class LockTimeout(ChorusError):
    """A lock was still held by another holder when the wait for it ran out."""

    code = "lock_timeout"


class LeaseLost(Conflict):
    """A lease expired or was taken over: a fenced write or a renewal was refused."""

    code = "lease_lost"


class InvalidWorkflow(ConfigError, ValueError):
    """A workflow definition is wrong. A ValueError too, so msgspec reports the field path."""

    code = "invalid_workflow"


class ExpressionError(InvalidWorkflow):
    """A condition or template expression cannot be parsed, is not allowed, or fails."""

    code = "invalid_expression"


class InvalidPlan(ChorusError):
    """A supervisor's plan does not parse or does not hold together (unknown ids, cycles)."""

    code = "invalid_plan"


class RunFailed(ChorusError):
    """A workflow run failed; the reason names the step and what went wrong."""

    code = "run_failed"


class Unauthorized(ChorusError):
    """A gateway request came without an API key, or with one the gateway does not know."""

    code = "unauthorized"


class Forbidden(ChorusError):
    """A gateway request is not allowed: its key lacks the scope, or its Host or Origin is
    not one the gateway serves."""

    code = "forbidden"


class UnsupportedMediaType(ChorusError):
    code = "unsupported_media_type"


class TooManyRequests(ChorusError):
    """A limit on requests in flight is reached; retry later."""

    code = "too_many_requests"


class ToolFailed(ChorusError):
    """A tool call that did not work: told to the model as the call's output, never raised out
    of the agent loop. `reason` is what the model reads."""

    code = "tool_error"


class MaxTurnsExceeded(ChorusError):
    """The agent loop reached `max_turns` without a final answer. `tool_calls` holds the
    records of the calls it made (`chorus.messages.ToolCallRecord`), for the error reply."""

    code = "max_turns_exceeded"

    def __init__(self, reason: str, tool_calls: list[Any] | None = None) -> None:
        super().__init__(reason)
        self.tool_calls: list[Any] = tool_calls or []


class InvalidSpec(ConfigError, ValueError):
    """An agent spec's entry is wrong. A ValueError too, so msgspec reports the field path."""

    code = "invalid_spec"


class DepthExceeded(ChorusError):
    """A task came through more agents-as-tools than `max_depth` allows (A asks B asks A...);
    refused before the handler runs, so a loop between agents ends."""

    code = "depth_exceeded"


class EffectInDoubt(ToolFailed):
    """A side-effect tool call was started by an earlier attempt that never recorded its
    result: it may or may not have happened, and is not run again (chorus.tools.ledger)."""

    code = "effect_in_doubt"


class SessionBusy(ChorusError):
    """A task came for a conversation session whose turn is running, and the agent's session
    policy is `reject` (or the wait for the turn ran out)."""

    code = "session_busy"


class SessionInterrupted(ChorusError):
    """A running (or waiting) turn of a session was cancelled by a newer task for the same
    session, under the session policy `interrupt`."""

    code = "session_interrupted"


class InstanceLost(ChorusError):
    """A dispatched task's instance stopped heartbeating, or is not listening at all."""

    code = "instance_lost"


class TaskTimedOut(ChorusError):
    """A dispatched task got no answer within CHORUS_TASK_TIMEOUT."""

    code = "timeout"


class RunCancelled(ChorusError):
    """The task's run was cancelled: it was stopped, or never started (not retried)."""

    code = "run_cancelled"


class InvalidAnswer(InvalidMessage):
    """An answer to a human step that its `schema:` refuses; the run keeps waiting."""

    code = "invalid_answer"


class NotWaiting(Conflict):
    """An answer for a run that is not waiting for one (finished, running, answered)."""

    code = "not_waiting"


_BY_CODE: dict[str, type[ChorusError]] = {}


def _register(cls: type[ChorusError]) -> None:
    _BY_CODE[cls.code] = cls
    for sub in cls.__subclasses__():
        _register(sub)


_register(ChorusError)


def error_from_code(code: str, reason: str) -> ChorusError:
    """Rebuild the exception a remote process reported, so callers can catch it by type."""
    cls = _BY_CODE.get(code, ChorusError)
    err = cls(reason)
    if cls is ChorusError:
        err.code = code
    return err
