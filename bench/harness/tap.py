"""A tap: a process that records every message the server routes, with the time the kernel
received it, so a benchmark can tell which process a request or a workflow step was waiting
for. A bare NATS protocol reader (nats-py would hide the socket); its times are only as prompt
as nats-server's writes to it, so trust them on a quiet machine. It is never running while
the figures it explains are measured."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

TIMEOUT_S = 30.0

# Every message the server routes, with the kernel's receive time of the TCP segment that
# completed it (SO_TIMESTAMPNS, CLOCK_REALTIME), so the tap's own scheduling delays do not
# move the timestamps. A bare NATS protocol reader: nats-py would hide the socket. One line
# per message, tab-separated, until stdin closes, with the task id from the Chorus-Task-Id
# header or from a tasks-bucket key in the body, and which key (`outcome` or `attempts`).
TAP = r"""
import json, re, selectors, socket, struct, sys
KV_KEY = re.compile(rb"\.(outcome|attempts)\.([A-Za-z0-9_=-]+)")
host, port, out = sys.argv[1], int(sys.argv[2]), open(sys.argv[3], "w")
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
sock = socket.create_connection((host, port))
sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
connect = {"verbose": False, "pedantic": False, "headers": True, "name": "tap"}
sock.sendall(b"CONNECT " + json.dumps(connect).encode() + b"\r\nSUB > 1\r\nPING\r\n")
buffer, ready = b"", False

def parse(stamp):
    global buffer, ready
    while True:
        end = buffer.find(b"\r\n")
        if end < 0:
            return
        head = buffer[:end].split()
        verb = head[0] if head else b""
        if verb in (b"MSG", b"HMSG"):
            size = int(head[-1])
            if len(buffer) < end + 2 + size + 2:
                return
            body = buffer[end + 2 : end + 2 + size]
            buffer = buffer[end + 2 + size + 2 :]
            reply = head[3] if len(head) == (5 if verb == b"MSG" else 6) else b""
            status, task, hint = "", "", ""
            if verb == b"HMSG":
                lines = body[: int(head[-2])].split(b"\r\n")
                first = lines[0].split()
                status = first[1].decode() if len(first) > 1 else ""
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"chorus-task-id":
                        task = value.strip().decode()
            key = KV_KEY.search(head[1]) or KV_KEY.search(body)
            if key:
                hint, task = key.group(1).decode(), key.group(2).decode()
            row = (stamp, head[1].decode(), reply.decode(), status, task, hint)
            out.write("\t".join(map(str, row)) + "\n")
            continue
        buffer = buffer[end + 2 :]
        if verb == b"PING":
            sock.sendall(b"PONG\r\n")
        elif verb == b"PONG" and not ready:
            ready = True
            print("ready", flush=True)

selector = selectors.DefaultSelector()
selector.register(sock, selectors.EVENT_READ)
selector.register(sys.stdin, selectors.EVENT_READ)
while True:
    for key, _ in selector.select():
        if key.fileobj is sys.stdin:
            if not sys.stdin.readline():
                out.close()
                sys.exit(0)
            continue
        data, ancillary, _, _ = sock.recvmsg(1 << 20, 1024)
        if not data:
            sys.exit("server closed the connection")
        stamp = 0
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                seconds, nanos = struct.unpack("qq", value[:16])
                stamp = seconds * 1_000_000_000 + nanos
        buffer += data
        parse(stamp)
"""


@dataclass(frozen=True)
class Wire:
    """One message as the tap saw it."""

    at: int  # time_ns (CLOCK_REALTIME), when the kernel received it
    subject: str
    reply: str
    status: str
    task: str
    hint: str


@contextlib.asynccontextmanager
async def tapped(url: str, out: Path) -> AsyncIterator[list[Wire]]:
    """Run the tap for the block; the list is filled with what it saw once the block ends."""
    seen: list[Wire] = []
    host, _, port = url.removeprefix("nats://").rpartition(":")
    tap = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        TAP,
        host,
        port,
        str(out),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert tap.stdin is not None and tap.stdout is not None
    await asyncio.wait_for(tap.stdout.readline(), TIMEOUT_S)
    try:
        yield seen
    finally:
        await asyncio.sleep(0.2)  # the last messages of the last request are still on the way
        tap.stdin.close()
        await asyncio.wait_for(tap.wait(), TIMEOUT_S)
    seen.extend(read_wire(out))


def read_wire(path: Path) -> list[Wire]:
    wire = []
    for line in path.read_text().splitlines():
        at, subject, reply, status, task, hint = line.split("\t")
        wire.append(Wire(int(at), subject, reply, status, task, hint))
    return wire


class Trace:
    """What the tap saw, in wire order, searchable by subject from a position on. Idle
    heartbeats of pull requests (status 100) are left out."""

    def __init__(self, wire: list[Wire]) -> None:
        kept = [w for w in wire if w.status != "100"]
        self.events = sorted(kept, key=lambda w: w.at)  # stable: keeps the wire order
        self.by_subject: dict[str, list[int]] = {}
        for position, event in enumerate(self.events):
            self.by_subject.setdefault(event.subject, []).append(position)

    def first(self, subject: str, after: int, *, published: bool = True) -> int | None:
        """Position of the first message on `subject` after position `after`. `published`:
        only what a client published, not JetStream's deliveries of it to a consumer."""
        for position in self.by_subject.get(subject, []):
            if position > after and not (
                published and self.events[position].reply.startswith("$JS.ACK.")
            ):
                return position
        return None

    def first_where(self, test: Callable[[str], bool], after: int) -> int | None:
        """Position of the first message after `after` whose subject passes `test`."""
        return next(
            (p for p in range(after + 1, len(self.events)) if test(self.events[p].subject)),
            None,
        )

    def answer(self, request: int | None) -> int | None:
        """Position of the reply to a request (the first message on its reply subject)."""
        if request is None or not self.events[request].reply:
            return None
        return self.first(self.events[request].reply, request, published=False)

    def time(self, position: int | None) -> int | None:
        return None if position is None else self.events[position].at
