"""`KvRunStore`: run records in the JetStream key-value bucket `<prefix>-runs` (file storage)."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from chorus.errors import Conflict
from chorus.messages import RunRecord, decode, encode
from chorus.nats.streams import ensure_bucket
from chorus.subjects import Subjects

RUN_HISTORY = 5  # a few earlier versions of each record, for looking back at a run


class KvRunStore:
    """Key = run id, value = the JSON RunRecord.

    Saves are compare-and-set on the revision this store last read or wrote for the run, so
    two orchestrators can never both advance one run: the second gets Conflict.
    """

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self._revisions: dict[str, int] = {}

    @classmethod
    async def open(cls, js: JetStreamContext, subjects: Subjects) -> KvRunStore:
        """Bind to the runs bucket, creating it when it does not exist yet."""
        kv = await ensure_bucket(
            js,
            KeyValueConfig(
                bucket=subjects.runs_bucket, history=RUN_HISTORY, storage=StorageType.FILE
            ),
        )
        return cls(kv)

    async def load(self, run_id: str) -> RunRecord | None:
        try:
            entry = await self.kv.get(run_id)
        except (KeyNotFoundError, KeyDeletedError):
            return None
        if entry.value is None or entry.revision is None:
            return None
        self._revisions[run_id] = entry.revision
        return decode(entry.value, RunRecord)

    async def save(self, record: RunRecord) -> None:
        revision = self._revisions.get(record.run_id)
        try:
            if revision is None:
                revision = await self.kv.create(record.run_id, encode(record))
            else:
                revision = await self.kv.update(record.run_id, encode(record), last=revision)
        except KeyWrongLastSequenceError:
            raise Conflict(
                f"run {record.run_id} was saved by another process"
                + (f" after revision {revision}" if revision else " already")
                + "; load it again before changing it"
            ) from None
        self._revisions[record.run_id] = revision
