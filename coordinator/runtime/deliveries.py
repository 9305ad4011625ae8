"""Consumers that deliver somewhere else than an inbox: removed.

A push consumer's deliver subject is in the body of its create request, where no permission
looks: a node may make a consumer of its own desired keys or of the releases, an operator one of
any stream of the fleet, that delivers onto any subject of the fleet's account, a stream's
subject among them. The server wakes such a consumer only for a subscription on exactly that
subject while it runs, but counts any matching one (the target stream's own) when it recovers
its consumers at a restart, and then the stream stores the deliveries: measured (session 23,
nats-server 2.15.1, both in one account and in the fleet's own accounts): an operator's consumer
of the events stream delivering onto the lease key filled the lease stream at the third restart;
two consumers delivering onto each other's streams (lease to events, events to lease) looped,
86,250 messages within seconds, the lease key rewritten at every turn.

Every client of the fleet's delivers to an inbox (``INBOXES``: nats-py's ``_INBOX.``, nodes'
``_FWN.<node>``, operators' ``_FWO.<name>``, and the names of releases before session 23), and
no stream of the fleet takes a subject starting with ``_``. So:

- ``guard`` (the leader, for as long as it leads): each such consumer is deleted as soon as the
  server audits its creation (or its update: a create naming an existing consumer re-points it),
  and said with who made it. JetStream publishes an audit of every API call it answers
  (``$JS.EVENT.ADVISORY.API``: the subject, the request, the response, the client), in the
  account that holds the streams, for calls that came from the nodes' and operators' accounts
  too. The response names the consumer and its deliver subject: no request of ours is needed
  for the thousands of watches a fleet makes (the sweep costs a consumer info each).
  Measured before (session 37): a node's consumer of the releases delivering onto the pace
  every agent hears cost every agent that traffic until the next sweep, up to 5 minutes.
- ``sweep`` (the leader, when it starts leading, after each reconnect and every
  ``SWEEP_EVERY``): every consumer of
  the fleet's streams with another deliver subject is deleted, and said (a warning per
  consumer: someone with credentials of the fleet made it). It catches what the guard missed:
  advisories are not stored (one sent while no leader listened, or dropped by a slow consumer).
- ``sweep_store`` (``fleetwave broker``, before its server starts): the same consumers' files
  in a stopped server's store are removed, so that a restart never wakes them (the leader's
  sweep comes after the server has recovered them). Not for a cluster member's store: the
  cluster's meta group keeps each consumer's assignment and would make it again; there the
  leader's sweep alone acts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import psutil

from coordinator.errors import BrokerError
from protocol.bus import Bus
from protocol.errors import BusError

log = logging.getLogger("fleetwave.coordinator.deliveries")

INBOXES = ("_INBOX.", "_FWN.", "_FWO.", "_INBOX_", "_OPS_")
# Listing consumers costs the server a consumer info each (a node's watch is one: 50,000 at
# 50,000 nodes, ~50 MB of answers a sweep); what it guards against needs a server restart.
SWEEP_EVERY = 300.0
RETRY = 30.0
LOOK = 0.5  # how often the loop looks for a reconnect


AUDIT = "$JS.EVENT.ADVISORY.API"  # JetStream's audit of each API call it answers
CREATES = ("$JS.API.CONSUMER.CREATE.", "$JS.API.CONSUMER.DURABLE.CREATE.")
# The audits' pending bytes the leader may hold while its callback catches up (it takes ~1 us
# an audit): ~40,000 audits of ~1.5 KB, most of a 50,000-node fleet re-making its watches at
# once (a server restart). Beyond it the client drops audits; the sweep still comes.
AUDIT_PENDING = 64 * 1024 * 1024


def foreign(deliver_subject: str) -> bool:
    """Whether a push consumer delivers somewhere else than a client's inbox."""
    return bool(deliver_subject) and not deliver_subject.startswith(INBOXES)


class _Client(msgspec.Struct):
    """Who made an API call, as the server's audit says it (``ClientInfo``)."""

    acc: str = ""
    user: str = ""
    name: str = ""


class _Audit(msgspec.Struct):
    """The parts of JetStream's API audit advisory read here (the rest is ignored)."""

    subject: str = ""
    response: str = ""
    client: _Client = msgspec.field(default_factory=_Client)


class _Config(msgspec.Struct):
    deliver_subject: str = ""


class _Made(msgspec.Struct):
    """A consumer create's response: the consumer as the server made it (an error has none)."""

    stream_name: str = ""
    name: str = ""
    config: _Config = msgspec.field(default_factory=_Config)


