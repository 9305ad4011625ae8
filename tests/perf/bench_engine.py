"""The engine's cost per step over a whole rolling rollout, in process: no server, no signing,
the real engine (``coordinator.core``) and the store's page diff (``pages.dirty``, told the nodes
the steps took, as the executor tells it), every node
converging on whatever it is told.

Usage: python tests/perf/bench_engine.py [--nodes 1000,10000,50000] [--reports 100] [--json]

A step handles ``--reports`` node reports at once (the runner batches what arrives while it is
busy), as a 10 %-wave rolling rollout with the rolling strategy's default pre-staging runs from
start to success. Figures per fleet size: steps, the engine's CPU (``Rollout.handle_all``) and
the page diff's (what a persist compares) in all and per step. The issue's promise is a step that
costs O(the nodes it is about), not O(fleet): with the same reports a step, the per-step figures
should not grow with the fleet.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perf_support import emit

from coordinator.core import pages
from coordinator.core.engine import (
    ObservedChanged,
    Rollout,
    Start,
    Tick,
    WriteDesired,
    new_record,
    worst_case_sizes,
)
from protocol.messages import DesiredState, NodeView
from protocol.testing import NEW, desired, report, router_stats, spec

DEFAULT_SIZES = "1000,10000"


def measure(n: int, per_step: int) -> dict[str, Any]:
    views = [NodeView(id=f"sim-{i}", online=True) for i in range(1, n + 1)]
    current = {v.id: desired(v.id) for v in views}
    rec = new_record(id="hello-bench", spec=spec(batch="10%", max_unavailable="10%", prestage=""),
                     release=NEW, nodes=views, current=current, now=1.0)
    head, sizes = worst_case_sizes(rec, {v.id: router_stats() for v in views})
    layout = pages.fit(rec, head, sizes, max_payload=1 << 20, reserve=512_000)
    rollout = Rollout(rec, fleet="f")
    told: collections.OrderedDict[str, DesiredState] = collections.OrderedDict()
    engine = diff = 0.0
    steps = 0
    now = 2.0

    def step(events: list[Any]) -> None:
        nonlocal engine, diff, steps
        before = rollout.record
        t = time.process_time()
        commands = rollout.handle_all(events, now) if events else rollout.handle(Tick(), now)
        engine += time.process_time() - t
        t = time.process_time()
        pages.dirty(before, rollout.record, layout, rollout.touched)
        diff += time.process_time() - t
        rollout.persisted(rollout.record)
        steps += 1
        for c in commands:
            if isinstance(c, WriteDesired):
                told.pop(c.desired.node, None)
                told[c.desired.node] = c.desired

    commands = rollout.handle(Start(), now)
    for c in commands:
        if isinstance(c, WriteDesired):
            told[c.desired.node] = c.desired
    while not rollout.done:
        now += 0.01
        batch = [told.popitem(last=False) for _ in range(min(per_step, len(told)))]
        step([ObservedChanged(node, report(d, now)) for node, d in batch])
        if steps > 100 * n:
            raise SystemExit(f"the rollout over {n} nodes did not end: {rollout.state}")
    return {"nodes": n, "reports_a_step": per_step, "state": rollout.state, "steps": steps,
            "engine_s": round(engine, 3), "diff_s": round(diff, 3),
            "engine_step_ms": round(1000 * engine / steps, 3),
            "diff_step_ms": round(1000 * diff / steps, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default=DEFAULT_SIZES, help="comma-separated fleet sizes")
    ap.add_argument("--reports", type=int, default=100, help="node reports a step handles")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    try:
        sizes = [int(s) for s in args.nodes.split(",")]
    except ValueError:
        ap.error(f"--nodes {args.nodes!r}: write comma-separated whole numbers, e.g. 1000,10000")
    if args.reports < 1 or any(s < 10 for s in sizes):
        ap.error("--reports must be 1 or more and every --nodes size 10 or more")
    for n in sizes:
        r = measure(n, args.reports)
        emit(args.json, f"the engine over a rolling rollout of {n} nodes, {args.reports} reports "
                        "a step", r, [
            ("steps", f"{r['steps']} (ended {r['state']})"),
            ("engine CPU", f"{r['engine_s']:.3f} s, {r['engine_step_ms']:.3f} ms a step"),
            ("page diff CPU", f"{r['diff_s']:.3f} s, {r['diff_step_ms']:.3f} ms a step"),
        ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
