"""Fuzz every place hostile input enters, 100,000 cases a target: cases/s and any failure.

Usage: python tests/perf/fuzz_inputs.py [--cases 100000] [--seed 1] [--batch 5000]
           [--only request,bundle] [--json]

The targets, strategies and properties are those of ``tests/hostile`` (the unit tests run the
same properties over a few hundred cases): wire (every Struct of protocol.messages, drawn in turn),
envelope, control, manifest, bundle, request, response, chunked, chunk-line. For each: the cases
run, cases/s, the slowest single case, the most memory one case allocated at once (tracemalloc on
every 50th case), and the failure hypothesis shrank to (if any). Exit 1 if any target failed.

The run is deterministic for a given ``--seed``; a failure printed here is a unit test to write
(the shrunk input as a regression case) and a bug to fix.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests import hostile  # noqa: E402


@dataclass
class Outcome:
    target: str
    cases: int
    seconds: float
    cases_per_s: float
    slowest_case_ms: float
    max_case_alloc_kb: int  # the most one sampled case allocated at once
    failure: str | None


Target = tuple[Any, Callable[[Any], None]]  # a strategy, and the property one case must hold


def targets(workdir: Path, loop: asyncio.AbstractEventLoop) -> dict[str, Target]:
    """Each target's strategy and the property one case must hold."""
    wire = st.sampled_from(hostile.WIRE_STRUCTS).flatmap(
        lambda tp: hostile.wire_inputs(tp).map(lambda data: (tp, data))
    )
    return {
        "wire": (wire, lambda case: hostile.check_wire(*case)),
        "envelope": (hostile.envelopes(), hostile.check_envelope),
        "control": (hostile.control_lines(), hostile.check_control),
        "manifest": (hostile.manifest_texts(), hostile.check_manifest),
        "bundle": (hostile.bundles(), lambda data: hostile.check_bundle(data, workdir)),
        "request": (hostile.request_heads(), hostile.check_request),
        "response": (hostile.response_heads(), hostile.check_response),
        "chunked": (hostile.chunked_bodies(), lambda body: hostile.check_chunked(body, loop)),
        "chunk-line": (
            hostile.chunked_bodies().map(lambda b: b.partition(b"\n")[0] + b"\n"),
            hostile.check_chunk_line,
        ),
    }


MEMORY_SAMPLE = 50  # every 50th case runs under tracemalloc


def run(
    name: str, strategy: Any, prop: Callable[[Any], None], cases: int, rng: int, batch: int
) -> Outcome:
    """Run ``prop`` over ``cases`` drawn cases, in hypothesis runs of ``batch`` (each with its
    own seed: one run's bookkeeping grows with its cases and slows it down)."""
    count = 0
    slowest = 0.0
    worst_alloc = 0

    def fuzz_batch(n: int, batch_seed: int) -> None:
        @seed(batch_seed)
        @settings(
            max_examples=n,
            database=None,
            deadline=None,
            derandomize=False,
            phases=[Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
            report_multiple_bugs=False,
        )
        @given(case=strategy)
        def fuzz(case: Any) -> None:
            nonlocal count, slowest, worst_alloc
            count += 1
            sampled = count % MEMORY_SAMPLE == 0
            if sampled:  # what one case allocates at its peak, on a sample (tracing is slow)
                tracemalloc.start()
            start = time.perf_counter()
            try:
                prop(case)
            finally:
                slowest = max(slowest, time.perf_counter() - start)
                if sampled:
                    worst_alloc = max(worst_alloc, tracemalloc.get_traced_memory()[1])
                    tracemalloc.stop()

        fuzz()

    start = time.perf_counter()
    failure = None
    i = 0
    try:
        while count < cases:
            fuzz_batch(min(batch, cases - count), rng * 1_000_003 + i)
            i += 1
    except Exception as exc:  # the property's AssertionError, or whatever escaped the parser
        failure = f"{type(exc).__name__}: {exc}"
        notes = getattr(exc, "__notes__", [])
        if notes:
            failure += " | " + " | ".join(notes)
    seconds = time.perf_counter() - start
    return Outcome(
        target=name,
        cases=count,
        seconds=round(seconds, 1),
        cases_per_s=round(count / seconds) if seconds else 0,
        slowest_case_ms=round(slowest * 1000, 1),
        max_case_alloc_kb=round(worst_alloc / 1024),
        failure=failure,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=100_000, help="cases per target")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--batch", type=int, default=5_000, help="cases per hypothesis run")
    ap.add_argument("--only", default="", help="comma-separated targets (default: all)")
    ap.add_argument("--json", action="store_true", help="one JSON line per target")
    args = ap.parse_args()
    loop = asyncio.new_event_loop()
    failed = False
    with tempfile.TemporaryDirectory(prefix="fw-fuzz-") as work:
        table = targets(Path(work), loop)
        only = [t for t in args.only.split(",") if t] or list(table)
        unknown = set(only) - set(table)
        if unknown:
            ap.error(f"unknown target(s) {', '.join(sorted(unknown))}; known: {', '.join(table)}")
        if not args.json:
            print(f"{'target':<11} {'cases':>8} {'s':>7} {'cases/s':>8} {'slowest ms':>10} "
                  f"{'alloc kB':>8}  result", flush=True)
        for name in only:
            strategy, prop = table[name]
            out = run(name, strategy, prop, args.cases, args.seed, args.batch)
            failed = failed or out.failure is not None
            if args.json:
                print(json.dumps(asdict(out)), flush=True)
            else:
                print(f"{out.target:<11} {out.cases:>8} {out.seconds:>7} {out.cases_per_s:>8} "
                      f"{out.slowest_case_ms:>10} {out.max_case_alloc_kb:>8}  "
                      f"{'ok' if out.failure is None else 'FAILED: ' + out.failure}", flush=True)
    loop.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