_AUDIT = msgspec.json.Decoder(_Audit)
_MADE = msgspec.json.Decoder(_Made)


def made_foreign(audit: bytes, streams: frozenset[str]) -> tuple[str, str, str, str] | None:
    """(stream, consumer, deliver subject, who) when ``audit`` (an API audit advisory) says a
    consumer of one of ``streams`` was made or updated to deliver elsewhere than an inbox; else
    None (another call, another stream, an error, or anything that does not parse)."""
    if b"CONSUMER.CREATE." not in audit and b"CONSUMER.DURABLE.CREATE." not in audit:
        return None  # most audits: cheaper than decoding them
    try:
        a = _AUDIT.decode(audit)
        if not a.subject.startswith(CREATES):
            return None
        made = _MADE.decode(a.response)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if made.stream_name not in streams or not made.name or not foreign(made.config.deliver_subject):
        return None
    return made.stream_name, made.name, made.config.deliver_subject, _who(a.client)


# Whose credentials act in each account of a fleet with accounts (``coordinator.auth.perms``).
ROLES = {"OPS": "an operator's", "NODES": "a node's", "FLEET": "the coordinators'"}


def _who(c: _Client) -> str:
    """Whose credentials an audited call came with, as far as the audit says: across accounts
    (a fleet with accounts) the server shares only the caller's account, so its role; within
    one (``$G``, an open fleet) its user and connection name too."""
    said = f"{ROLES.get(c.acc, 'the fleet')}'s credentials" if c.acc not in ROLES \
        else f"{ROLES[c.acc]} credentials"
    facts = [f"account {c.acc}" if c.acc else "", f"user {c.user}" if c.user else "",
             f"connection {c.name!r}" if c.name else ""]
    shown = ", ".join(f for f in facts if f)
    return f"{said} ({shown})" if shown else said


async def guard(bus: Bus, retry: float = RETRY) -> None:
    """Delete each foreign consumer of the fleet's streams as the server audits its creation,
    for as long as it runs (the leader's task; see the module docstring). A subscription the
    server refuses (a ``users.conf`` rendered by an older release: the server answers the SUB
    later, as an error ``Bus`` keeps in ``refused_subscriptions``) is tried again every
    ``retry``, so that it takes once the broker reloads a new ``users.conf``; the sweep still
    runs meanwhile."""
    streams = frozenset(bus.fleet_streams())

    async def audited(_: str, data: bytes) -> None:
        found = made_foreign(data, streams)
        if found is None:
            return
        stream, name, subject, who = found
        try:
            await bus.delete_consumer(stream, name)
        except BusError as exc:
            log.warning("consumer %s of %s delivers onto %r, which is no inbox (made with %s), "
                        "and cannot be deleted: %s; the next sweep tries again", name, stream,
                        subject[:120], who, exc)
            return
        log.warning("deleted consumer %s of %s: it delivered onto %r, which is no inbox "
                    "(made with %s)", name, stream, subject[:120], who)

    while True:
        try:
            await _audited_until_refused(bus, audited)
            log.warning("the server refused the subscription to its audit of consumers made "
                        "(this coordinator's permissions in users.conf predate it: run "
                        "'fleetwave auth prune DIR' and reload the broker); the sweep every %gs "
                        "still removes foreign consumers; trying again every %gs", SWEEP_EVERY,
                        retry)
        except BusError as exc:
            log.warning("cannot watch the server's audit of consumers made: %s; the sweep "
                        "every %gs still removes foreign ones; trying again in %gs", exc,
                        SWEEP_EVERY, retry)
        except Exception:  # a guard's bug must never end the leadership it runs in
            log.exception("watching the server's audit of consumers made failed; trying "
                          "again in %gs", retry)
        await asyncio.sleep(retry)  # (a broker not reloaded yet refuses it again)


async def _audited_until_refused(bus: Bus, audited: Callable[[str, bytes], Awaitable[None]],
                                 ) -> None:
    """Hand ``audited`` the server's audits until the server refuses the subscription (nats-py
    makes it again after each reconnect by itself). BusError if it cannot be made."""
    sub = await bus.subscribe(AUDIT, audited, pending_bytes=AUDIT_PENDING)
    try:
        while not bus.refused_subscription(AUDIT):
            bus.subscription_refused.clear()
            await bus.subscription_refused.wait()
        bus.forgive(AUDIT)
    finally:
        await bus.unsubscribe(sub)


