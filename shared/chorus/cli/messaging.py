"""`chorus pub`, `chorus req`, `chorus tail`: publish, request, and follow subjects.

`req --stream` prints a task's live output (on stderr) while it waits for the reply; `tail`
shows live output condensed (chorus.cli.live)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from chorus.cli import wire
from chorus.cli.history import Replay, Source, overlap, sources
from chorus.cli.live import Condenser, TextPrinter, drain, follow_chunks
from chorus.cli.times import iso
from chorus.client import ChorusClient
from chorus.config import Settings
from chorus.errors import ConfigError, NoResponders, RequestTimeout
from chorus.messages import ErrorReply, Event, StreamChunk, Task, decode, stream_key
from chorus.nats import wire as outbound
from chorus.nats.connection import connect

KIND_COLOURS = {
    "task": "cyan",
    "result": "green",
    "error": "red",
    "event": "magenta",
    "heartbeat": "dim",
    "agent_status": "yellow",
    "task_outcome": "green",
    "dead_letter": "red",
    "stream_chunk": "blue",
}


def register(sub: Any) -> None:
    pub = sub.add_parser(
        "pub",
        help="publish a message (events are stored in JetStream)",
        description="Publish DATA to SUBJECT. On Chorus subjects the payload is validated "
        "against the message type and a wrong field is named. On chorus.event.<topic> a "
        "payload that is not an Event becomes the event's data.",
        epilog='examples:\n  chorus pub chorus.event.findings.new \'{"claim": "x"}\'\n'
        "  chorus pub chorus.event.findings.new @finding.json\n"
        "  echo '{}' | chorus pub some.subject -",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pub.add_argument("subject")
    pub.add_argument("data", nargs="?", help="JSON payload, @file, or - for stdin")
    pub.set_defaults(func=publish)

    req = sub.add_parser(
        "req",
        help="send a request and print the reply",
        description="Send DATA to SUBJECT and print the reply (decoded). Exits 1 on an error "
        "reply, 2 when nobody answers. With --stream (task subjects), the agent's live "
        "output is printed on stderr as it comes, then the reply on stdout.",
        epilog='examples:\n  chorus req chorus.cap.research.task \'{"input": "what is NATS?"}\'\n'
        '  chorus req --stream chorus.cap.research.task \'{"input": "what is NATS?"}\'',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    req.add_argument("subject")
    req.add_argument("data", nargs="?", help="JSON payload, @file, or - for stdin")
    req.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    req.add_argument(
        "--stream", action="store_true", help="print the task's text as it comes (on stderr)"
    )
    req.set_defaults(func=request)

    tail = sub.add_parser(
        "tail",
        help="follow subjects with decoded messages",
        description="Follow PATTERNs (default: every Chorus subject) and print each message "
        "decoded: time (ISO 8601 UTC; for a stored message, when it was stored), subject, "
        "type, run, agent, short payload. Run progress is not stored: it is live only.",
        epilog="examples:\n  chorus tail\n  chorus tail 'chorus.event.>' --run 3f2a...\n"
        "  chorus tail --agent researcher --json\n"
        "  chorus tail --history --run RUN_ID     # replay the run's stored history, then follow\n"
        "  chorus tail --history --count 20 'chorus.event.>'\n"
        "  chorus tail --replies --no-heartbeats  # with the outcomes of durable tasks",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tail.add_argument("patterns", nargs="*", metavar="PATTERN")
    tail.add_argument("--run", help="only messages of this run id")
    tail.add_argument("--agent", help="only messages from or about this agent or instance")
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    tail.add_argument("--raw", action="store_true", help="print payloads as they are")
    tail.add_argument(
        "--history",
        action="store_true",
        help="first replay what the streams hold for these subjects (events, live output of "
        "tasks, dead letters), oldest first, each with the time it was stored",
    )
    tail.add_argument(
        "--replies",
        action="store_true",
        help="also show the recorded outcomes of durable tasks (KV <prefix>-tasks); answers "
        "to plain requests go to the requester's private inbox and are not shown",
    )
    tail.add_argument("--no-heartbeats", action="store_true", help="hide heartbeats")
    tail.add_argument(
        "--count", type=int, default=0, help="stop after N messages (history included)"
    )
    tail.set_defaults(func=follow)


async def publish(args: argparse.Namespace, settings: Settings) -> int:
    payload = wire.prepare(settings.subjects, args.subject, wire.read_payload(args.data))
    nc = await connect(settings, "chorus-cli")
    try:
        if settings.subjects.classify(args.subject) == "event":
            event = decode(payload, Event)
            await ChorusClient(nc, settings.subjects).publish_event(event)
            print(f"stored event {event.event_id} in {settings.subjects.events_stream}")
        else:
            await outbound.publish(nc, args.subject, payload)
            await nc.flush(timeout=5)
            print(f"published {len(payload)} bytes to {args.subject}")
    finally:
        await nc.close()
    return 0


async def request(args: argparse.Namespace, settings: Settings) -> int:
    payload = wire.prepare(settings.subjects, args.subject, wire.read_payload(args.data))
    if args.stream and settings.subjects.classify(args.subject) != "task":
        raise ConfigError(
            f"--stream follows a task: {args.subject} is not a task subject (for example "
            f"{settings.subjects.capability_task('research')})"
        )
    nc = await connect(settings, "chorus-cli")
    try:
        if args.stream:
            reply = await _streamed_request(nc, settings, args, decode(payload, Task), payload)
        else:
            reply = await outbound.request(nc, args.subject, payload, timeout=args.timeout)
    except NoRespondersError:
        raise NoResponders(
            f"nobody listens on {args.subject}: is an agent running for it?"
        ) from None
    except NatsTimeout:
        raise RequestTimeout(f"no reply on {args.subject} within {args.timeout}s") from None
    finally:
        await nc.close()
    message = wire.decoded(settings.subjects, args.subject, reply.data)
    print(json.dumps(wire.to_builtins(message), indent=2, default=str))
    return 1 if isinstance(message, ErrorReply) else 0


async def _streamed_request(
    nc: Client, settings: Settings, args: argparse.Namespace, task: Task, payload: bytes
) -> Msg:
    """The request, with the task's live output printed on stderr until its answer."""
    printer = TextPrinter(sys.stderr)
    client = ChorusClient(nc, settings.subjects)
    # `prepare` wrote the task's id into the payload: the agent streams under that one.
    live = client.stream(task.run_id, stream_key(task), max_age_s=settings.stream_max_age)
    async with live as chunks:
        following = asyncio.create_task(follow_chunks(chunks, printer.show))
        try:
            reply = await outbound.request(nc, args.subject, payload, timeout=args.timeout)
        finally:
            following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await following
        await drain(chunks, printer.show)
    printer.end()
    return reply


