"""Run control: a run waiting for a person (human steps), its answers, resuming it, and what
reaches the work of a run while it goes (cancel markers, steer messages).

- `HumanWait` (runs bucket, key `<run>.wait`): a run parked on a human step, with what the
  person is asked, the schema of the answer and when it times out. Orchestrators read these
  to apply timeouts; deleted when the run resumes.
- `HumanAnswer` (runs bucket, key `<run>.answer.<step>`, written once with create): the
  answer, a person's or the timeout's; the first writer wins.
- `RunResume` (on `<prefix>.runs.resume.<run>`, stored in the runs queue): take the run up
  again; any orchestrator does.
- `RunControl` (KV `<prefix>-control`, key = run id): the cancelled marker agents and the
  dispatcher check before starting a task, and the steer messages agents add to their
  conversations before each model turn.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from chorus.messages.codec import Message, new_id, now

TimeoutAction = Literal["reject", "approve", "fail"]
AnswerSource = Literal["person", "timeout"]


class HumanWait(Message, tag="human_wait"):
    """A run waiting for an answer to one of its human steps."""

    run_id: str
    step: str
    prompt: str
    schema: dict[str, Any] | None = None  # JSON Schema the answer must satisfy
    deadline: float = 0.0  # Unix time the wait times out (0: never)
    on_timeout: TimeoutAction = "fail"
    since: float = msgspec.field(default_factory=now)


class HumanAnswer(Message, tag="human_answer"):
    """The answer to a human step: becomes its output (`value` as data, as JSON text)."""

    run_id: str
    step: str
    value: Any = None
    source: AnswerSource = "person"
    by: str = ""  # who answered (the CLI user, the gateway key), when known
    time: float = msgspec.field(default_factory=now)


class RunResume(Message, tag="run_resume"):
    """Take a waiting run up again: its human step has an answer now."""

    run_id: str
    step: str
    reason: AnswerSource = "person"


class SteerMessage(Message, tag="steer_message"):
    """A user message for the run's agents, added at their next model turn."""

    text: str
    id: str = msgspec.field(default_factory=new_id)
    time: float = msgspec.field(default_factory=now)


class RunControl(Message, tag="run_control"):
    """What reaches the work of one run (KV `<prefix>-control`, key = run id)."""

    run_id: str
    cancelled: bool = False
    reason: str = ""
    steer: list[SteerMessage] = []
    updated_at: float = msgspec.field(default_factory=now)
