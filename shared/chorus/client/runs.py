"""Runs from the submitter's side: submit a workflow run, read it, wait for it, cancel it,
answer its human steps and steer it.

`submit` saves the run record as `pending` in KV, then stores the request in the runs work
queue (with `Nats-Msg-Id` = run id), so the run exists and can be looked up at once and is
never lost; an orchestrator takes it from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection, Sequence
from pathlib import Path

import msgspec
from nats.aio.client import Client

from chorus.client.control import RunControls
from chorus.client.runstore import KvRunStore
from chorus.config import EXAMPLE_WORKFLOWS
from chorus.errors import (
    ConfigError,
    Conflict,
    InvalidMessage,
    NotFound,
    NotWaiting,
    RequestTimeout,
    UnreadableRecord,
)
from chorus.messages import (
    FINISHED_RUN,
    AnswerSource,
    HumanAnswer,
    RunCancel,
    RunHead,
    RunRecord,
    RunRequest,
    RunResume,
    SteerMessage,
    decode_any,
    encode,
    headers,
    now,
)
from chorus.nats import propagation, wire
from chorus.nats.streams import ensure_runs_stream
from chorus.specs.answers import check_answer
from chorus.specs.workflow import find_workflow
from chorus.subjects import Subjects, check_token
from chorus.telemetry import tracing

log = logging.getLogger("chorus.client.runs")


class RunClient:
    def __init__(
        self,
        nc: Client,
        subjects: Subjects,
        *,
        workflow_dirs: Sequence[Path] = (EXAMPLE_WORKFLOWS,),
    ) -> None:
        """`workflow_dirs`: where a `RunRequest.workflow_name` is looked up (from Settings)."""
        self.nc = nc
        self.workflow_dirs = list(workflow_dirs)
        self.js = nc.jetstream()
        self.subjects = subjects
        self._store: KvRunStore | None = None
        self._stream_ready = False
        self.controls = RunControls(self.js, subjects)

    async def store(self) -> KvRunStore:
        if self._store is None:
            self._store = await KvRunStore.open(self.js, self.subjects)
        return self._store

    async def submit(self, request: RunRequest) -> RunRecord:
        """Record the run as pending and queue it; returns the pending record.

        Traced as `send <subject>`: the run's trace starts here (or under the caller's span),
        and the pending record names it (`traceparent`), so every attempt at the run joins it.
        """
        subject = self.subjects.run_submit()
        with tracing.sending(subject, message_id=request.run_id):
            return await self._submit(request, subject)

    async def _submit(self, request: RunRequest, subject: str) -> RunRecord:
        check_token(request.run_id, "run id")
        workflow = request.workflow
        if workflow is None:
            if not request.workflow_name:
                raise ConfigError("give a workflow (inline) or a workflow_name")
            workflow = find_workflow(request.workflow_name, self.workflow_dirs)
        request = msgspec.structs.replace(request, workflow=workflow, workflow_name=workflow.name)
        record = RunRecord(
            run_id=request.run_id,
            workflow=workflow,
            kind=workflow.kind,
            input=request.input,
            data=request.data,
            traceparent=propagation.current_traceparent(),
            budget=request.budget or workflow.budget,
        )
        store = await self.store()
        existing = await store.load(request.run_id)
        if existing is None:
            await store.save(record)
        if not self._stream_ready:
            await ensure_runs_stream(self.js, self.subjects)
            self._stream_ready = True
        await wire.publish_durably(
            self.js,
            subject,
            encode(request),
            headers.for_run_request(request.run_id),
        )
        return existing or record

    async def get(self, run_id: str) -> RunRecord:
        """The run's record; NotFound, or UnreadableRecord when it is stored but undecodable."""
        store = await self.store()
        try:
            record = await store.load(run_id)
        except InvalidMessage as exc:
            raise UnreadableRecord(
                f"run {run_id!r} is stored but cannot be read ({exc.reason}): it was written "
                f"by something else or another version; key {run_id!r} in bucket "
                f"{self.subjects.runs_bucket!r}"
            ) from None
        if record is None:
            raise NotFound(f"no run {run_id!r}")
        return record

    async def list(
        self,
        limit: int = 50,
        *,
        statuses: Collection[str] = (),
        workflow: str = "",
        since: float = 0.0,
    ) -> list[RunHead]:
        """The most recently created runs first, without their steps (heads only: a list
        reads one small record per run however many steps runs have). A record that does not
        decode is logged and left out, so one bad value never hides the others.

        Only runs in one of `statuses` (any when empty), of the workflow named `workflow`
        (any when empty), and created at or after `since` (epoch seconds) are listed; the
        `limit` applies to what is left."""
        records = [
            head
            for head in await (await self.store()).heads()
            if (not statuses or head.status in statuses)
            and (not workflow or head.workflow_name == workflow)
            and head.created_at >= since
        ]
        records.sort(key=lambda r: r.created_at, reverse=True)
        return records[:limit]

    async def find(self, prefix: str) -> Sequence[str]:
        """The ids of the runs whose id starts with `prefix`, sorted."""
        heads = await (await self.store()).heads()
        return sorted(r.run_id for r in heads if r.run_id.startswith(prefix))

    async def wait(self, run_id: str, timeout: float) -> RunRecord:
        """Wait until the run is completed, failed or cancelled; the whole record."""
        store = await self.store()
        watcher = await store.kv.watch(run_id)  # the head's key only
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while (left := deadline - loop.time()) > 0:
                try:
                    entry = await watcher.updates(timeout=left)  # type: ignore[no-untyped-call]
                except TimeoutError:
                    break
                if entry is None or not entry.value:
                    continue
                if decode_any(entry.value, RunHead | RunRecord).status in FINISHED_RUN:
                    return await self.get(run_id)
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
        raise RequestTimeout(
            f"run {run_id} did not finish within {timeout}s; it goes on — "
            f"follow it with `chorus runs show {run_id}` or `chorus tail --run {run_id}`"
        )

    async def cancel(self, run_id: str, reason: str = "cancelled on request") -> None:
        """Cancel the run everywhere: its marker first (so no queued task of it starts),
        then a run nobody holds (pending, or waiting for a person) is cancelled here, and
        every orchestrator and agent hears the cancel (the work in flight stops)."""
        # A store of its own: the revision it checks is the one of this very read, even when
        # other requests on this client load the same run meanwhile.
        store = (await self.store()).fresh()
        record = await store.head(run_id)
        if record is None:
            raise NotFound(f"no run {run_id!r}")
        if record.finished:
            return
        await self.controls.mark_cancelled(run_id, reason)
        if record.status == "pending":
            cancelled = msgspec.structs.replace(
                record, status="cancelled", error="cancelled before it started", ended_at=now()
            )
            with contextlib.suppress(Conflict):  # an orchestrator took it: ask it to stop
                await store.save_head(cancelled)
        elif record.status == "waiting":
            await self._cancel_waiting(store, run_id, reason)
        cancel = RunCancel(run_id=run_id, reason=reason)
        await wire.publish(self.nc, self.subjects.run_cancel(run_id), encode(cancel))
        await self.nc.flush(timeout=5)

    async def _cancel_waiting(self, store: KvRunStore, run_id: str, reason: str) -> None:
        """A parked run: nobody runs it, so it is cancelled here (its waiting step too)."""
        whole = await store.load(run_id)
        if whole is None or whole.status != "waiting":
            return
        ended = now()
        try:
            for index, step in enumerate(whole.steps):
                if step.status == "waiting":
                    step.status, step.ended_at = "cancelled", ended
                    await store.save_step(run_id, index, step)
            whole.status, whole.error, whole.ended_at = "cancelled", reason, ended
            await store.save(whole)
        except Conflict:
            return  # resumed meanwhile: the orchestrator now holding it hears the cancel
        await store.unpark(run_id)

    # human steps

    async def respond(self, run_id: str, value: object, *, by: str = "") -> HumanAnswer:
        """Answer the human step the run waits on; the run resumes on any orchestrator.

        InvalidAnswer (the run keeps waiting) when the step's schema refuses `value`;
        NotWaiting when the run waits for nothing (or its step was answered already)."""
        store = await self.store()
        head = await store.head(run_id)
        if head is None:
            raise NotFound(f"no run {run_id!r}")
        wait = await store.wait_of(run_id)
        if head.status != "waiting" or wait is None:
            raise NotWaiting(
                f"run {run_id} is {head.status}, not waiting for an answer"
                + ("" if head.finished else "; answer once `chorus runs` shows it waiting")
            )
        check_answer(wait.schema, value, step=wait.step)
        answer = HumanAnswer(run_id=run_id, step=wait.step, value=value, by=by)
        try:
            await store.store_answer(answer)
        except Conflict:
            raise NotWaiting(
                f"step {wait.step} of run {run_id} has been answered already (or timed out)"
            ) from None
        await self.resume(run_id, wait.step, "person")
        return answer

    async def resume(self, run_id: str, step: str, reason: AnswerSource) -> None:
        """Queue the waiting run to be taken up again (its step has an answer now); one
        resume per step whoever sends it (de-duplicated)."""
        if not self._stream_ready:
            await ensure_runs_stream(self.js, self.subjects)
            self._stream_ready = True
        message = RunResume(run_id=run_id, step=step, reason=reason)
        await wire.publish_durably(
            self.js,
            self.subjects.run_resume(run_id),
            encode(message),
            headers.for_run_resume(run_id, step),
        )

    # steer

    async def steer(self, run_id: str, text: str) -> SteerMessage:
        """Add a user message the run's agents see at their next model turn."""
        if not text.strip():
            raise InvalidMessage("the steer message is empty: say what the agents should do")
        head = await (await self.store()).head(run_id)
        if head is None:
            raise NotFound(f"no run {run_id!r}")
        if head.finished:
            raise Conflict(f"run {run_id} is {head.status} already; nothing reads a steer now")
        return await self.controls.add_steer(run_id, text)