class Printer:
    def __init__(self, args: argparse.Namespace, settings: Settings) -> None:
        self.args = args
        self.subjects = settings.subjects
        from rich.console import Console  # imported here: agents never load rich

        self.console = Console(highlight=False, soft_wrap=True)
        self.printed = 0
        self.done = asyncio.Event()
        self.condenser = Condenser()

    def wanted(self, msg: Msg, message: Any) -> bool:
        if self.args.no_heartbeats and self.subjects.classify(msg.subject) == "heartbeat":
            return False
        if self.args.run and wire.run_id_of(message, msg.headers) != self.args.run:
            return False
        if self.args.agent:
            agent = wire.agent_of(message)
            if self.args.agent not in (agent, *msg.subject.split(".")) and not agent.startswith(
                f"{self.args.agent}-"
            ):
                return False
        return True

    def show(self, msg: Msg, at: float) -> None:
        """Print one message, stamped `at` (when it was stored, or received)."""
        if self.done.is_set() or msg.subject.startswith("_INBOX."):
            return
        message = wire.decoded(self.subjects, msg.subject, msg.data)
        if not self.wanted(msg, message):
            return
        if self.args.json:
            line = {
                "time": iso(at),
                "subject": msg.subject,
                "headers": msg.headers or {},
                "type": wire.type_of(message),
                "data": wire.to_builtins(message),
            }
            print(json.dumps(line, default=str), flush=True)
        elif self.args.raw:
            print(f"{msg.subject} {msg.data.decode(errors='replace')}", flush=True)
        else:
            if isinstance(message, StreamChunk):  # a task's deltas gather into one line
                summaries = self.condenser.lines(msg.subject, message)
                if not summaries:
                    return
            else:
                summaries = [wire.short(message)]
            for summary in summaries:
                self._print(msg, message, summary, at)
        self.printed += 1
        if self.args.count and self.printed >= self.args.count:
            self.done.set()

    def _print(self, msg: Msg, message: Any, summary: str, at: float) -> None:
        from rich.markup import escape

        kind = wire.type_of(message)
        colour = KIND_COLOURS.get(kind, "white")
        run = wire.run_id_of(message, msg.headers)
        agent = wire.agent_of(message)
        parts = [
            f"[dim]{iso(at)}[/]",
            f"[bold]{escape(msg.subject)}[/]",
            f"[{colour}]{kind}[/]",
        ]
        if run:
            parts.append(f"run={escape(run[:12])}")
        if agent:
            parts.append(f"agent={escape(agent)}")
        parts.append(escape(summary))
        tools = wire.tools_line(message)
        if tools:
            parts.append(f"[magenta]{escape(tools)}[/]")
        self.console.print(" ".join(parts))


