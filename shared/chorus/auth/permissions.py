"""What each kind of principal may publish and subscribe to, built from `chorus.subjects`.

Every list is an allow-list: anything not named is denied. Wildcards in NATS permissions match
whole tokens only, which is why instance subjects carry the agent name as a token of their own.
The `$JS.*` subjects are nats-server's JetStream API (not Chorus's), scoped here to the streams
and consumers a principal owns; stream deletion and purges are denied to everyone but the
operator.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from chorus.subjects import Subjects, dispatch_target

MICRO_VERBS = ("PING", "INFO", "STATS")
# Never granted to a service or an agent, even if an allow-list entry were to cover them.
DESTRUCTIVE = ["$JS.API.STREAM.DELETE.>", "$JS.API.STREAM.PURGE.>", "$JS.API.STREAM.MSG.DELETE.>"]


class Responses(msgspec.Struct, frozen=True):
    """`allow_responses`: reply once to each request received, within `expires_s`."""

    max: int = 1
    expires_s: int = 120


class Permissions(msgspec.Struct, frozen=True, kw_only=True):
    publish: list[str] = []
    publish_deny: list[str] = []
    subscribe: list[str] = []
    subscribe_deny: list[str] = []
    responses: Responses | None = None


class AgentGrant(msgspec.Struct, frozen=True, kw_only=True):
    """The parts of an agent spec that its permissions follow from."""

    name: str
    capabilities: list[str] = []
    subscribes: list[str] = []
    publishes: list[str] = []  # event topics, `emits` included
    state: list[str] = []  # key prefixes in the state bucket
    # Peers it calls directly as tools (`tools: - capability: x` / `- agent: y` with
    # `durable: false`): it may send them tasks by request-reply, nothing else.
    peer_capabilities: list[str] = []
    peer_agents: list[str] = []
    # Peers it calls as durable tools (`durable: true`, the default): it submits them tasks
    # through the coordinator's dispatch subjects and reads their outcomes.
    durable_peer_capabilities: list[str] = []
    durable_peer_agents: list[str] = []
    sessions: bool = False  # `session:` in its spec: the sessions bucket


# nats-server's JetStream API subjects for one stream


def _api(*tokens: str) -> str:
    return ".".join(("$JS.API", *tokens))


def stream_info(stream: str) -> list[str]:
    return [_api("STREAM.INFO", stream)]


def stream_ensure(stream: str) -> list[str]:
    """Create it when missing (a create of an existing stream changes nothing) and look at it."""
    return [_api("STREAM.CREATE", stream), *stream_info(stream)]


def stream_own(stream: str) -> list[str]:
    """Create, update (ensure_stream updates a changed config), look at: never delete or purge."""
    return [*stream_ensure(stream), _api("STREAM.UPDATE", stream)]


def stream_read(stream: str) -> list[str]:
    """Read any message: info, direct get (by subject in the API subject or in the body), get."""
    return [
        *stream_info(stream),
        _api("DIRECT.GET", stream),
        _api("DIRECT.GET", stream, ">"),
        _api("STREAM.MSG.GET", stream),
    ]


def consumers_all(stream: str) -> list[str]:
    """Create, inspect, delete and consume any consumer of a stream the principal owns."""
    return [
        _api("CONSUMER.*", stream),
        _api("CONSUMER.*", stream, ">"),
        _api("CONSUMER.DURABLE.CREATE", stream, "*"),
        _api("CONSUMER.MSG.NEXT", stream, "*"),
        *acks(stream, "*"),
        f"$JS.FC.{stream}.>",
    ]


def ephemeral_consumers(stream: str) -> list[str]:
    """Watch a stream through ephemeral (ordered) consumers: read-only, no durable state."""
    return [
        _api("CONSUMER.CREATE", stream),
        _api("CONSUMER.INFO", stream, "*"),
        f"$JS.FC.{stream}.>",
    ]


def snapshot_reads(stream: str) -> list[str]:
    """Read the latest value of many keys at once (`chorus.nats.jetstream.last_values`): a
    named ephemeral pull consumer. Only for streams with no durable consumer to steal from
    (KV buckets): fetching needs `MSG.NEXT` on any consumer name. No delete: they expire."""
    return [
        _api("CONSUMER.CREATE", stream, "*"),
        _api("CONSUMER.CREATE", stream, "*", ">"),
        _api("CONSUMER.INFO", stream, "*"),
        _api("CONSUMER.MSG.NEXT", stream, "*"),
    ]


def one_consumer(stream: str, consumer: str) -> list[str]:
    """Bind, create or update one named consumer and fetch and ack its messages only."""
    return [
        _api("CONSUMER.CREATE", stream, consumer),
        _api("CONSUMER.CREATE", stream, consumer, ">"),
        _api("CONSUMER.DURABLE.CREATE", stream, consumer),
        _api("CONSUMER.INFO", stream, consumer),
        _api("CONSUMER.MSG.NEXT", stream, consumer),
        *acks(stream, consumer),
    ]


def acks(stream: str, consumer: str) -> list[str]:
    """Ack subjects in both formats: `$JS.ACK.<stream>.<consumer>...` and the v2 one with
    domain and account hash first (nats-server 2.15 can switch to it)."""
    return [f"$JS.ACK.{stream}.{consumer}.>", f"$JS.ACK.*.*.{stream}.{consumer}.>"]


def inbox(principal: str) -> str:
    """The inbox prefix a principal's replies arrive under (connect with `inbox_prefix`)."""
    return f"_INBOX.{principal}"


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def micro_discovery(service: str) -> list[str]:
    """What a NATS micro service subscribes to: `$SRV.<verb>`, by name, and by name and id."""
    return [
        subject
        for verb in MICRO_VERBS
        for subject in (f"$SRV.{verb}", f"$SRV.{verb}.{service}", f"$SRV.{verb}.{service}.*")
    ]


