"""History benchmark: ``rollouts``, ``status`` and ``rollback`` after 10 and after 100,000
rollouts, and the store's size before and after retention.

Usage: python tests/perf/bench_history.py [--rollouts 100000] [--services 10] [--keep 50]
       [--repeat 20] [--no-scan] [--json]

A fresh broker (the real nats-server) holds two fleets. ``small`` gets 10 finished rollouts
through the store's own per-rollout path (``RolloutStore.create`` then ``persist`` of the
terminal record: record, index and retention in one fenced atomic write each). ``big`` gets
``--rollouts`` finished rollouts of ``--services`` services (4 nodes each, previous and target
desired states in every node's progress, as a real record holds) written as a coordinator from
before the indexes left them, in fenced atomic batches of 500 for setup speed; then the store's
real rebuild (``History.ensure``: one scan, the indexes, and retention keeping ``--keep`` per
service whole) runs once, timed, and the rollouts stream's size is read before and after.

Then each reading verb's handler (``coordinator.api.rollouts``) is timed on both fleets, median
of ``--repeat`` calls, as the leader answers it (indexes in memory, records read from KV) and as
a standby does (every index read from KV): ``rollouts`` (the fleet's 50 newest), ``rollouts
--service`` (one service's 50 newest), ``status`` (the latest, whole), ``status`` of the oldest
rollout (reduced: its summary) and ``rollback``'s lookup (``RolloutsApi.rollback_plan``: the
version before the last success, and that rollout's settings). The figure that matters is the
ratio big/small of each. ``--no-scan`` skips timing what the previous version did for
``rollouts`` (a scan decoding every record), kept as the comparison.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perf_support import emit, run_dir, run_main

from coordinator.api.rollouts import RolloutsApi
from coordinator.core.history import Retention
from coordinator.dev.broker import Broker
from coordinator.runtime.daemon import _Current
from coordinator.runtime.lease import Fenced, write_fences
from coordinator.runtime.runner import Runner
from coordinator.runtime.store import RolloutStore
from protocol import subjects
from protocol.bus import Bus
from protocol.codec import encode
from protocol.messages import (
    DesiredState,
    ListRolloutsRequest,
    NodeProgress,
    ReleaseRef,
    RolloutRecord,
    RolloutRequest,
    RolloutSpec,
    WaveRecord,
)
from protocol.signing import generate_seed

NODES = 4
T0 = 1.7e9


def record(fleet: str, service: str, i: int, state: str = "succeeded") -> RolloutRecord:
    """Rollout ``i`` of ``service``: version i.0.0 over 4 nodes in 2 waves, finished."""
    old = ReleaseRef(service=service, version=f"{i - 1}.0.0", digest="sha256:" + "0" * 64)
    new = ReleaseRef(service=service, version=f"{i}.0.0", digest="sha256:" + "1" * 64)
    nodes = {}
    for n in range(NODES):
        node = f"node-{n + 1}"
        prev = DesiredState(fleet=fleet, node=node, service=service, generation=2 * i,
                            slots={"a": old}, weights={"a": 100})
        target = DesiredState(fleet=fleet, node=node, service=service, generation=2 * i + 1,
                              slots={"a": old, "b": new}, weights={"b": 100})
        nodes[node] = NodeProgress(node=node, wave=n // 2, state="done", previous=prev,
                                   target=target, healthy=True, version=new.version,
                                   generation=2 * i + 1, slot="b")
    created = T0 + i * 60.0
    waves = [WaveRecord(index=w, nodes=[f"node-{2 * w + 1}", f"node-{2 * w + 2}"],
                        state="passed", started=created + w, finished=created + w + 1,
                        gates={"outcome": "pass", "requests": 1000, "errors": 0})
             for w in range(2)]
    return RolloutRecord(id=f"{service}-{i:07d}", spec=RolloutSpec(service=service,
                                                                     version=new.version),
                         release=new, from_version=old.version, state=state,  # type: ignore[arg-type]
                         created=created, updated=created + 2, finished=created + 2,
                         waves=waves, nodes=nodes, started_by="ci")


async def stream_bytes(bus: Bus, fleet: str) -> int:
    info = await bus.js.stream_info(subjects.kv_stream(subjects.rollouts_bucket(fleet)))
    return int(info.state.bytes)


async def leader(bus: Bus, keep: int) -> Runner:
    """A runner of a leadership of ``bus``'s fleet (nothing else runs: reads and writes only)."""
    await bus.ensure_fleet(1)
    fence = await write_fences(bus, term=1, holder="bench", now=time.time())
    return Runner(bus, seed=generate_seed(), fenced=Fenced(bus, fence), nodes=lambda: [],
                  retention=Retention(keep))


def standby(bus: Bus) -> _Current:
    """The reading side of ``coordinator.api.rollouts.Runner`` as a standby serves it: the
    daemon's own (``_Current`` of a coordinator with no runner), every index read from KV.
    ``_Current`` reads only ``runner``, ``store`` and ``fleet_name`` of its coordinator, and a
    whole Coordinator would connect and subscribe: a namespace stands in for it."""
    return _Current(SimpleNamespace(runner=None, store=RolloutStore(bus),  # type: ignore[arg-type]  # a namespace for the Coordinator, see above
                                    fleet_name=bus.fleet))


def api_of(runner: Any) -> RolloutsApi:
    async def resolve(service: str, version: str) -> ReleaseRef:
        raise AssertionError("the bench deploys nothing")
    return RolloutsApi(runner, resolve=resolve, public_key="")


async def median_ms(call: Callable[[], Awaitable[Any]], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        await call()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1000, 3)


