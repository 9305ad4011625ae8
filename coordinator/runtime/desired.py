"""Writing desired states: signed with the leader's term, and only ever forward by generation.

Each desired state goes to ``fw-<fleet>-desired/<node>.<service>`` as a signed envelope, through
the leadership's ``Fenced`` writer (so nothing lands once another coordinator leads), and only if
the stored generation is lower, so re-issuing a write is harmless (a resumed rollout re-writes
all it intends). A key this writer wrote in this term holds what it wrote (no one else writes
while the fence holds), so its next write needs no read: many such keys go out as one pipelined
batch. Any other key is read and compared first: a few one by one (``write``),
``WRITE_CONCURRENCY`` at a time; more than ``SCAN_FROM`` of one service (a leader's first wave
over thousands of nodes) by one scan of that service's keys, after which they go out in the
batch too. One read and one fsync a key took 29 s for a 10,000-node first wave (50,000 nodes,
staging one wave ahead), past the deploy request's 30 s; the scan and the batch take well
under a second. The states of one batch for nodes whose agents take batch signatures are signed
with one signature (``protocol.signing.sign_batch``); the others one by one.

For the same reason the writer can say what every key of a service holds once it has read them
all in this term (``current``: a deploy plans from each node's current state): every write it
makes after keeps that true, so the next deploy of the service reads no bucket (reading 10,000
states back took 0.7 s of every deploy's start). A read that overlaps one of its writes to the
service is not kept, and a write whose outcome is unknown forgets the service.
"""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence

from coordinator.runtime.calls import Retrying, all_of, bounded, scanned
from coordinator.runtime.lease import Deposed, Fenced
from coordinator.runtime.ports import RunnerBus
from protocol import subjects
from protocol.bus import FENCED_BATCH
from protocol.codec import decode, encode
from protocol.errors import BusError, ProtocolError
from protocol.messages import DesiredState, SignedEnvelope
from protocol.signing import sign, sign_batch

WRITE_CONCURRENCY = 64  # desired writes read-then-written at once (each is two KV round trips)
SCAN_FROM = 256  # more unknown keys of one service than this: one scan reads them all
# A batch of at most this many states is signed on the loop (~0.1 ms a state with its encoding),
# not handed to a worker thread: the hand-off and the loop's wait to take the GIL back cost
# several milliseconds under load, on the path of every small wave (a rolling wave of 2 nodes:
# its switch written ~4 ms sooner, measured).
SIGN_HERE = 16