# principals


def agent(
    grant: AgentGrant, subjects: Subjects, *, principal: str, reply_within_s: int
) -> Permissions:
    """One agent name: its own instances, name, capabilities, events, consumer and state."""
    s = subjects
    publish = [s.agent_heartbeats(grant.name), s.help("*")]
    publish += [s.event(topic) for topic in grant.publishes]
    publish += [s.capability_task(c) for c in grant.peer_capabilities]
    publish += [s.named_task(a) for a in grant.peer_agents]
    subscribe = [
        f"{inbox(principal)}.>",
        s.instance_tasks(grant.name),
        f"{s.named_task(grant.name)} {s.named_queue(grant.name)}",
    ]
    for capability in grant.capabilities:
        subscribe.append(f"{s.capability_task(capability)} {s.capability_queue(capability)}")
        subscribe.append(f"{s.help(capability)} {s.help_queue(capability)}")
    # Its own PING at start (proves its endpoints are routed), and the peers' INFO (what each
    # peer tool's agent does): discovery only, no task subjects.
    publish += [s.micro_ping_one("*"), s.micro_info]
    subscribe += micro_discovery(s.micro_service)  # nats.micro discovery of the instance
    # The live output of its tasks (chorus.agent.streaming): JetStream publishes, acked.
    publish += [s.all_task_streams, *stream_info(s.chunk_stream)]
    # Cancel and steer (chorus.agent.run_control): hear cancels, read the control records.
    subscribe.append(s.all_run_cancels)
    publish += stream_read(s.control_kv_stream)
    if grant.publishes:
        publish += stream_info(s.events_stream)
    if grant.subscribes:
        publish += stream_info(s.events_stream)
        publish += one_consumer(s.events_stream, s.event_consumer(grant.name))
    publish += spend_buckets(s)
    publish += _agent_approvals(grant.name, s)
    publish += effect_ledger(grant.name, s)
    if grant.durable_peer_capabilities or grant.durable_peer_agents:
        publish += durable_peer_calls(grant, s)
    if grant.sessions:
        publish += sessions(grant.name, s)
        subscribe.append(s.session_interrupts(grant.name))
    if grant.state:
        publish += stream_info(s.state_stream)
        for prefix in grant.state:
            keys = s.state_keys(prefix)
            publish += keys  # put, update, delete (a KV write is a publish on the key subject)
            publish += [_api("DIRECT.GET", s.state_stream, key) for key in keys]
    return Permissions(
        publish=_unique(publish),
        publish_deny=DESTRUCTIVE,
        subscribe=_unique(subscribe),
        responses=Responses(expires_s=reply_within_s),
    )


