"""Canary analysis benchmark: threshold gates vs sequential analysis on simulated router counters.

Usage: python tests/perf/bench_analysis.py [--runs 1000] [--seed 18] [--json]
       [--rates 20,200,2000] [--bake 60] [--weight 10] [--alpha 0.01] [--rise 0.25]

No sockets, no processes: a seeded simulation of one canary wave over what the routers report.
``--rates`` is the fleet's request rate (requests/s); ``--weight`` percent of it goes to the new
release, the rest to the old. The agents read a splitting router every 0.5 s
(``STATS_EVERY_SPLIT``), so the coordinator gets cumulative counters (requests, errors, the
latency histogram over ``LATENCY_BOUNDS_MS``) every 0.5 s; the bake lasts ``--bake`` seconds. The
old release served 5 minutes before the bake (the routers' history: the latency test's reference).

Traffic: old answers with 1 % errors and log-normal latency (median 20 ms, sigma 0.5: p99 about
64 ms). Scenarios: ``none`` (the new release is the old), ``lat +10%`` (within the tolerance
below: not a regression), ``err 1.5%``, ``err 5%``, ``err 50%`` (regressions when the rise is
beyond ``--rise``), ``lat +50%``, ``lat +200ms``.

Both sides get the same operator intent: "a rise of more than a quarter point of errors (``--rise``
points), or a p99 more than x1.3 the old's, is a regression"; at least 50 requests. As flags:
- threshold (the real ``core.gates.evaluate``, at the bake's end): --max-error-rate 1.25%
  (a ceiling: old's 1 % plus the tolerance) --max-p99-ratio 1.3 --min-requests 50;
- sequential (the real ``core.sequential.evaluate``, on every 0.5 s report, pass only at the end):
  --analysis sequential --max-error-rate 0.25% (the tolerated rise) --max-p99-ratio 1.3
  --min-requests 50 --alpha 0.01.

Printed per scenario and rate, side by side: fail / pass / inconclusive shares; false rollbacks
(failures where there is no regression) with a 95 % Wilson interval; missed regressions (passes
of a regression); median and p95 of the new release's requests and of the seconds to the decision;
and users exposed to a bad version: new-release requests before the rollback (to the bake's end
when it is not rolled back).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.manager.service import STATS_EVERY_SPLIT
from coordinator.core import gates as gatelib
from coordinator.core import sequential
from protocol.messages import LATENCY_BOUNDS_MS, Gates

TICK = STATS_EVERY_SPLIT  # how often a canary's router counters reach the coordinator
HISTORY = 300.0  # seconds of old traffic before the bake
OLD_ERRORS = 0.01
MEDIAN_MS, SIGMA = 20.0, 0.5
RATIO = 1.3
MIN_REQUESTS = 50


@dataclass(frozen=True)
class Scenario:
    name: str
    errors: float  # the new release's error rate
    latency: Callable[[float], float]  # P(new latency <= x ms)
    slower: bool  # a p99 beyond RATIO x old's

    def regression(self, rise: float) -> bool:
        return self.slower or self.errors - OLD_ERRORS > rise + 1e-12


def lognormal_cdf(x: float) -> float:
    if x <= 0.0:
        return 0.0
    return statistics.NormalDist().cdf((math.log(x) - math.log(MEDIAN_MS)) / SIGMA)


SCENARIOS = (
    Scenario("none", OLD_ERRORS, lognormal_cdf, False),
    Scenario("lat +10%", OLD_ERRORS, lambda x: lognormal_cdf(x / 1.1), False),
    Scenario("err 1.5%", 0.015, lognormal_cdf, False),
    Scenario("err 5%", 0.05, lognormal_cdf, False),
    Scenario("err 50%", 0.5, lognormal_cdf, False),
    Scenario("lat +50%", OLD_ERRORS, lambda x: lognormal_cdf(x / 1.5), True),
    Scenario("lat +200ms", OLD_ERRORS, lambda x: lognormal_cdf(x - 200.0), True),
)


def bucket_probabilities(cdf: Callable[[float], float]) -> list[tuple[int, float]]:
    """(bucket, probability) of the router's histogram buckets that are not negligible."""
    out, below = [], 0.0
    for i, bound in enumerate([*LATENCY_BOUNDS_MS, math.inf]):
        at = 1.0 if bound == math.inf else cdf(bound)
        if at - below > 1e-12:
            out.append((i, at - below))
        below = at
    return out