class DesiredWriter:
    """Signs with ``seed`` and writes desired states of one fleet; see the module docstring."""

    def __init__(self, bus: RunnerBus, *, seed: bytes, fenced: Fenced,
                 retrying: Retrying, batchable: Callable[[str], bool] | None = None) -> None:
        self.bus = bus
        self.bucket = subjects.desired_bucket(bus.fleet)
        self._seed = seed
        self._fenced = fenced
        self._retrying = retrying
        # Which nodes take batch-signed states (``protocol.signing.sign_batch``); None: none.
        self._batchable = batchable
        # The generation stored under every desired key this writer wrote in this term: the next
        # write of the key then needs no read (a key missing here is read first).
        self._gens: dict[str, int] = {}
        # Every desired state of a service, by node, once this writer knows them all (``current``).
        self._current: dict[str, dict[str, DesiredState]] = {}
        # Per service, writes begun and ended: a read during which this moved is not kept.
        self._moves: Counter[str] = Counter()

    async def current(self, service: str,
                      read: Callable[[], Awaitable[dict[str, DesiredState]]]
                      ) -> dict[str, DesiredState]:
        """Every node's stored desired state of ``service`` (a new dict): as this writer knows
        them, else from ``read`` (the bucket), kept if none of our writes to the service began
        or ended meanwhile (a read's snapshot can miss a write still on its way)."""
        known = self._current.get(service)
        if known is not None:
            return dict(known)
        mark = self._moves[service]
        states = await read()
        if self._moves[service] == mark:
            self._current[service] = dict(states)
        return states

    def _moving(self, states: Sequence[DesiredState]) -> None:
        for service in {d.service for d in states}:
            self._moves[service] += 1

    def _stored(self, desired: DesiredState) -> None:
        known = self._current.get(desired.service)
        if known is not None:
            known[desired.node] = desired

    def _unsure(self, desired: DesiredState) -> None:
        """``desired`` may or may not be stored (or something we did not write is): the next
        ``current`` of its service reads the bucket."""
        self._current.pop(desired.service, None)

    def _batched(self, states: Sequence[DesiredState]) -> list[bool]:
        """Which of ``states`` go to nodes that take batch signatures (read on the event loop,
        which owns the node table)."""
        takes = self._batchable
        return [False] * len(states) if takes is None else [takes(d.node) for d in states]

    def _envelopes(self, states: Sequence[DesiredState], term: int,
                   batched: Sequence[bool]) -> list[bytes]:
        """``states`` signed with ``term``, in order (``write_all`` runs it in a worker thread):
        those ``batched`` says with one signature (``sign_batch``), the rest one by one."""
        out = [b""] * len(states)
        batch = [i for i, b in enumerate(batched) if b]
        for i, env in zip(batch, sign_batch(self._seed, [states[i] for i in batch], term=term),
                          strict=True):
            out[i] = encode(env)
        for i, (d, b) in enumerate(zip(states, batched, strict=True)):
            if not b:
                out[i] = encode(sign(self._seed, d, term=term))
        return out

    async def write_all(self, pending: Sequence[DesiredState]) -> None:
        """Write ``pending`` (one per key): those this writer knows the stored generation of as
        one pipelined batch, the rest (and those whose write failed) through ``write``,
        WRITE_CONCURRENCY at a time, each retried. Deposed ends it at once; a failure raises its
        first cause (a BusError, Deposed), never an exception group."""
        await self._learn([d for d in pending
                           if subjects.node_service_key(d.node, d.service) not in self._gens])
        known: list[tuple[str, DesiredState]] = []
        slow: list[DesiredState] = []
        for desired in pending:
            key = subjects.node_service_key(desired.node, desired.service)
            stored = self._gens.get(key)
            if stored is None:
                slow.append(desired)
            elif stored < desired.generation:
                known.append((key, desired))
        # Signed a batch at a time, in worker threads, the next batches while this one is
        # written: a node's agent can verify and apply its state while the coordinator signs
        # the rest (10,000 states signed first took 0.5 s before the first router of a
        # rollback could switch back), and the signing itself (libsodium, outside the GIL)
        # runs on another core than the event loop's. As many batches are written at once as
        # the bus lets await their acks (``Bus.fenced_in_flight``: it sends them in turn), one
        # more signed ahead; each call is bounded on its own (OP_TIMEOUT), so no more are
        # handed over than can travel. A batch that failed sends the rest the slow way too: one
        # bus timeout, not one a batch.
        term = self._fenced.term
        chunks = [known[i:i + FENCED_BATCH] for i in range(0, len(known), FENCED_BATCH)]
        window = asyncio.Semaphore(self._fenced.bus.fenced_in_flight + 1)  # signed or sent
        signing = asyncio.Lock()  # one batch signed at a time, in order: the first goes first
        failed = False

        async def write_chunk(chunk: list[tuple[str, DesiredState]]) -> None:
            nonlocal failed
            states = [d for _, d in chunk]
            async with window:
                if failed:
                    slow.extend(states)
                    return
                async with signing:
                    if len(states) <= SIGN_HERE:
                        bodies = self._envelopes(states, term, self._batched(states))
                    else:
                        bodies = await asyncio.to_thread(self._envelopes, states, term,
                                                         self._batched(states))
                if failed:  # meanwhile
                    slow.extend(states)
                    return
                self._moving(states)
                try:
                    # Each node's state stands alone (its result is its own, a failed one
                    # goes the slow way): a small wave's need not land as one batch.
                    results = await self._fenced.write_all(
                        self.bucket, [(key, body) for (key, _), body in zip(chunk, bodies,
                                                                              strict=True)],
                        atomic=False)
                except BaseException:
                    for desired in states:
                        self._unsure(desired)
                    raise
                finally:
                    self._moving(states)
            for (key, desired), result in zip(chunk, results, strict=True):
                if isinstance(result, Deposed):
                    raise result
                if isinstance(result, int):
                    self._gens[key] = desired.generation
                    self._stored(desired)
                else:
                    failed = True
                    self._gens.pop(key, None)
                    self._unsure(desired)
                    slow.append(desired)  # read it and compare generations, then write

        await all_of(write_chunk(chunk) for chunk in chunks)
        if slow:
            sem = asyncio.Semaphore(WRITE_CONCURRENCY)

            async def one(desired: DesiredState) -> None:
                async with sem:
                    await self._retrying(lambda: self.write(desired))

            await all_of(one(desired) for desired in slow)

    async def _learn(self, unknown: Sequence[DesiredState]) -> None:
        """Read the stored generations of ``unknown``'s keys by one scan per service of which
        more than SCAN_FROM are unknown (a key not there has none: 0). The scan is a snapshot,
        and while the fence holds no one else writes the bucket, so it stays true."""
        by_service: dict[str, list[str]] = {}
        for d in unknown:
            key = subjects.node_service_key(d.node, d.service)
            by_service.setdefault(d.service, []).append(key)
        for service, keys in by_service.items():
            if len(keys) <= SCAN_FROM:
                continue
            scan = functools.partial(scanned, self.bus, self.bucket,
                                     subjects.node_service_key("*", service))
            entries = await self._retrying(scan)
            stored = {e.key: _generation(e.value) for e in entries}
            for key in keys:
                self._gens[key] = stored.get(key, 0)

    async def write(self, desired: DesiredState) -> bool:
        """Sign and store ``desired`` unless the stored generation is >=; True if written."""
        key = subjects.node_service_key(desired.node, desired.service)
        stored = self._gens.get(key)
        if stored is None:
            entry = await bounded(self.bus.kv_get(self.bucket, key))
            stored = _generation(entry.value if entry is not None else None)
            self._gens[key] = stored
        if stored >= desired.generation:
            self._unsure(desired)  # what is stored is not this state: we may not know it
            return False
        [body] = self._envelopes([desired], self._fenced.term, [False])
        self._moving([desired])
        try:
            await self._fenced.put(self.bucket, key, body)
        except Deposed:
            raise
        except BusError:
            self._gens.pop(key, None)  # the write may have landed: read it next time
            self._unsure(desired)
            raise
        except BaseException:  # cancelled: it may have landed too
            self._unsure(desired)
            raise
        finally:
            self._moving([desired])
        self._gens[key] = desired.generation
        self._stored(desired)
        return True


def _generation(value: bytes | None) -> int:
    """The generation of a stored desired state; 0 for none, or one unreadable (it is replaced
    with a valid state)."""
    if not value:
        return 0
    try:
        return decode(SignedEnvelope, value).generation
    except ProtocolError:
        return 0