async def verbs(api: RolloutsApi, service: str, oldest: str, repeat: int) -> dict[str, float]:
    """Median ms of each reading verb's handler."""
    out = {
        "rollouts": await median_ms(lambda: api.rollouts(ListRolloutsRequest(), "b"), repeat),
        "rollouts_service": await median_ms(
            lambda: api.rollouts(ListRolloutsRequest(service=service), "b"), repeat),
        "status_latest": await median_ms(lambda: api.status(RolloutRequest(id=""), "b"), repeat),
        "status_oldest": await median_ms(lambda: api.status(RolloutRequest(id=oldest), "b"),
                                         repeat),
        "rollback_lookup": await median_ms(lambda: api.rollback_plan(service), repeat),
    }
    st = await api.status(RolloutRequest(id=oldest), "b")
    out["oldest_summarised"] = bool(st.get("summarised"))
    return out


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    services = [f"svc{s}" for s in range(args.services)]
    with run_dir("fw-bench-history-") as base:
        broker = Broker(store_dir=base / "js")
        await broker.start()
        try:
            small_bus = await Bus.connect(broker.url, "small")
            big_bus = await Bus.connect(broker.url, "big")
            try:
                return await _measure(args, services, small_bus, big_bus)
            finally:
                await small_bus.close()
                await big_bus.close()
        finally:
            await broker.stop()


async def _measure(args: argparse.Namespace, services: list[str], small_bus: Bus,
                   big_bus: Bus) -> dict[str, Any]:
    small = await leader(small_bus, args.keep)
    t = time.perf_counter()
    for i in range(1, 11):
        rec = record("small", services[i % len(services)], i)
        await small.store.create(RolloutRecord(id=rec.id, spec=rec.spec, release=rec.release,
                                               from_version=rec.from_version,
                                               created=rec.created, nodes=rec.nodes))
        await small.store.persist(rec)
    small_write_ms = (time.perf_counter() - t) * 1000 / 10

    big = await leader(big_bus, args.keep)
    writer = big.store.writer
    bucket = subjects.rollouts_bucket("big")
    per = args.rollouts // len(services)
    t = time.perf_counter()
    chunk: list[tuple[str, bytes | None]] = []
    sample = b""
    for i in range(1, per + 1):
        for service in services:
            rec = record("big", service, i, "rolled_back" if i % 10 == 0 else "succeeded")
            data = encode(rec)
            sample = sample or data
            chunk.append((rec.id, data))
        if len(chunk) >= 5000 or i == per:
            results = await writer.write_all(bucket, chunk)
            bad = [r for r in results if isinstance(r, Exception)]
            if bad:
                raise RuntimeError(f"setup write failed: {bad[0]}")
            chunk = []
    setup_s = time.perf_counter() - t
    before = await stream_bytes(big_bus, "big")

    scan_s = None
    if not args.no_scan:  # what the previous version did for every `rollouts`
        t = time.perf_counter()
        await big.store.records()
        scan_s = round(time.perf_counter() - t, 2)

    t = time.perf_counter()
    await big.store.history.ensure()  # the rebuild: indexes and retention, the store's own
    rebuild_s = round(time.perf_counter() - t, 2)
    after = await stream_bytes(big_bus, "big")

    oldest_small = record("small", services[1 % len(services)], 1).id
    oldest_big = record("big", services[0], 1).id
    figures: dict[str, Any] = {
        "rollouts": per * len(services), "services": len(services), "keep": args.keep,
        "record_bytes": len(sample), "setup_s": round(setup_s, 1),
        "small_write_ms_per_rollout": round(small_write_ms, 2),
        "store_mib_before": round(before / 2**20, 1), "store_mib_after": round(after / 2**20, 1),
        "rebuild_s": rebuild_s, "old_scan_s": scan_s,
    }
    for role, make in (("leader", lambda r, b: r), ("standby", lambda r, b: standby(b))):
        s = await verbs(api_of(make(small, small_bus)), services[1 % len(services)],
                        oldest_small, args.repeat)
        b = await verbs(api_of(make(big, big_bus)), services[0], oldest_big, args.repeat)
        figures[role] = {"small": s, "big": b}
    return figures


def rows(f: dict[str, Any]) -> list[tuple[str, str]]:
    out = [
        ("record size (4 nodes, 2 waves)", f"{f['record_bytes']} B"),
        ("small: write through the store", f"{f['small_write_ms_per_rollout']} ms per rollout "
                                           "(create + terminal persist)"),
        (f"big: setup ({f['rollouts']} records, batched)", f"{f['setup_s']} s"),
        ("rollouts stream before retention", f"{f['store_mib_before']} MiB"),
        (f"rebuild + retention (keep {f['keep']}/service)", f"{f['rebuild_s']} s"),
        ("rollouts stream after retention", f"{f['store_mib_after']} MiB"),
    ]
    if f["old_scan_s"] is not None:
        out.append(("previous version's scan (every rollouts)", f"{f['old_scan_s']} s"))
    for role in ("leader", "standby"):
        s, b = f[role]["small"], f[role]["big"]
        for key in ("rollouts", "rollouts_service", "status_latest", "status_oldest",
                    "rollback_lookup"):
            ratio = b[key] / s[key] if s[key] else float("nan")
            out.append((f"{role}: {key}", f"{s[key]:.2f} ms at 10, {b[key]:.2f} ms at "
                                          f"{f['rollouts']} ({ratio:.2f}x)"))
    return out


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rollouts", type=int, default=100_000)
    ap.add_argument("--services", type=int, default=10)
    ap.add_argument("--keep", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--no-scan", action="store_true", help="skip timing the old full scan")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    f = await measure(args)
    emit(args.json, f"rollout history: 10 vs {f['rollouts']} finished rollouts "
         f"({f['services']} services)", f, rows(f))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main()))