async def sweep(bus: Bus) -> list[str]:
    """Delete every consumer of the fleet's streams that delivers elsewhere than an inbox;
    ``stream/consumer -> subject`` of each deleted. BusError if a stream cannot be read."""
    removed: list[str] = []
    for stream in bus.fleet_streams():
        for name, subject in await bus.push_consumers(stream):
            if foreign(subject):
                await bus.delete_consumer(stream, name)
                log.warning("deleted consumer %s of %s: it delivered onto %r, which is no "
                            "inbox (someone with the fleet's credentials made it)",
                            name, stream, subject[:120])
                removed.append(f"{stream}/{name} -> {subject}")
    return removed


async def sweep_loop(bus: Bus, every: float = SWEEP_EVERY) -> None:
    """``sweep`` now, every ``every`` seconds, and at once after each reconnect (a server that
    restarted has just recovered its consumers), for as long as it runs (the leader's task);
    a sweep that fails is tried again after ``RETRY``."""
    loop = asyncio.get_running_loop()
    due, seen = loop.time(), bus.reconnects
    while True:
        if loop.time() >= due or bus.reconnects != seen:
            seen = bus.reconnects
            try:
                await sweep(bus)
                due = loop.time() + every
            except BusError as exc:
                log.warning("cannot check the fleet's consumers: %s; trying again in %gs",
                            exc, RETRY)
                due = loop.time() + RETRY
            except Exception:  # a guard's bug must never end the leadership it runs in
                log.exception("checking the fleet's consumers failed; trying again in %gs", RETRY)
                due = loop.time() + RETRY
        await asyncio.sleep(LOOK)


class StoreInUse(BrokerError):
    """A running process holds files of the store: it is a live server's."""


def store_server(store_dir: Path) -> tuple[int, str] | None:
    """(pid, name) of a running process that serves the store in ``store_dir``, or None: one
    with a file in it open (a server's message blocks, its log), or a nats-server whose command
    line names it (``-sd``, ``--store_dir``) or names a config file that does (``store_dir:``,
    as ``fleetwave broker`` writes one into the store). nats-server takes no lock on its store,
    and an idle one closes its message blocks (after 30 s): its files alone do not tell.
    Processes this user may not look into are passed over (as root, none is)."""
    root = os.path.realpath(store_dir)
    me = os.getpid()
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.pid == me:
            continue
        name = proc.info.get("name") or ""
        try:
            if any(f.path.startswith(root + os.sep) for f in proc.open_files()):
                return proc.pid, name
            if "nats-server" in name and root in _stores_named(proc):
                return proc.pid, name
        except (psutil.Error, OSError):
            continue
    return None


_STORE_DIR = re.compile(r"""^\s*store_dir\s*[:=]?\s*["']?([^"'\s#]+)""", re.MULTILINE)


def _stores_named(proc: psutil.Process) -> set[str]:
    """The store dirs a nats-server's command line names, directly or in its config file."""
    argv = proc.info.get("cmdline") or []
    named: list[str] = []
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag in ("-sd", "--store_dir", "-c", "--config") and not eq:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        if flag in ("-sd", "--store_dir"):
            named.append(value)
        elif flag in ("-c", "--config") and value:
            with (Path(proc.cwd()) / value).open(encoding="utf-8", errors="replace") as f:
                named += _STORE_DIR.findall(f.read(1 << 20))
    return {os.path.realpath(Path(proc.cwd()) / d) for d in named if d}


def sweep_store(store_dir: Path) -> list[Path]:
    """Remove, from a stopped server's store (``<store_dir>/jetstream``), the files of every
    consumer that delivers elsewhere than an inbox (``foreign``); the directories removed.
    Nothing in a cluster member's store (see the module docstring). StoreInUse, and nothing
    removed, if a running process serves it (``store_server``)."""
    js = store_dir / "jetstream"
    server = store_server(store_dir)
    if server is not None:
        pid, name = server
        raise StoreInUse(
            f"the JetStream store in {store_dir} is in use by {name or 'a process'} (pid {pid}): "
            "a live server's store is neither swept nor shared; stop it first, or give this "
            "broker another --store-dir")
    if (js / "$SYS" / "_js_").exists():
        return []
    removed: list[Path] = []
    for meta in sorted(js.glob("*/streams/*/obs/*/meta.inf")):
        try:
            subject = json.loads(meta.read_bytes()).get("deliver_subject") or ""
        except (OSError, ValueError, AttributeError):
            continue  # not ours to judge (an encrypted store, a file being written)
        if isinstance(subject, str) and foreign(subject):
            shutil.rmtree(meta.parent, ignore_errors=True)
            log.warning("removed consumer %s of %s from the store: it delivered onto %r, "
                        "which is no inbox", meta.parent.name, meta.parent.parent.parent.name,
                        subject[:120])
            removed.append(meta.parent)
    return removed
