"""Every subject, stream, bucket and queue-group name Chorus uses. Nothing else formats them."""

from __future__ import annotations

import re

import msgspec

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")
# Tokens go into subjects, KV keys and message headers: bounded, so one long id cannot push a
# message over the server's max_payload (which closes the connection).
MAX_TOKEN_LENGTH = 128
# Keys under this prefix in the state bucket hold lock leases (chorus.state.locks).
LOCK_KEY_PREFIX = "_lock."
# A live stream's run and task tokens: a durable task's id may also use `=`.
_STREAM_TOKEN = re.compile(r"^[A-Za-z0-9_=-]+$")
# The run token of a task that belongs to no run.
NO_RUN = "_"
_TOPIC = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*(\.>|\.\*)?$|^>$")


def check_token(value: str, what: str) -> str:
    """A single subject token: letters, digits, `-` and `_` only, at most 128 of them."""
    if len(value) > MAX_TOKEN_LENGTH:
        from chorus.errors import ConfigError

        raise ConfigError(
            f"{what} {value[:16]!r}... is {len(value)} characters long; "
            f"the most is {MAX_TOKEN_LENGTH}"
        )
    if not _TOKEN.fullmatch(value):  # fullmatch: `$` alone would let a final "\n" through
        from chorus.errors import ConfigError

        raise ConfigError(f"{what} {value!r} must use only letters, digits, '-' and '_'")
    return value


def _agent_token(agent: str) -> str:
    return agent if agent == "*" else check_token(agent, "agent name")


def dispatch_target(*, capability: str = "", agent: str = "") -> str:
    """The target token pair of a durable task: `cap.<capability>` or `agent.<name>`."""
    if bool(capability) == bool(agent):
        from chorus.errors import ConfigError

        raise ConfigError("a task targets exactly one of a capability or an agent name")
    if capability:
        return f"cap.{check_token(capability, 'capability')}"
    return f"agent.{check_token(agent, 'agent name')}"


def stream_token(value: str, what: str) -> str:
    """A run or task token of a live stream subject: letters, digits, `-`, `_` and `=`."""
    if not value or len(value) > MAX_TOKEN_LENGTH or not _STREAM_TOKEN.fullmatch(value):
        from chorus.errors import ConfigError

        raise ConfigError(
            f"{what} {value[:16]!r} cannot name a live stream: use 1 to {MAX_TOKEN_LENGTH} "
            "letters, digits, '-', '_' or '='"
        )
    return value


def model_token(model: str) -> str:
    """A model name (`gpt-4.1`, `openai:gpt-5`) as one key token: other characters become `_`."""
    return _NOT_TOKEN.sub("_", model)[:MAX_TOKEN_LENGTH] or "_"


_NOT_TOKEN = re.compile(r"[^A-Za-z0-9_-]")


def check_topic(value: str) -> str:
    """An event topic: dot-separated tokens, optionally ending in a wildcard."""
    if not _TOPIC.match(value):
        from chorus.errors import ConfigError

        raise ConfigError(
            f"event topic {value!r} must be dot-separated tokens of letters, digits, '-' "
            "and '_', optionally ending in '.*' or '.>'"
        )
    return value


