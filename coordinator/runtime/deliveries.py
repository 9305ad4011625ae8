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

- ``sweep`` (the leader, when it starts leading, after each reconnect and every
  ``SWEEP_EVERY``): every consumer of
  the fleet's streams with another deliver subject is deleted, and said (a warning per
  consumer: someone with credentials of the fleet made it).
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
import shutil
from pathlib import Path

from protocol.bus import Bus
from protocol.errors import BusError

log = logging.getLogger("fleetwave.coordinator.deliveries")

INBOXES = ("_INBOX.", "_FWN.", "_FWO.", "_INBOX_", "_OPS_")
# Listing consumers costs the server a consumer info each (a node's watch is one: 50,000 at
# 50,000 nodes, ~50 MB of answers a sweep); what it guards against needs a server restart.
SWEEP_EVERY = 300.0
RETRY = 30.0
LOOK = 0.5  # how often the loop looks for a reconnect


def foreign(deliver_subject: str) -> bool:
    """Whether a push consumer delivers somewhere else than a client's inbox."""
    return bool(deliver_subject) and not deliver_subject.startswith(INBOXES)


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


def sweep_store(store_dir: Path) -> list[Path]:
    """Remove, from a stopped server's store (``<store_dir>/jetstream``), the files of every
    consumer that delivers elsewhere than an inbox (``foreign``); the directories removed.
    Nothing in a cluster member's store (see the module docstring)."""
    js = store_dir / "jetstream"
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