def spend_buckets(s: Subjects) -> list[str]:
    """Model calls draw on the shared limits and pauses and charge the budget accounts
    (chorus.spend): any key of both buckets, since a run's account is charged by every agent
    the run reaches. A key of these buckets is trusted by every agent: see docs/security.md."""
    publish = []
    for bucket in (s.limits_bucket, s.budgets_bucket):
        stream = f"KV_{bucket}"
        publish += [f"$KV.{bucket}.>", *stream_ensure(stream), *stream_read(stream)]
        publish += ephemeral_consumers(stream)
    return publish


def _agent_approvals(name: str, s: Subjects) -> list[str]:
    """Park its own tasks: write and read its approvals and parked tasks (never another
    agent's), announce them; deciding is for people (the gateway, the CLI)."""
    bucket, stream = s.approvals_bucket, s.approvals_stream
    keys = [f"$KV.{bucket}.{s.approval_keys(name)}", f"$KV.{bucket}.{s.parked_keys(name)}"]
    return [
        *keys,
        *[_api("DIRECT.GET", stream, key) for key in keys],
        *stream_ensure(stream),
        s.approval_notice(name, "*"),
    ]


def _deciding(s: Subjects) -> list[str]:
    """Decide approvals and send the resume task to the agent's dispatch queue."""
    stream = s.approvals_stream
    return [
        f"$KV.{s.approvals_bucket}.>",
        s.all_approval_notices,
        s.dispatch("agent.*"),
        *stream_ensure(stream),
        *stream_read(stream),
        *ephemeral_consumers(stream),
        *snapshot_reads(stream),
    ]


def effect_ledger(agent: str, subjects: Subjects) -> list[str]:
    """Its own records of the effect ledger (chorus.tools.ledger keys them `<agent>.`): write,
    direct get, and the snapshot read of `records()`, a pull consumer whose filter nats-py
    puts in the API subject (`CONSUMER.CREATE.<stream>.<name>.<filter>`, which nats-server
    checks against the request). Fetching names the consumer only: `MSG.NEXT` on any consumer
    of the bucket (their names are random and cannot be listed)."""
    s = subjects
    stream = s.kv_stream(s.effects_bucket)
    own = s.kv_subject(s.effects_bucket, f"{agent}.>")
    return [
        *stream_info(stream),
        own,
        _api("DIRECT.GET", stream, own),
        _api("CONSUMER.CREATE", stream, "*", own),
        _api("CONSUMER.INFO", stream, "*"),
        _api("CONSUMER.MSG.NEXT", stream, "*"),
    ]


def durable_peer_calls(grant: AgentGrant, subjects: Subjects) -> list[str]:
    """Durable peer tools (chorus.client.durable.TaskQueue): publish to the dispatch subject of
    each peer it names, look the dispatch stream up, and read outcomes: get by key (the key is
    in the request body: `STREAM.MSG.GET`, any key of the bucket) and the tail on the outcome
    keys (an ephemeral consumer, its filter in the body). Both reach every task's outcome:
    outcome keys are task ids, which carry no agent name."""
    s = subjects
    targets = [dispatch_target(capability=c) for c in grant.durable_peer_capabilities]
    targets += [dispatch_target(agent=a) for a in grant.durable_peer_agents]
    return [
        *(s.dispatch(target) for target in targets),
        *stream_info(s.dispatch_stream),
        *stream_info(s.tasks_stream),
        _api("STREAM.MSG.GET", s.tasks_stream),
        _api("CONSUMER.CREATE", s.tasks_stream),
    ]


def sessions(agent: str, subjects: Subjects) -> list[str]:
    """Its own conversation sessions (chorus.agent.sessions keys them under the agent name):
    write its records `session.<agent>.<id>` and turn tickets `turn.<agent>.<id>.<ticket>`,
    read its records by direct get (the key in the API subject), watch its sessions' tickets
    through a named ordered consumer (nats-py puts the filter in the API subject,
    `CONSUMER.CREATE.<stream>.<name>.<filter>`, which nats-server checks against the
    request), and publish its sessions' interrupts. Never another agent's."""
    s = subjects
    stream = s.sessions_stream
    records = s.session_subject(s.session_keys(agent))
    tickets = s.session_subject(s.agent_turn_keys(agent))
    return [
        *stream_info(stream),
        records,
        tickets,
        _api("DIRECT.GET", stream, records),
        _api("CONSUMER.CREATE", stream, "*", tickets),
        f"$JS.FC.{stream}.>",
        s.session_interrupts(agent),
    ]