class Subjects(msgspec.Struct, frozen=True):
    """The subject space under one prefix (default `chorus`)."""

    prefix: str = "chorus"

    # Instance ids are `<agent name>-<suffix>` (see `instance_agent`). Subjects addressed to one
    # instance carry the agent name as a token of its own, so NATS permissions (whose wildcards
    # match whole tokens only) can confine an agent's credentials to its own instances.
    @staticmethod
    def instance_agent(instance: str) -> str:
        """The agent name of an instance id `<name>-<suffix>` (the suffix has no `-`)."""
        return instance.rsplit("-", 1)[0]

    # request-reply
    def agent_task(self, instance: str) -> str:
        return f"{self.prefix}.agent.{self.instance_agent(instance)}.{instance}.task"

    def instance_tasks(self, name: str) -> str:
        """The task subjects of every instance of the agent called `name`."""
        return f"{self.prefix}.agent.{name}.*.task"

    @property
    def all_instance_tasks(self) -> str:
        return f"{self.prefix}.agent.*.*.task"

    def capability_task(self, capability: str) -> str:
        return f"{self.prefix}.cap.{capability}.task"

    def help(self, capability: str) -> str:
        return f"{self.prefix}.help.{capability}"

    def named_task(self, name: str) -> str:
        """Tasks for any instance of the agent called `name`."""
        return f"{self.prefix}.name.{name}.task"

    def named_queue(self, name: str) -> str:
        return f"{self.prefix}-name-{name}"

    def capability_queue(self, capability: str) -> str:
        return f"{self.prefix}-cap-{capability}"

    def help_queue(self, capability: str) -> str:
        return f"{self.prefix}-help-{capability}"

    # events
    def event(self, topic: str) -> str:
        return f"{self.prefix}.event.{topic}"

    def topic_of(self, subject: str) -> str:
        head = f"{self.prefix}.event."
        return subject[len(head) :] if subject.startswith(head) else subject

    @property
    def all_events(self) -> str:
        return f"{self.prefix}.event.>"

    # heartbeats and registry
    def heartbeat(self, instance: str) -> str:
        return f"{self.prefix}.hb.{self.instance_agent(instance)}.{instance}"

    def agent_heartbeats(self, name: str) -> str:
        """The heartbeats of every instance of the agent called `name`."""
        return f"{self.prefix}.hb.{name}.*"

    @property
    def all_heartbeats(self) -> str:
        return f"{self.prefix}.hb.*.*"

    def agent_status(self, instance: str, change: str) -> str:
        """Agent up/down/unhealthy notices, published by the coordinator."""
        return f"{self.prefix}.status.{instance}.{change}"

    @property
    def all_status(self) -> str:
        return f"{self.prefix}.status.>"

    # durable dispatch: `target` is `cap.<capability>` or `agent.<name>` (see dispatch_target)
    def dispatch(self, target: str) -> str:
        return f"{self.prefix}.dispatch.{target}"

    @property
    def all_dispatch(self) -> str:
        return f"{self.prefix}.dispatch.>"

    def dispatch_consumer(self, target: str) -> str:
        return f"dispatch-{target.replace('.', '-')}"

    def dead_letter(self, target: str) -> str:
        return f"{self.prefix}.dlq.{target}"

    @property
    def runs_dead_letter(self) -> str:
        """Run requests the orchestrator gave up on (dispatch targets are `cap.`/`agent.`)."""
        return self.dead_letter("runs")

    @property
    def all_dead_letters(self) -> str:
        return f"{self.prefix}.dlq.>"

    def outcome(self, task_id: str) -> str:
        """The subject of the outcome's own KV key (`outcome.<task>` in the tasks bucket).

        Submitters follow these subjects through the bucket's stream (`tasks_stream`), not
        a core subscription: a core subscriber also hears a write the stream refused (a
        second `create`) and misses what was stored while it was reconnecting.
        """
        return f"$KV.{self.tasks_bucket}.{self.outcome_key(task_id)}"

    def outcome_key(self, task_id: str) -> str:
        """The key of a durable task's one recorded outcome in the tasks bucket."""
        return f"outcome.{task_id}"

    def attempts_key(self, task_id: str) -> str:
        """The key of a durable task's attempt log in the tasks bucket."""
        return f"attempts.{task_id}"

    @property
    def all_outcomes(self) -> str:
        return f"$KV.{self.tasks_bucket}.outcome.*"

    @property
    def metrics(self) -> str:
        return f"{self.prefix}.coordinator.metrics"

    @property
    def coordinator_queue(self) -> str:
        return f"{self.prefix}-coordinator"

    # runs
    def run_submit(self) -> str:
        return f"{self.prefix}.runs.submit"

    def run_progress(self, run_id: str, kind: str) -> str:
        return f"{self.prefix}.run.{run_id}.{kind}"

    def run_all(self, run_id: str) -> str:
        return f"{self.prefix}.run.{run_id}.>"

    @property
    def all_runs(self) -> str:
        return f"{self.prefix}.run.>"

    def run_cancel(self, run_id: str) -> str:
        return f"{self.prefix}.runs.cancel.{run_id}"

    @property
    def all_run_cancels(self) -> str:
        return f"{self.prefix}.runs.cancel.*"

    # run control (human steps, cancel that reaches the work, steer): chorus.client.control
    def run_resume(self, run_id: str) -> str:
        """A waiting run is answered (or timed out): stored in the runs queue, so any
        orchestrator takes it up again."""
        return f"{self.prefix}.runs.resume.{run_id}"

    @property
    def all_run_resumes(self) -> str:
        return f"{self.prefix}.runs.resume.*"

    @property
    def control_bucket(self) -> str:
        """KV: one `RunControl` per run (cancelled marker, steer messages), key = run id."""
        return f"{self.prefix}-control"

    @property
    def control_kv_stream(self) -> str:
        return f"KV_{self.control_bucket}"

    @staticmethod
    def run_wait_key(run_id: str) -> str:
        """Runs bucket: the `HumanWait` of a run parked on a human step (deleted on resume)."""
        return f"{run_id}.wait"

    @staticmethod
    def run_answer_key(run_id: str, step: str) -> str:
        """Runs bucket: the one `HumanAnswer` of a human step (written once, with create)."""
        return f"{run_id}.answer.{step}"

    @property
    def runs_consumer(self) -> str:
        """The orchestrators' shared pull consumer on the runs stream."""
        return "orchestrator"

    # live output of tasks (chorus.agent.streaming): one subject per task attempt, under its run
    def task_stream(self, run_id: str, task: str, attempt: int) -> str:
        """Where the chunks of one attempt of a task go; `task` is the task's stream key (its
        step name in a workflow run, else its id) and a task of no run goes under `_`."""
        run = stream_token(run_id or NO_RUN, "run id")
        return f"{self.prefix}.stream.{run}.{stream_token(task, 'task id')}.{attempt}"

    def run_streams(self, run_id: str, task: str | None = None) -> str:
        """Every attempt of every task of a run (peer tools nest under the caller's run), or
        of the one task `task`."""
        run = stream_token(run_id or NO_RUN, "run id")
        if task is None:
            return f"{self.prefix}.stream.{run}.>"
        return f"{self.prefix}.stream.{run}.{stream_token(task, 'task id')}.*"

    @property
    def all_task_streams(self) -> str:
        return f"{self.prefix}.stream.>"

    @property
    def observable(self) -> tuple[str, ...]:
        """Every subject an onlooker may follow without taking work (the gateway's console
        tail): all but the request subjects, where a subscriber could join a queue group."""
        return (
            self.all_events,
            self.all_heartbeats,
            self.all_status,
            self.all_runs,
            self.all_run_cancels,
            self.all_dead_letters,
            self.all_task_streams,
        )

    def classify(self, subject: str) -> str | None:
        """What kind of Chorus subject this is (`task`, `event`, ...), None if not one of ours."""
        tokens = subject.split(".")
        if tokens[:3] == ["$KV", self.tasks_bucket, "outcome"]:
            return "outcome"
        if tokens[0] != self.prefix or len(tokens) < 2:
            return None
        head, last = tokens[1], tokens[-1]
        if head in ("cap", "name") and last == "task" and len(tokens) == 4:
            return "task"
        if head == "agent" and last == "task" and len(tokens) == 5:
            return "task"
        kinds = {
            "help": "help",
            "event": "event",
            "hb": "heartbeat",
            "status": "status",
            "dispatch": "dispatch",
            "dlq": "dead_letter",
            "run": "run_progress",
            "session": "session_interrupt",
            "stream": "stream_chunk",
        }
        if head in kinds:
            return kinds[head]
        if subject == self.metrics:
            return "metrics"
        if head == "runs":
            if len(tokens) > 2 and tokens[2] == "resume":
                return "run_resume"
            return "run_submit" if last == "submit" else "run_cancel"
        return None

    # JetStream names (no dots allowed)
    @property
    def _stem(self) -> str:
        return self.prefix.upper().replace("-", "_")

    @property
    def events_stream(self) -> str:
        return f"{self._stem}_EVENTS"

    @property
    def dispatch_stream(self) -> str:
        return f"{self._stem}_DISPATCH"

    @property
    def dead_letter_stream(self) -> str:
        return f"{self._stem}_DLQ"

    @property
    def runs_stream(self) -> str:
        return f"{self._stem}_RUNS"

    @property
    def chunk_stream(self) -> str:
        """The JetStream stream that keeps the live output of tasks for a while."""
        return f"{self._stem}_STREAM"

    @property
    def progress_stream(self) -> str:
        return f"{self._stem}_PROGRESS"

    def event_consumer(self, agent_name: str) -> str:
        """One durable consumer per agent name: replicas share it, so each event is seen once."""
        return f"agent-{agent_name}"

    @property
    def agents_bucket(self) -> str:
        return f"{self.prefix}-agents"

    @property
    def state_bucket(self) -> str:
        return f"{self.prefix}-state"

    # shared state: the stream behind the state bucket, its key subjects, and the lock keys
    @property
    def state_stream(self) -> str:
        return f"KV_{self.state_bucket}"

    def state_subject(self, key: str) -> str:
        return f"$KV.{self.state_bucket}.{key}"

    def state_keys(self, prefix: str) -> list[str]:
        """The subjects of the key `prefix` and of every key under `prefix.`."""
        return [self.state_subject(prefix), self.state_subject(f"{prefix}.>")]

    def state_key(self, subject: str) -> str:
        """The key of a state bucket subject (inverse of `state_subject`)."""
        return subject[len(f"$KV.{self.state_bucket}.") :]

    def lock_key(self, name: str) -> str:
        """A lock's lease lives in the state bucket, so a fenced write is one atomic publish."""
        return f"{LOCK_KEY_PREFIX}{name}"

    @property
    def runs_bucket(self) -> str:
        return f"{self.prefix}-runs"

    @staticmethod
    def kv_stream(bucket: str) -> str:
        """The stream behind a KV bucket."""
        return f"KV_{bucket}"

    @staticmethod
    def kv_subject(bucket: str, key: str) -> str:
        """The subject of a key (or a key pattern) in a KV bucket."""
        return f"$KV.{bucket}.{key}"

    @property
    def runs_kv_stream(self) -> str:
        """The stream behind the runs bucket."""
        return f"KV_{self.runs_bucket}"

    def runs_key_subject(self, key: str) -> str:
        """The subject of a key (or key pattern) in the runs bucket."""
        return f"$KV.{self.runs_bucket}.{key}"

    def runs_key(self, subject: str) -> str:
        return subject[len(f"$KV.{self.runs_bucket}.") :]

    @property
    def tasks_bucket(self) -> str:
        """Durable task outcomes (`outcome.<id>`) and attempt logs (`attempts.<id>`)."""
        return f"{self.prefix}-tasks"

    @property
    def tasks_stream(self) -> str:
        return f"KV_{self.tasks_bucket}"

    # conversation sessions (chorus.agent.sessions): records and turn tickets in one bucket
    @property
    def sessions_bucket(self) -> str:
        return f"{self.prefix}-sessions"

    @property
    def sessions_stream(self) -> str:
        return f"KV_{self.sessions_bucket}"

    # Every key and interrupt subject carries the agent name as a token of its own, so an
    # agent's permissions cover its own sessions only (chorus.auth.permissions.sessions).

    def session_key(self, agent: str, session_id: str) -> str:
        """The key of an agent's session record (its bounded conversation history)."""
        return f"session.{check_token(agent, 'agent name')}.{check_token(session_id, 'session id')}"

    def session_keys(self, agent: str) -> str:
        """The key pattern of every session record of an agent (`*` for every agent's)."""
        return f"session.{_agent_token(agent)}.*"

    def session_keys_of_id(self, session_id: str) -> str:
        """The key pattern of every agent's session of one id (the operator's look-up)."""
        return f"session.*.{check_token(session_id, 'session id')}"

    def session_turns_key(self, agent: str, session_id: str) -> str:
        """The key pattern of a session's turn tickets (one per task holding or waiting)."""
        return f"turn.{check_token(agent, 'agent name')}.{check_token(session_id, 'session id')}.*"

    def session_turn_key(self, agent: str, session_id: str, ticket_id: str) -> str:
        owner, sid = check_token(agent, "agent name"), check_token(session_id, "session id")
        return f"turn.{owner}.{sid}.{check_token(ticket_id, 'ticket id')}"

    def agent_turn_keys(self, agent: str) -> str:
        """The key pattern of every turn ticket of an agent's sessions."""
        return f"turn.{_agent_token(agent)}.*.*"

    def session_subject(self, key: str) -> str:
        return f"$KV.{self.sessions_bucket}.{key}"

    def session_interrupt(self, agent: str, session_id: str) -> str:
        """A newer turn asks the running turn of the session to stop (policy `interrupt`)."""
        sid = check_token(session_id, "session id")
        return f"{self.prefix}.session.{check_token(agent, 'agent name')}.{sid}.interrupt"

    def session_interrupts(self, agent: str) -> str:
        """The interrupts of every session of an agent (`*` for every agent's)."""
        return f"{self.prefix}.session.{_agent_token(agent)}.*.interrupt"

    @property
    def all_session_interrupts(self) -> str:
        return self.session_interrupts("*")

    @property
    def effects_bucket(self) -> str:
        """The effect ledger: one key per side-effect tool call (chorus.tools.ledger)."""
        return f"{self.prefix}-effects"

    # spend controls (chorus.spend): shared rate limits and provider pauses, budgets
    @property
    def limits_bucket(self) -> str:
        return f"{self.prefix}-limits"

    def limit_key(self, name: str) -> str:
        """A shared limit's window (`LimitWindow`), by the limit's name in limits.yaml."""
        return f"limit.{check_token(name, 'limit name')}"

    def pause_key(self, account: str, model: str) -> str:
        """A provider's 429 pause (`RatePause`) of one model on one API key (its hash)."""
        return f"pause.{check_token(account, 'account')}.{model_token(model)}"

    @property
    def budgets_bucket(self) -> str:
        return f"{self.prefix}-budgets"

    def run_budget_key(self, run_id: str) -> str:
        return f"run.{check_token(run_id, 'run id')}"

    def agent_budget_key(self, agent: str, period: str, stamp: str) -> str:
        """An agent's budget for one clock hour or day: `agent.<name>.hour.2026123114`."""
        return f"agent.{check_token(agent, 'agent name')}.{period}.{check_token(stamp, 'stamp')}"

    @property
    def micro_service(self) -> str:
        return f"{self.prefix}-agent"

    def role_service(self, role: str) -> str:
        """The NATS micro service name of a role: `<prefix>-coordinator`, `-orchestrator`,
        `-gateway` (agents are `<prefix>-agent`). `$SRV.PING` finds them all."""
        return f"{self.prefix}-{check_token(role, 'role')}"

    @property
    def micro_info(self) -> str:
        """Every agent instance answers with its service info (description, metadata) here."""
        return f"$SRV.INFO.{self.micro_service}"

    def micro_ping_one(self, service_id: str) -> str:
        """One micro service instance's own PING subject."""
        return f"$SRV.PING.{self.micro_service}.{service_id}"

    @property
    def micro_ping(self) -> str:
        """Every agent instance answers a PING here (NATS micro discovery)."""
        return f"$SRV.PING.{self.micro_service}"

    # tool calls waiting for a person (chorus.client.approvals): records and parked tasks
    @property
    def approvals_bucket(self) -> str:
        return f"{self.prefix}-approvals"

    @property
    def approvals_stream(self) -> str:
        return f"KV_{self.approvals_bucket}"

    def approval_key(self, agent: str, approval_id: str) -> str:
        """An `Approval`: keyed by its agent first, so an agent's credentials cover its own."""
        return f"approval.{check_token(agent, 'agent name')}.{check_token(approval_id, 'id')}"

    def approval_lookup(self, approval_id: str) -> str:
        """The key pattern that finds an approval by id alone (any agent)."""
        return f"approval.*.{check_token(approval_id, 'approval id')}"

    @property
    def all_approval_keys(self) -> str:
        return "approval.>"

    def approval_keys(self, agent: str) -> str:
        return f"approval.{check_token(agent, 'agent name')}.>"

    def parked_key(self, agent: str, park_id: str) -> str:
        """A `ParkedTask`: the conversation an agent resumes from."""
        return f"parked.{check_token(agent, 'agent name')}.{check_token(park_id, 'park id')}"

    def parked_keys(self, agent: str) -> str:
        return f"parked.{check_token(agent, 'agent name')}.>"

    def approval_notice(self, agent: str, status: str) -> str:
        """An approval asked for (`pending`) or decided, announced as the `Approval`; `*`
        for any agent or status."""
        name = agent if agent == "*" else check_token(agent, "agent name")
        return f"{self.prefix}.approvals.{name}.{status}"

    @property
    def all_approval_notices(self) -> str:
        return f"{self.prefix}.approvals.>"