def binomial(rng: random.Random, n: int, p: float) -> int:
    """A binomial draw: exact (geometric waiting times) for small means, else the normal
    approximation, which is indistinguishable at these counts."""
    if n <= 0 or p <= 0.0:
        return 0
    if p >= 1.0:
        return n
    if p > 0.5:
        return n - binomial(rng, n, 1.0 - p)
    if n * p < 30:
        count, i, log_q = 0, 0, math.log1p(-p)
        while True:
            i += int(math.log(1.0 - rng.random()) / log_q) + 1
            if i > n:
                return count
            count += 1
    x = round(rng.gauss(n * p, math.sqrt(n * p * (1.0 - p))))
    return min(n, max(0, x))


def multinomial(rng: random.Random, n: int, probs: Sequence[tuple[int, float]],
                into: list[int]) -> None:
    """Add a multinomial draw of ``n`` over ``probs`` to the histogram ``into``."""
    mass = 1.0
    for i, p in probs:
        if n <= 0:
            return
        k = n if p >= mass else binomial(rng, n, p / mass)
        into[i] += k
        n -= k
        mass -= p


@dataclass
class Slot:
    """One release's cumulative counters, as a router reports them."""

    requests: int = 0
    errors: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_MS) + 1))

    def serve(self, rng: random.Random, n: int, errors: float,
              probs: Sequence[tuple[int, float]]) -> None:
        self.requests += n
        self.errors += binomial(rng, n, errors)
        multinomial(rng, n, probs, self.latency)

    def window(self) -> gatelib.Window:
        return gatelib.Window(self.requests, self.errors, tuple(self.latency))


@dataclass(frozen=True)
class Decision:
    outcome: str  # fail, pass, inconclusive
    seconds: float
    requests: int  # the new release's, up to the decision


def per_tick(rng: random.Random, rate: float) -> int:
    """Requests in one tick at ``rate``/s (the fraction rounded at random, so rates add up)."""
    x = rate * TICK
    return int(x) + (rng.random() < x - int(x))