async def _follow(
    nc: Client, patterns: list[str], printer: Printer, replay: Replay, *, history: bool
) -> list[str]:
    """Subscribe to every pattern: what streams store through `replay` (from their start
    with `history`), the rest as core subscriptions. Returns what is followed, for people."""
    followed: list[str] = []
    stored: list[Source] = []
    if history:
        js = nc.jetstream()
        for pattern in patterns:
            stored += [s for s in await sources(js, pattern) if s not in stored]
    for source in stored:
        await replay.add(nc, source, history=True)

    async def on_core(msg: Msg) -> None:
        if any(overlap(msg.subject, s.subject) is not None for s in stored):
            return  # the stream's consumer delivers it
        if replay.replaying:  # live: after the stored ones
            replay.backlog.append((time.time(), len(replay.backlog), msg))
        else:
            printer.show(msg, time.time())

    for pattern in patterns:
        await nc.subscribe(pattern, cb=on_core)
        followed.append(pattern)
    followed += [f"{s.subject} (stored in {s.stream})" for s in stored]
    return followed


async def follow(args: argparse.Namespace, settings: Settings) -> int:
    patterns = list(dict.fromkeys(args.patterns or [f"{settings.prefix}.>"]))
    printer = Printer(args, settings)
    replay = Replay(printer.show)
    nc = await connect(settings, "chorus-tail")
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, printer.done.set)
    try:
        followed = await _follow(nc, patterns, printer, replay, history=args.history)
        if args.replies:
            # Outcomes of durable tasks, as recorded (the tasks bucket's stream); plain
            # request-reply answers go to private inboxes and are not shown.
            outcomes = Source(settings.subjects.tasks_stream, settings.subjects.all_outcomes)
            await replay.add(nc, outcomes, history=args.history)
            followed.append(f"task outcomes ({outcomes.subject})")
        await nc.flush(timeout=5)
        print(f"following {', '.join(followed)} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        if not await replay.play():
            print("chorus: some stored messages did not arrive in time", file=sys.stderr)
        await printer.done.wait()
    finally:
        await nc.close()
    return 0