def coordinator(subjects: Subjects, *, principal: str) -> Permissions:
    """Registry from heartbeats, dispatch to instances, outcomes, dead letters, metrics."""
    s = subjects
    publish = [
        s.all_status,
        s.all_instance_tasks,
        s.all_dead_letters,
        f"$KV.{s.agents_bucket}.>",
        f"$KV.{s.tasks_bucket}.>",
        _api("INFO"),
        *stream_own(s.dispatch_stream),
        *consumers_all(s.dispatch_stream),
        *stream_own(s.dead_letter_stream),
        # It creates what agents may only use, so agents can start once it runs.
        *stream_own(s.events_stream),
        *stream_own(s.chunk_stream),
        *stream_own(s.state_stream),
        *_deciding(s),  # the sweep: expiries and unsent resumes
        *stream_own(s.approvals_stream),
        # Creates the run control bucket agents read; reads it before dispatching a task.
        *stream_own(s.control_kv_stream),
        *stream_read(s.control_kv_stream),
        *stream_own(s.kv_stream(s.sessions_bucket)),
        *stream_own(s.kv_stream(s.effects_bucket)),
        # Creates the spend buckets with CHORUS_REPLICAS (agents make a missing one with one).
        *stream_own(s.kv_stream(s.limits_bucket)),
        *stream_own(s.kv_stream(s.budgets_bucket)),
    ]
    for bucket in (s.agents_bucket, s.tasks_bucket):
        publish += [*stream_own(f"KV_{bucket}"), *stream_read(f"KV_{bucket}")]
        publish += consumers_all(f"KV_{bucket}")
    subscribe = [
        f"{inbox(principal)}.>",
        s.all_heartbeats,
        f"{s.metrics} {s.coordinator_queue}",
        *micro_discovery(s.role_service("coordinator")),
    ]
    return Permissions(
        publish=_unique(publish),
        publish_deny=DESTRUCTIVE,
        subscribe=subscribe,
        responses=Responses(expires_s=60),
    )


def orchestrator(subjects: Subjects, *, principal: str) -> Permissions:
    """Runs from the runs queue, run records, progress, steps as durable or direct tasks."""
    s = subjects
    runs_kv = f"KV_{s.runs_bucket}"
    tasks_kv = f"KV_{s.tasks_bucket}"
    publish = [
        s.all_runs,
        s.all_dispatch,
        s.capability_task("*"),
        s.named_task("*"),
        s.all_instance_tasks,
        s.all_events,
        s.micro_ping,  # which agents run, for hierarchical workflows' plans
        s.runs_dead_letter,
        s.all_run_resumes,  # a human step timed out (chorus.orchestrator.waits)
        f"$KV.{s.runs_bucket}.>",
        _api("INFO"),
        *stream_own(s.runs_stream),
        *stream_ensure(s.dead_letter_stream),
        *one_consumer(s.runs_stream, s.runs_consumer),
        *stream_own(runs_kv),
        *stream_read(runs_kv),
        *consumers_all(runs_kv),
        *stream_ensure(s.dispatch_stream),
        *stream_ensure(tasks_kv),
        *stream_read(tasks_kv),  # outcomes: read, never written
        *ephemeral_consumers(tasks_kv),  # the tail on the outcome keys (chorus.client.durable)
        *stream_own(s.events_stream),
        *ephemeral_consumers(s.events_stream),
        # runs' budget accounts: opened when a run starts, read before each step
        f"$KV.{s.budgets_bucket}.>",
        *stream_ensure(f"KV_{s.budgets_bucket}"),
        *stream_read(f"KV_{s.budgets_bucket}"),
    ]
    subscribe = [
        f"{inbox(principal)}.>",
        s.all_run_cancels,
        s.all_runs,
        *micro_discovery(s.role_service("orchestrator")),
    ]
    return Permissions(
        publish=_unique(publish),
        publish_deny=DESTRUCTIVE,
        subscribe=subscribe,
        responses=Responses(expires_s=10),  # answers to $SRV requests
    )


