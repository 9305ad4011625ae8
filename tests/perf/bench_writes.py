"""What a JetStream KV write costs, one at a time, pipelined, and in atomic batches, with the
server fsyncing every write (``sync_interval: always``, as fleetwave runs it) and with its
default (fsync every 2 minutes): what batching the coordinator's writes saves; and to a memory
stream, where fleetwave keeps the observed bucket (agents' reports, one write each).

Usage: python tests/perf/bench_writes.py [--writes 5000] [--payload 730] [--json]

One fresh single server per mode (R1; file storage, then memory storage under ``always``), a KV
bucket that allows atomic batches, and
bare nats-py (no fleetwave code on the write path). Figures per mode:

- one at a time: each put awaited before the next (``--writes`` / 10 of them): latency per write;
- pipelined: every put in flight at once (256 at a time), as ``Bus.kv_put_all`` writes;
- atomic batches of 500 (the coordinator's ``FENCED_BATCH``) and 1,000 (the server's most), one
  batch after another: per write and per batch.

Under ``always`` each message of a pipelined burst is one fsync; an atomic batch is stored with
one. The difference is this disk's fsync rate, the floor the control plane meets on one server.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perf_support import atomic_put, emit

from coordinator.dev.broker import Broker

BUCKET = "bench-writes"


async def measure(sync_always: bool, writes: int, payload: int, *,
                  memory: bool = False) -> dict[str, Any]:
    import nats
    from nats.js import api as js_api

    store = Path(tempfile.mkdtemp(prefix="fw-writes-"))
    broker = Broker(store_dir=store, sync_always=sync_always)
    await broker.start()
    try:
        nc = await nats.connect(broker.url)
        try:
            js = nc.jetstream()
            kv = await js.create_key_value(
                bucket=BUCKET, history=1,
                storage=js_api.StorageType.MEMORY if memory else js_api.StorageType.FILE)
            config = (await js.stream_info(f"KV_{BUCKET}")).config
            config.allow_atomic = True
            await js.update_stream(config)
            value = b"x" * payload
            keys = [f"node-{i}.hello" for i in range(writes)]
            out: dict[str, Any] = {"sync": "always" if sync_always else "default",
                                   "storage": "memory" if memory else "file",
                                   "writes": writes, "payload": payload}

            few = keys[: max(10, writes // 10)]
            started = time.perf_counter()
            for k in few:
                await kv.put(k, value)
            out["one_at_a_time_ms"] = round((time.perf_counter() - started) / len(few) * 1e3, 3)

            sem = asyncio.Semaphore(256)

            async def put(k: str) -> None:
                async with sem:
                    await kv.put(k, value)

            started = time.perf_counter()
            await asyncio.gather(*(put(k) for k in keys))
            elapsed = time.perf_counter() - started
            out["pipelined_ms_per_write"] = round(elapsed / writes * 1e3, 4)
            out["pipelined_s"] = round(elapsed, 3)

            for size in (500, 1000):
                started = time.perf_counter()
                batches = 0
                for i in range(0, writes, size):
                    await atomic_put(nc, kv._pre, [(k, value) for k in keys[i:i + size]])
                    batches += 1
                elapsed = time.perf_counter() - started
                out[f"atomic_{size}_ms_per_write"] = round(elapsed / writes * 1e3, 4)
                out[f"atomic_{size}_ms_per_batch"] = round(elapsed / batches * 1e3, 2)
                out[f"atomic_{size}_s"] = round(elapsed, 3)
            return out
        finally:
            await nc.close()
    finally:
        await broker.stop()
        shutil.rmtree(store, ignore_errors=True)


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("one at a time", f"{r['one_at_a_time_ms']:.3f} ms a write"),
        ("pipelined", f"{r['pipelined_ms_per_write']:.4f} ms a write ({r['pipelined_s']:.3f} s)"),
        ("atomic batches of 500", f"{r['atomic_500_ms_per_write']:.4f} ms a write, "
                                  f"{r['atomic_500_ms_per_batch']:.2f} ms a batch"),
        ("atomic batches of 1000", f"{r['atomic_1000_ms_per_write']:.4f} ms a write, "
                                   f"{r['atomic_1000_ms_per_batch']:.2f} ms a batch"),
    ]


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--writes", type=int, default=5000)
    ap.add_argument("--payload", type=int, default=730, help="bytes (a signed desired state)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    results = []
    for sync_always, memory in ((True, False), (False, False), (True, True)):
        r = await measure(sync_always, args.writes, args.payload, memory=memory)
        results.append(r)
        if not args.json:
            emit(False, f"{args.writes} KV writes of {args.payload} B, one server, "
                 f"{r['storage']} storage, sync_interval {r['sync']}", r, rows(r))
    if args.json:
        emit(True, "", {"writes": results}, [])
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