def run(rng: random.Random, sc: Scenario, rate: float, args: argparse.Namespace,
        old_probs: Sequence[tuple[int, float]], new_probs: Sequence[tuple[int, float]],
        gates: tuple[Gates, Gates]) -> tuple[Decision, Decision]:
    """One canary wave: (threshold's decision, sequential's), on the same counters."""
    threshold, seq_gates = gates
    share = args.weight / 100.0
    history = Slot()
    history.serve(rng, round(rate * HISTORY), OLD_ERRORS, old_probs)
    reference = tuple(history.latency)
    new, old = Slot(), Slot()
    ticks = math.ceil(args.bake / TICK)
    seq: Decision | None = None
    for t in range(1, ticks + 1):
        new.serve(rng, per_tick(rng, rate * share), sc.errors, new_probs)
        old.serve(rng, per_tick(rng, rate * (1 - share)), OLD_ERRORS, old_probs)
        if seq is None:
            over = t == ticks
            fig = gatelib.figures(1, 1, [new.window()], [old.window()])
            v = sequential.evaluate(seq_gates, fig, reference, over=over)
            if v.outcome == "fail" or over:
                seq = Decision(v.outcome, t * TICK, new.requests)
    assert seq is not None
    fig = gatelib.figures(1, 1, [new.window()], [old.window()])
    th = gatelib.evaluate(threshold, fig)
    return Decision(th.outcome, ticks * TICK, new.requests), seq


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of a proportion k/n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def pct(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def summary(regression: bool, ds: list[Decision]) -> dict[str, Any]:
    n = len(ds)
    fails = sum(d.outcome == "fail" for d in ds)
    passes = sum(d.outcome == "pass" for d in ds)
    out: dict[str, Any] = {
        "fail": fails / n, "pass": passes / n, "inconclusive": (n - fails - passes) / n,
        "requests_p50": statistics.median(d.requests for d in ds),
        "requests_p95": pct([d.requests for d in ds], 0.95),
        "seconds_p50": statistics.median(d.seconds for d in ds),
        "seconds_p95": pct([d.seconds for d in ds], 0.95),
    }
    if regression:
        out["missed"] = passes / n
        out["exposed_p50"] = out["requests_p50"]
        out["exposed_p95"] = out["requests_p95"]
    else:
        out["false_rollback"] = fails / n
        out["false_rollback_ci"] = wilson(fails, n)
    return out


def line(name: str, s: dict[str, Any]) -> str:
    rate = (f"false rollback {s['false_rollback']:6.1%} [{s['false_rollback_ci'][0]:.1%}, "
            f"{s['false_rollback_ci'][1]:.1%}]" if "false_rollback" in s
            else f"missed {s['missed']:6.1%}{'':17}")
    # Of a bad release, every request it answered before the decision is a user exposed to it.
    what = "exposed " if "missed" in s else "requests"
    return (f"  {name:10} fail {s['fail']:6.1%} pass {s['pass']:6.1%} inconcl "
            f"{s['inconclusive']:6.1%}  {rate}  {what} p50 {s['requests_p50']:7.0f} p95 "
            f"{s['requests_p95']:7.0f}  seconds p50 {s['seconds_p50']:4.0f} p95 "
            f"{s['seconds_p95']:4.0f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1000, help="runs per scenario and rate")
    ap.add_argument("--seed", type=int, default=18)
    ap.add_argument("--rates", default="20,200,2000", help="fleet requests/s, comma-separated")
    ap.add_argument("--bake", type=float, default=60.0, help="seconds")
    ap.add_argument("--weight", type=float, default=10.0, help="percent to the new release")
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--rise", type=float, default=0.25,
                    help="tolerated error-rate rise in points over old's 1%%")
    ap.add_argument("--json", action="store_true", help="one JSON document instead of text")
    args = ap.parse_args(argv)
    rise = args.rise / 100.0
    gates = (Gates(max_error_rate=OLD_ERRORS + rise, max_p99_ratio=RATIO,
                   min_requests=MIN_REQUESTS),
             Gates(analysis="sequential", alpha=args.alpha, max_error_rate=rise,
                   max_p99_ratio=RATIO, min_requests=MIN_REQUESTS))
    rng = random.Random(args.seed)
    old_probs = bucket_probabilities(lognormal_cdf)
    results: list[dict[str, Any]] = []
    for rate in (float(r) for r in args.rates.split(",")):
        if not args.json:
            print(f"\n{rate:g} requests/s, {args.weight:g}% to the canary, bake {args.bake:g}s, "
                  f"{args.runs} runs each; tolerated: +{args.rise:g} points of errors, p99 "
                  f"x{RATIO:g}")
        for sc in SCENARIOS:
            new_probs = bucket_probabilities(sc.latency)
            th, sq = [], []
            for _ in range(args.runs):
                a, b = run(rng, sc, rate, args, old_probs, new_probs, gates)
                th.append(a)
                sq.append(b)
            regression = sc.regression(rise)
            row: dict[str, Any] = {"rate": rate, "scenario": sc.name, "regression": regression,
                                   "threshold": summary(regression, th),
                                   "sequential": summary(regression, sq)}
            results.append(row)
            if not args.json:
                print(f" {sc.name}{' (regression)' if regression else ''}")
                print(line("threshold", row["threshold"]))
                print(line("sequential", row["sequential"]))
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
