"""The agent loop: model → tool calls → their outputs → model, until a final answer.

The calls of one turn run concurrently, at most `max_parallel` at once. A tool that fails in
any way (ToolFailed, another error, its `timeout_s`, a value that cannot be encoded) gives
the model `{"error": "..."}` as its output and the loop goes on: a tool never ends a task.
`max_turns` model calls without a final answer raise MaxTurnsExceeded carrying the records of
the calls made. Each turn's own cost (the time outside the model's and the tools' awaits) is
measured, so a bench can report what the loop adds.

Given a `sink` (a task's live output, chorus.agent.streaming), the loop asks the model with
`stream` instead of `complete`, hands it each text delta, and tells it when each tool call
starts and ends. The sink's methods must not block: the loop does not wait on them.

A tool whose definition has an `approval` policy that says a call needs a decision is not
run: the other calls of its turn are, and the loop raises `Parked` with everything needed to
go on later, on any instance (chorus.agent.approvals stores it). `start` goes on from there:
the conversation with the parked turn's outputs added, from the next turn. A loop that cannot
park (`can_park=False`: help requests and events have nobody to resume them) tells the model
such a call was rejected.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgspec

from chorus.agent.toolbox import Toolbox
from chorus.errors import ChorusError, MaxTurnsExceeded, ToolFailed
from chorus.llm.base import (
    FunctionCall,
    FunctionCallOutput,
    Item,
    Model,
    ModelRequest,
    UserMessage,
    streamed_reply,
)
from chorus.messages import ToolCallRecord, Usage
from chorus.messages.agents import truncated
from chorus.telemetry import tracing
from chorus.tools.base import ToolCallContext

log = logging.getLogger("chorus.agent.loop")

DEFAULT_MAX_TURNS = 8
DEFAULT_MAX_PARALLEL = 4
_encoder = msgspec.json.Encoder()


class LoopSink(Protocol):
    """Who follows the loop as it works (a task's live output); called without awaiting."""

    def delta(self, text: str) -> None: ...

    def tool_started(self, call: FunctionCall) -> None: ...

    def tool_finished(self, call: FunctionCall, record: ToolCallRecord) -> None: ...


class LoopResult(msgspec.Struct, kw_only=True):
    """What the loop ends with: the final answer, and what it took to get there."""

    text: str
    data: Any = None
    usage: Usage = Usage()
    tool_calls: list[ToolCallRecord] = []
    turns: int = 0
    overhead_ms: list[float] = []  # per turn: time outside the model and tool awaits


class LoopStart(msgspec.Struct, kw_only=True):
    """Where a resumed loop goes on: the conversation so far (the parked turn's outputs
    included), its next turn, and what the turns before it did and cost."""

    items: list[Item]
    turn: int
    records: list[ToolCallRecord] = []
    usage: Usage = Usage()


class WaitingCall(msgspec.Struct, kw_only=True):
    """A call that waits for a person's decision, and why it does."""

    call: FunctionCall
    arguments: dict[str, Any]
    why: str


class Parked(Exception):
    """The loop stopped for decisions: the state to park and go on from."""

    def __init__(
        self,
        items: list[Item],
        turn: int,
        calls: list[tuple[FunctionCall, _Done | WaitingCall]],
        records: list[ToolCallRecord],
        usage: Usage,
    ) -> None:
        super().__init__(f"{sum(isinstance(c, WaitingCall) for _, c in calls)} calls wait")
        self.items = items
        self.turn = turn
        self.calls = calls
        self.records = records
        self.usage = usage


def needs_decision(toolbox: Toolbox, call: FunctionCall) -> WaitingCall | None:
    """The call as waiting when its tool's policy asks for a decision on these arguments;
    None otherwise (arguments that are not a JSON object fail in `run_tool` as usual)."""
    tool = toolbox.tools.get(call.name)
    if tool is None or tool.definition.approval is None:
        return None
    try:
        arguments = json.loads(call.arguments or "{}")
    except ValueError:
        return None
    if not isinstance(arguments, dict):
        return None
    needed, why = tool.definition.approval.needed(arguments)
    return WaitingCall(call=call, arguments=arguments, why=why) if needed else None


def refused_output(why: str) -> str:
    """What the model reads for a call that needs a decision nobody can wait for."""
    return json.dumps(
        {
            "rejected": True,
            "reason": f"this call needs a person's approval ({why}), and this request cannot "
            "wait for one; it did not run",
        }
    )


class _Done(msgspec.Struct):
    output: str  # what the model reads
    record: ToolCallRecord
    usage: Usage
    started: float
    ended: float


def encode_output(value: Any) -> str:
    """A tool's return value as the text the model reads."""
    if isinstance(value, str):
        return value
    try:
        return _encoder.encode(value).decode()
    except (TypeError, msgspec.EncodeError, OverflowError) as exc:
        raise ToolFailed(
            f"the tool returned a {type(value).__name__} that cannot be encoded: {exc}"
        ) from None


def _error_output(reason: str) -> str:
    return json.dumps({"error": reason})


async def run_tool(toolbox: Toolbox, call: FunctionCall, ctx: ToolCallContext, turn: int) -> _Done:
    """One call, never raising (but for cancellation): failures become an error output."""
    started = time.perf_counter()
    record = ToolCallRecord(
        name=call.name, call_id=call.call_id, arguments=truncated(call.arguments), turn=turn
    )
    tool = toolbox.tools.get(call.name)
    ended = started
    try:
        if tool is None:
            known = ", ".join(sorted(toolbox.tools)) or "none"
            raise ToolFailed(f"there is no tool {call.name!r}; the tools are: {known}")
        try:
            arguments = json.loads(call.arguments or "{}")
        except ValueError as exc:
            raise ToolFailed(f"arguments of {call.name} are not valid JSON: {exc}") from None
        if not isinstance(arguments, dict):
            raise ToolFailed(f"arguments of {call.name} must be a JSON object")
        timeout = tool.definition.timeout_s
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                value = await tool.call(arguments, ctx)
        except TimeoutError:
            raise ToolFailed(f"{call.name} timed out after {timeout:g} s") from None
        finally:
            ended = time.perf_counter()
        output = encode_output(value)
        record.output = truncated(output)
    except ToolFailed as exc:
        output, record.error = _error_output(exc.reason), exc.reason
        log.warning("tool call failed", extra={"tool": call.name, "error": exc.reason})
    except ChorusError as exc:
        output, record.error = _error_output(exc.reason), f"{exc.code}: {exc.reason}"
        log.warning("tool call failed", extra={"tool": call.name, "error": exc.reason})
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        output, record.error = _error_output(reason), reason
        log.exception("tool raised", extra={"tool": call.name})
    record.duration_ms = round((ended - started) * 1000, 3)
    record.instance = ctx.answered_by
    return _Done(output, record, ctx.usage, started, ended)


def _refused(call: FunctionCall, waiting: dict[str, WaitingCall], turn: int) -> _Done:
    output = refused_output(waiting[call.call_id].why)
    record = ToolCallRecord(
        name=call.name,
        call_id=call.call_id,
        arguments=truncated(call.arguments),
        output=output,
        turn=turn,
        approval="rejected",
    )
    now = time.perf_counter()
    return _Done(output, record, Usage(), now, now)


def _trace(records: list[ToolCallRecord], limit: int = 20) -> str:
    lines = []
    for r in records[:limit]:
        outcome = f"error: {r.error}" if r.error else r.output
        call = f"{r.name}({truncated(r.arguments, 80)})"
        lines.append(f"turn {r.turn} {call} -> {truncated(outcome, 80)}")
    if len(records) > limit:
        lines.append(f"... and {len(records) - limit} more")
    return "; ".join(lines) or "none"


async def run_loop(
    model: Model,
    request: ModelRequest,
    toolbox: Toolbox,
    call_context: Callable[[FunctionCall], ToolCallContext],
    *,
    max_turns: int = DEFAULT_MAX_TURNS,
    max_parallel: int = DEFAULT_MAX_PARALLEL,
    sink: LoopSink | None = None,
    can_park: bool = False,
    start: LoopStart | None = None,
    steer: Callable[[], Awaitable[list[str]]] | None = None,
) -> LoopResult:
    """Ask `model` until it answers without tool calls; `call_context` makes each call's
    context. The request's own items and tools are kept; the toolbox's are added. With a
    `sink`, the model is streamed into it, and so are the tool calls. `can_park`: raise
    Parked when calls need a decision; `start`: go on from a parked loop. `steer` is asked
    before each model call for user messages to add first (a run's steer messages)."""
    request = msgspec.structs.replace(
        request,
        tools=request.tools + toolbox.definitions,
        hosted_tools=request.hosted_tools + toolbox.hosted,
    )
    items: list[Item] = list(request.items) if start is None else list(start.items)
    records: list[ToolCallRecord] = [] if start is None else list(start.records)
    overhead: list[float] = []
    usage = Usage() if start is None else start.usage
    first = 1 if start is None else start.turn
    limit = asyncio.Semaphore(max_parallel)

    async def bounded(call: FunctionCall, turn: int) -> _Done:
        async with limit:
            with tracing.tool_call(call.name, call.call_id) as span:
                if sink is not None:
                    sink.tool_started(call)
                done = await run_tool(toolbox, call, call_context(call), turn)
                if sink is not None:
                    sink.tool_finished(call, done.record)
                if done.record.error:
                    tracing.mark_failed("tool_error", done.record.error, span)
                return done

    reply = None
    for turn in range(first, max_turns + 1):
        began = time.perf_counter()
        if steer is not None:
            items.extend(UserMessage(text=text) for text in await steer())
        if len(items) != len(request.items):
            request = msgspec.structs.replace(request, items=tuple(items))
        asked = time.perf_counter()
        if sink is None:
            reply = await model.complete(request)
        else:
            reply = await streamed_reply(model, request, sink.delta)
        model_s = time.perf_counter() - asked
        usage = usage + reply.usage
        if not reply.tool_calls:
            overhead.append(round((time.perf_counter() - began - model_s) * 1000, 4))
            return LoopResult(
                text=reply.text,
                data=reply.data,
                usage=usage,
                tool_calls=records,
                turns=turn,
                overhead_ms=overhead,
            )
        if turn == max_turns:
            break
        items.extend(reply.items or reply.tool_calls)
        waiting = {c.call_id: w for c in reply.tool_calls if (w := needs_decision(toolbox, c))}
        runnable = [c for c in reply.tool_calls if c.call_id not in waiting]
        async with asyncio.TaskGroup() as group:
            running = {c.call_id: group.create_task(bounded(c, turn)) for c in runnable}
        if waiting and can_park:
            calls: list[tuple[FunctionCall, _Done | WaitingCall]] = [
                (c, waiting[c.call_id] if c.call_id in waiting else running[c.call_id].result())
                for c in reply.tool_calls
            ]
            for _, ran in calls:
                if isinstance(ran, _Done):
                    usage = usage + ran.usage
            raise Parked(items, turn, calls, records, usage)
        done = [
            running[c.call_id].result() if c.call_id in running else _refused(c, waiting, turn)
            for c in reply.tool_calls
        ]
        for call, result in zip(reply.tool_calls, done, strict=True):
            items.append(FunctionCallOutput(call_id=call.call_id, output=result.output))
            records.append(result.record)
            usage = usage + result.usage
        tools_s = max(d.ended for d in done) - min(d.started for d in done)
        overhead.append(round((time.perf_counter() - began - model_s - tools_s) * 1000, 4))
    pending = ", ".join(c.name for c in reply.tool_calls) if reply is not None else "nothing"
    raise MaxTurnsExceeded(
        f"no final answer after {max_turns} model turns (max_turns); the model still asked "
        f"for: {pending}; tool calls made: {_trace(records)}",
        records,
    )
