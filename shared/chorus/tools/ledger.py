"""The effect ledger: a side-effect tool call is never silently repeated by a retry.

`EffectLedger.wrap(tool)` puts a tool whose definition says `side_effect` behind a KV record
(bucket `<prefix>-effects`, kept 7 days) keyed by what stays the same when the task is
retried: the task's `effect_scope`, the tool's name, a hash of the arguments as canonical
JSON, and the occurrence of that (tool, arguments) pair in the attempt (the third identical
call of an attempt is the third of the retry too). An agent's ledger (`owner`, its name)
puts its keys under `<agent>.`, so its NATS permissions cover its own records only; a retry
that lands on an agent of another name does not see them. Before the tool runs, an intent is
written with a KV `create`; after it, the output or error, under the same key. So a retry

- finds the recorded output (or error) and returns it without running the tool;
- finds an intent without a result: the earlier attempt died mid-call, and the effect may or
  may not have happened. The call is **in doubt** and is not run again. A tool that can find
  out (look the payment up, list the sent mail) defines `reconcile(arguments, ctx)`, which
  returns the output, raises ToolFailed, or returns `RERUN` when it knows the call did not
  happen. Without one the model is told (`EffectInDoubt`, a ToolFailed) not to assume
  either way, and the record says `in_doubt` (`EffectLedger.in_doubt(scope)`).

A tool that fails with something other than ToolFailed, or times out (its `timeout_s`),
leaves its call in doubt too: it may have acted before it failed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections import Counter, OrderedDict
from typing import Any, Final, Protocol, runtime_checkable

import msgspec
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from chorus.errors import EffectInDoubt, ToolFailed
from chorus.messages import EffectRecord, EffectStatus, decode, encode
from chorus.nats.jetstream import last_values
from chorus.nats.streams import ensure_effects_bucket, open_bucket
from chorus.subjects import Subjects, check_token
from chorus.tools.base import Tool, ToolCallContext, ToolDefinition

__all__ = ["RERUN", "EffectLedger", "LedgeredTool", "Reconcilable", "arguments_hash"]

log = logging.getLogger("chorus.tools.ledger")

MAX_SCOPE_KEY = 100
MAX_COUNTED_ATTEMPTS = 10_000  # attempts whose call occurrences are remembered
READ_TIMEOUT_S = 5.0

_SCOPE = re.compile(r"^[A-Za-z0-9_=-]+$")


class _Rerun:
    def __repr__(self) -> str:
        return "RERUN"


RERUN: Final = _Rerun()
"""Returned by `reconcile`: the call is known not to have happened, so run it now."""


@runtime_checkable
class Reconcilable(Protocol):
    async def reconcile(self, arguments: dict[str, Any], ctx: ToolCallContext) -> Any:
        """Settle a call in doubt: its output, ToolFailed, or RERUN."""
        ...


def arguments_hash(arguments: dict[str, Any]) -> str:
    """sha256 of the arguments as canonical JSON (keys sorted), in hex."""
    return hashlib.sha256(msgspec.json.encode(arguments, order="sorted")).hexdigest()[:32]


def scope_key(scope: str) -> str:
    """The scope as a KV key token: itself when it is one, else a hash of it."""
    if len(scope) <= MAX_SCOPE_KEY and _SCOPE.match(scope):
        return scope
    return "h" + hashlib.sha256(scope.encode()).hexdigest()[:40]


class _Occurrences:
    """How many times each (tool, arguments) was called in one attempt, in this process.

    A retry is a new attempt and counts from 1 again: its n-th identical call is keyed as
    the earlier attempt's n-th was. Bounded: the oldest attempts are forgotten first.
    """

    def __init__(self, limit: int = MAX_COUNTED_ATTEMPTS) -> None:
        self._counts: OrderedDict[tuple[str, str, int], Counter[tuple[str, str]]] = OrderedDict()
        self._limit = limit

    def next(self, scope: str, ctx: ToolCallContext, tool: str, digest: str) -> int:
        attempt = (scope, ctx.task_id, ctx.attempt)
        counts = self._counts.pop(attempt, None) or Counter()
        self._counts[attempt] = counts
        if len(self._counts) > self._limit:
            self._counts.popitem(last=False)
        counts[(tool, digest)] += 1
        return counts[(tool, digest)]


class EffectLedger:
    """Intent and result of each side-effect tool call, in KV, shared by every process."""

    def __init__(
        self, nc: Client, subjects: Subjects, *, owner: str = "", replicas: int | None = None
    ) -> None:
        """`owner`: the agent name whose records these are (the first token of each key).
        `replicas`: the bucket's copies in a cluster (CHORUS_REPLICAS; None: one when
        created, an existing bucket's left alone)."""
        self.nc = nc
        self.subjects = subjects
        self.owner = check_token(owner, "effect ledger owner") if owner else ""
        self.replicas = replicas
        self._kv: KeyValue | None = None
        self._occurrences = _Occurrences()

    async def bucket(self) -> KeyValue:
        if self._kv is None:
            js = self.nc.jetstream()
            self._kv = await open_bucket(
                js,
                self.subjects.effects_bucket,
                lambda: ensure_effects_bucket(js, self.subjects, replicas=self.replicas),
            )
        return self._kv

    def _scope_prefix(self, scope: str) -> str:
        """The key prefix of a scope's records: `[<owner>.]<scope>`."""
        return f"{self.owner}.{scope_key(scope)}" if self.owner else scope_key(scope)

    def wrap(self, tool: Tool) -> Tool:
        """The tool behind the ledger when its definition says `side_effect`; else as is."""
        if not tool.definition.side_effect or isinstance(tool, LedgeredTool):
            return tool
        return LedgeredTool(tool, self)

    async def records(self, scope: str) -> list[EffectRecord]:
        """Every recorded call of a scope (a snapshot read: see jetstream.last_values)."""
        await self.bucket()
        bucket = self.subjects.effects_bucket
        subjects = self.subjects
        messages = await last_values(
            self.nc.jetstream(),
            subjects.kv_stream(bucket),
            subjects.kv_subject(bucket, f"{self._scope_prefix(scope)}.>"),
        )
        return [decode(m.data, EffectRecord) for m in messages if m.data]

    async def in_doubt(self, scope: str) -> list[EffectRecord]:
        """The calls of a scope that may or may not have happened (nothing settled them)."""
        return [r for r in await self.records(scope) if r.status == "in_doubt"]

    async def call(self, tool: Tool, arguments: dict[str, Any], ctx: ToolCallContext) -> Any:
        """Run `tool` at most once per key; a repeat gets the recorded outcome."""
        scope = ctx.effect_scope or ctx.task_id
        definition = tool.definition
        if not scope:
            log.warning(
                "side-effect tool called outside a task: not recorded",
                extra={"tool": definition.name, "agent": ctx.agent},
            )
            return await tool.call(arguments, ctx)
        digest = arguments_hash(arguments)
        occurrence = self._occurrences.next(scope, ctx, definition.name, digest)
        key = f"{self._scope_prefix(scope)}.{definition.name}.{digest}.{occurrence}"
        intent = EffectRecord(
            key=key,
            scope=scope,
            tool=definition.name,
            arguments_hash=digest,
            occurrence=occurrence,
            status="started",
            instance=ctx.instance,
            attempt=ctx.attempt,
        )
        kv = await self.bucket()
        while True:
            try:
                revision = await kv.create(key, encode(intent))
            except KeyWrongLastSequenceError:
                pass  # made before: settle it
            else:
                return await self._run(kv, tool, arguments, ctx, intent, revision)
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:
                continue  # expired between the create and the read: a fresh call
            return await self._settle(kv, tool, arguments, ctx, entry)

    async def _run(
        self,
        kv: KeyValue,
        tool: Tool,
        arguments: dict[str, Any],
        ctx: ToolCallContext,
        intent: EffectRecord,
        revision: int,
    ) -> Any:
        definition = tool.definition
        try:
            async with asyncio.timeout(definition.timeout_s):
                output = await tool.call(arguments, ctx)
        except ToolFailed as exc:  # the tool says it did not work: that is the outcome
            await self._write(kv, intent, revision, "failed", error=exc.reason)
            raise
        except Exception as exc:
            cause = (
                f"no result within {definition.timeout_s}s"
                if isinstance(exc, TimeoutError)
                else f"{type(exc).__name__}: {exc}"
            )
            await self._write(kv, intent, revision, "in_doubt", error=cause)
            raise EffectInDoubt(_doubt(definition, f"it failed part-way ({cause})")) from exc
        await self._write(kv, intent, revision, "done", output=output)
        return output

    async def _settle(
        self,
        kv: KeyValue,
        tool: Tool,
        arguments: dict[str, Any],
        ctx: ToolCallContext,
        entry: KeyValue.Entry,
    ) -> Any:
        """The call was made before: its outcome, or settle a call in doubt."""
        record = decode(entry.value or b"", EffectRecord)
        revision = entry.revision or 0
        if record.status == "done":
            return record.output
        if record.status == "failed":
            raise ToolFailed(record.error)
        definition = tool.definition
        if not isinstance(tool, Reconcilable):
            await self._write(kv, record, revision, "in_doubt", error=record.error)
            raise EffectInDoubt(_doubt(definition, _started(record)))
        try:
            async with asyncio.timeout(definition.timeout_s):
                output = await tool.reconcile(arguments, ctx)
        except ToolFailed as exc:
            await self._write(kv, record, revision, "failed", error=exc.reason, reconciled=True)
            raise
        except Exception as exc:
            cause = f"{_started(record)}; reconcile failed ({type(exc).__name__}: {exc})"
            await self._write(kv, record, revision, "in_doubt", error=cause)
            raise EffectInDoubt(_doubt(definition, cause)) from exc
        if output is RERUN:
            claim = msgspec.structs.replace(
                record, status="started", instance=ctx.instance, attempt=ctx.attempt
            )
            try:
                revision = await kv.update(record.key, encode(claim), last=revision)
            except KeyWrongLastSequenceError:  # another retry settled it meanwhile
                return await self._settle(kv, tool, arguments, ctx, await kv.get(record.key))
            return await self._run(kv, tool, arguments, ctx, claim, revision)
        await self._write(kv, record, revision, "done", output=output, reconciled=True)
        return output

    async def _write(
        self,
        kv: KeyValue,
        record: EffectRecord,
        revision: int,
        status: EffectStatus,
        *,
        output: Any = None,
        error: str = "",
        reconciled: bool = False,
    ) -> None:
        """Record the outcome over the revision we read; what we know wins over a record
        another process wrote meanwhile (it could only have guessed: in doubt)."""
        done = msgspec.structs.replace(
            record,
            status=status,
            output=_storable(output),
            error=error,
            reconciled=reconciled or record.reconciled,
            finished_at=time.time(),
        )
        try:
            await kv.update(record.key, encode(done), last=revision)
        except KeyWrongLastSequenceError:
            log.warning("effect record changed meanwhile", extra={"key": record.key})
            await kv.put(record.key, encode(done))


class LedgeredTool:
    """A side-effect tool behind an EffectLedger; otherwise the same tool."""

    def __init__(self, tool: Tool, ledger: EffectLedger) -> None:
        self.tool = tool
        self.ledger = ledger

    @property
    def definition(self) -> ToolDefinition:
        return self.tool.definition

    async def call(self, arguments: dict[str, Any], ctx: ToolCallContext) -> Any:
        return await self.ledger.call(self.tool, arguments, ctx)


def _storable(output: Any) -> Any:
    """The output as JSON-ready builtins (what a retry returns); its text when it is not."""
    try:
        return msgspec.to_builtins(output)
    except TypeError:
        return str(output)


def _started(record: EffectRecord) -> str:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.started_at))
    who = f" by {record.instance}" if record.instance else ""
    return f"an earlier attempt started it{who} at {when} and recorded no result"


def _doubt(definition: ToolDefinition, cause: str) -> str:
    return (
        f"{definition.name} may or may not have taken effect: {cause}. It is not run again; "
        "do not assume it happened or that it did not, and do not call it again with the "
        "same arguments. Say so in your answer, or check by other means."
    )
