"""How many copies of a stream a NATS cluster keeps (CHORUS_REPLICAS), and the errors of it.

JetStream places each of a stream's N replicas on a different server: more replicas than
servers is refused (a clear ConfigError naming the setting here), and so is a placement while
one of the N servers is offline — which is also how a just-formed cluster answers until every
node has told the meta leader it is up: that refusal is asked again for a few seconds, and
so is "JetStream temporarily unavailable" (no meta leader). A read about a stream (its info,
a consumer of it) gets no answer at all while the cluster elects the stream's leader (seconds
after a node dies): reads are asked again on no answer too. A create or update is not: under
NATS authorization a request the principal may not send gets no answer either, and waiting
out an election there would only delay the refusal.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import APIError, ServiceUnavailableError

from chorus.errors import ConfigError

log = logging.getLogger("chorus.nats.replicas")

T = TypeVar("T")

NO_PLACEMENT = 10005  # "no suitable peers for placement" (", peer offline" when one is down)
# The server's answers to more replicas than it has servers for.
TOO_FEW_PEERS = {
    NO_PLACEMENT,
    10023,  # "insufficient resources"
    10074,  # "replicas > 1 not supported in non-clustered mode" (a single server)
}
OFFLINE_WAIT_S = 15.0  # an offline peer or a leaderless cluster is waited for this long
# A leader being elected: no answer (a read), or 503 "temporarily unavailable".
_UNANSWERED = (nats.errors.TimeoutError, nats.errors.NoRespondersError)


def peer_offline(exc: APIError) -> bool:
    return exc.err_code == NO_PLACEMENT and "offline" in (exc.description or "")


def replicas_error(exc: APIError, stream: str, replicas: int | None) -> ConfigError | None:
    """The clear error for a replica count the NATS system cannot hold now, or None."""
    if exc.err_code not in TOO_FEW_PEERS or not replicas or replicas < 2:
        return None
    if peer_offline(exc):
        return ConfigError(
            f"CHORUS_REPLICAS={replicas}, but NATS cannot place {replicas} copies of stream "
            f"{stream} now ({exc.description}): start the cluster's stopped server, or set "
            "CHORUS_REPLICAS to at most the number of servers running"
        )
    return ConfigError(
        f"CHORUS_REPLICAS={replicas}, but NATS cannot keep {replicas} copies of stream "
        f"{stream} ({exc.description}): set CHORUS_REPLICAS to at most the number of "
        "JetStream servers in the cluster (1 for a single server)"
    )


async def until_settled(
    make: Callable[[], Awaitable[T]],
    stream: str,
    replicas: int | None,
    *,
    unanswered: bool = False,
    within: float = OFFLINE_WAIT_S,
) -> T:
    """`make()`, a JetStream API request about `stream` that may be sent again: a refusal
    for an offline peer, "temporarily unavailable" and, with `unanswered` (reads), no answer
    are asked again with a backoff for `within` seconds; a replica count the system cannot
    hold is a ConfigError naming CHORUS_REPLICAS."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    delay = 0.1
    while True:
        try:
            return await make()
        except _UNANSWERED:
            if not unanswered or loop.time() + delay >= deadline:
                raise
            log.info("waiting for a stream's cluster leader", extra={"stream": stream})
        except APIError as exc:
            settling = peer_offline(exc) or isinstance(exc, ServiceUnavailableError)
            if not settling or loop.time() + delay >= deadline:
                raise (replicas_error(exc, stream, replicas) or exc) from None
            log.info("waiting for the cluster to place a stream", extra={"stream": stream})
        await asyncio.sleep(delay)  # backoff while the cluster elects or a peer reports in
        delay = min(delay * 2, 1.0)


async def ensure_replicas(js: JetStreamContext, stream: str, replicas: int | None) -> None:
    """Raise an existing stream's (a bucket's) copies to `replicas`; never lowers them (that
    is an operator's decision), and None leaves them as they are."""
    if replicas is None:
        return
    info = await until_settled(lambda: js.stream_info(stream), stream, None, unanswered=True)
    config = info.config
    if (config.num_replicas or 1) >= replicas:
        return
    log.info(
        "raising the replica count of a stream",
        extra={"stream": stream, "from": config.num_replicas, "to": replicas},
    )
    raised = dataclasses.replace(config, num_replicas=replicas)
    await until_settled(lambda: js.update_stream(raised), stream, replicas)
