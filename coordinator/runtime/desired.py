"""Writing desired states: signed, and only ever forward by generation.

Each desired state goes to ``fw-<fleet>-desired/<node>.<service>`` as a signed envelope, and only
if the stored generation is lower, so re-issuing a write is harmless (a resumed rollout re-writes
all it intends). A key whose revision this writer knows (it wrote the key last) costs one
compare-and-set, and many such keys go out as one pipelined batch (``Bus.kv_update_all``); any
other key, or one that lost its compare-and-set, is read and compared first (``write``),
``WRITE_CONCURRENCY`` at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from coordinator.runtime.calls import Retrying, bounded
from coordinator.runtime.ports import RunnerBus
from protocol import subjects
from protocol.codec import decode, encode
from protocol.errors import BusError, Conflict, ProtocolError
from protocol.messages import DesiredState, SignedEnvelope
from protocol.signing import sign

WRITE_CONCURRENCY = 64  # desired writes read-then-written at once (each is two KV round trips)


class DesiredWriter:
    """Signs with ``seed`` and writes desired states of one fleet; see the module docstring."""

    def __init__(self, bus: RunnerBus, *, seed: bytes, retrying: Retrying) -> None:
        self.bus = bus
        self.bucket = subjects.desired_bucket(bus.fleet)
        self._seed = seed
        self._retrying = retrying
        # (revision, generation) of every desired key this writer wrote: the next write of the
        # key is then one compare-and-set instead of a read and a write (a miss reads first).
        self._revs: dict[str, tuple[int, int]] = {}

    async def write_all(self, pending: Sequence[DesiredState]) -> None:
        """Write ``pending`` (one per key): those whose stored revision is known as one
        pipelined batch of compare-and-sets, the rest (and those that lost theirs) through
        ``write``, WRITE_CONCURRENCY at a time, each retried."""
        known: list[tuple[str, DesiredState, int]] = []
        slow: list[DesiredState] = []
        for desired in pending:
            key = subjects.node_service_key(desired.node, desired.service)
            rev = self._revs.get(key)
            if rev is not None and rev[1] < desired.generation:
                known.append((key, desired, rev[0]))
            else:
                slow.append(desired)
        if known:
            for key, _, _ in known:
                del self._revs[key]  # unknown until this write's ack says otherwise
            try:
                results: list[int | BusError] = await self.bus.kv_update_all(
                    self.bucket,
                    [(key, encode(sign(self._seed, d)), rev) for key, d, rev in known])
            except BusError as exc:
                results = [exc] * len(known)
            for (key, desired, _), result in zip(known, results, strict=True):
                if isinstance(result, int):
                    self._revs[key] = (result, desired.generation)
                else:
                    slow.append(desired)  # read it and compare generations, then write
        if slow:
            sem = asyncio.Semaphore(WRITE_CONCURRENCY)

            async def one(desired: DesiredState) -> None:
                async with sem:
                    await self._retrying(lambda: self.write(desired))

            async with asyncio.TaskGroup() as tg:
                for desired in slow:
                    tg.create_task(one(desired))

    async def write(self, desired: DesiredState) -> bool:
        """Sign and store ``desired`` unless the stored generation is >=; True if written."""
        key = subjects.node_service_key(desired.node, desired.service)
        known = self._revs.pop(key, None)
        if known is not None and known[1] < desired.generation:
            data = encode(sign(self._seed, desired))
            try:
                rev = await bounded(self.bus.kv_update(self.bucket, key, data, known[0]))
                self._revs[key] = (rev, desired.generation)
                return True
            except Conflict:
                pass  # written by someone else since: read it and compare generations
        for _ in range(5):
            entry = await bounded(self.bus.kv_get(self.bucket, key))
            if entry is not None and entry.value is not None:
                try:
                    stored = decode(SignedEnvelope, entry.value).generation
                except ProtocolError:
                    stored = 0  # unreadable: replace it with a valid state
                if stored >= desired.generation:
                    return False
            data = encode(sign(self._seed, desired))
            try:
                if entry is None:
                    rev = await bounded(self.bus.kv_create(self.bucket, key, data))
                else:
                    rev = await bounded(self.bus.kv_update(self.bucket, key, data,
                                                           entry.revision))
                self._revs[key] = (rev, desired.generation)
                return True
            except Conflict:
                continue  # written in between: read again and compare generations
        raise BusError(f"desired state {key} keeps changing under us; is a second coordinator "
                       "writing it?")