def gateway(subjects: Subjects, *, principal: str) -> Permissions:
    """Submit, read, list and cancel runs; read the registry and the coordinator's metrics;
    follow the traffic an observer may see (the console's tail)."""
    s = subjects
    runs_kv = f"KV_{s.runs_bucket}"
    agents_kv = f"KV_{s.agents_bucket}"
    publish = [
        s.run_submit(),
        s.all_run_cancels,
        s.all_run_resumes,  # POST /api/runs/{id}/input
        s.metrics,
        f"$KV.{s.runs_bucket}.>",  # the pending record, and cancelling a pending run
        f"$KV.{s.control_bucket}.>",  # cancelled markers, steer messages
        _api("INFO"),
        *stream_ensure(s.control_kv_stream),
        *stream_read(s.control_kv_stream),
        *stream_ensure(s.runs_stream),
        *stream_ensure(runs_kv),
        *stream_read(runs_kv),
        *ephemeral_consumers(runs_kv),
        *snapshot_reads(runs_kv),
        *stream_ensure(agents_kv),
        *stream_read(agents_kv),
        *ephemeral_consumers(agents_kv),
        # GET /api/runs/{id}/stream: ordered consumers on the live output, its last message
        *stream_ensure(s.chunk_stream),
        *stream_read(s.chunk_stream),
        *ephemeral_consumers(s.chunk_stream),
        *_deciding(s),  # GET /api/approvals, POST /api/approvals/{id}
    ]
    subscribe = [
        f"{inbox(principal)}.>",
        *s.observable,  # run progress, and the console's tail (GET /api/tail/stream)
        *micro_discovery(s.role_service("gateway")),
    ]
    return Permissions(
        publish=_unique(publish),
        publish_deny=DESTRUCTIVE,
        subscribe=subscribe,
        responses=Responses(expires_s=10),  # answers to $SRV requests
    )


def operator() -> Permissions:
    """People and scripts with the `chorus` CLI or the `nats` CLI: everything."""
    return Permissions(publish=[">"], subscribe=[">"])


def observer(subjects: Subjects, *, principal: str) -> Permissions:
    """Dashboards and auditors: see traffic and stored state, change nothing, take no work.

    Request subjects are not readable: a subscriber there could join a queue group and swallow
    tasks it cannot answer.
    """
    s = subjects
    readable = [
        s.all_events,
        s.all_heartbeats,
        s.all_status,
        s.all_runs,
        s.all_run_cancels,
        s.all_dead_letters,
        s.all_task_streams,
        f"$KV.{s.agents_bucket}.>",
        f"$KV.{s.tasks_bucket}.>",
        f"$KV.{s.runs_bucket}.>",
        f"$KV.{s.state_bucket}.>",
        f"$KV.{s.approvals_bucket}.>",
        s.all_approval_notices,
        f"$KV.{s.control_bucket}.>",
    ]
    publish = [
        s.metrics,
        *(
            f"$SRV.{verb}.{service}"
            for verb in MICRO_VERBS
            for service in (
                s.micro_service,
                *(s.role_service(r) for r in ("coordinator", "orchestrator", "gateway")),
            )
        ),
        _api("INFO"),
        _api("STREAM.NAMES"),
        _api("STREAM.LIST"),
        _api("STREAM.INFO.*"),
        _api("CONSUMER.INFO.*.*"),
        _api("CONSUMER.LIST.*"),
        _api("CONSUMER.NAMES.*"),
    ]
    # Ephemeral consumers only on streams that are not work queues (a consumer on a work
    # queue would take its messages).
    for stream in (
        s.events_stream,
        s.dead_letter_stream,
        s.chunk_stream,
        f"KV_{s.agents_bucket}",
        f"KV_{s.tasks_bucket}",
        f"KV_{s.runs_bucket}",
        s.state_stream,
        s.approvals_stream,
        s.control_kv_stream,
    ):
        publish += [*stream_read(stream), *ephemeral_consumers(stream)]
    publish += snapshot_reads(f"KV_{s.runs_bucket}")
    return Permissions(
        publish=_unique(publish),
        publish_deny=DESTRUCTIVE,
        subscribe=[f"{inbox(principal)}.>", *readable],
    )
