"""Sequential, anytime-valid canary analysis: e-values over the routers' counters.

Pure arithmetic: no IO, no clock. The engine may look at the evidence as often as it likes (on
every fresh router report, from the wave's start: while it updates and while it bakes) and stop
at the first crossing; the probability of ever failing a release that does not regress stays
below ``alpha`` however often and whenever it looks. The counts may start before the bake (at the
wave's start, before any weight moved: ``core.engine_bake``): at every moment the e-value is
at most a test martingale over the requests counted so far (see below), whatever decides when the
engine looks, and Ville's inequality bounds that martingale's whole path, so any stopping time is
allowed, a node's switch or a slow convergence included.

Vocabulary.
- *e-value*: a number E >= 0 whose expectation is at most 1 when the null hypothesis holds; a
  *test supermartingale* is a running e-value, and Ville's inequality bounds the chance that it
  ever reaches 1/alpha by alpha. So "fail as soon as E >= 1/alpha" keeps false rollbacks <= alpha
  at any stopping time (Ramdas, Grünwald, Vovk, Shafer, "Game-theoretic statistics and safe
  anytime-valid inference", Statistical Science 2023).
- *tolerance* (delta): the rise the operator accepts. ``--max-error-rate`` under
  ``--analysis sequential`` is the tolerated rise of the new release's error rate over the old's
  (with old at 0 % errors: the new's ceiling, as under threshold).

Error rate. The two slots' requests are Bernoulli trials with error rates p_new and p_old. Each
slot's running Krichevsky-Trofimov mixture (a Beta(1/2, 1/2) prior over its rate: the
minimax-regret mixture) over its likelihood is a test martingale for that slot's true rate, and
their product for the true pair (Robbins' method of mixtures, as in Lindon, Sanden, Shirikian,
"Rapid Regression Detection in Software Deployments through Sequential Testing", KDD 2022, which
does it for counts and quantiles; Lindon & Malek, "Anytime-Valid Inference for Multinomial Count
Data", NeurIPS 2022). For the composite null "p_new <= p_old + delta" the e-value is the mixture
over the *largest* likelihood inside the null (the running mixture divided by the constrained
maximum: Wasserman, Ramdas, Balakrishnan, "Universal inference", PNAS 2020): it is at most the
martingale of the true pair, so Ville's bound holds.

The null's largest likelihood lies on the line p_new = p_old + delta, where the log-likelihood
is concave in p_old: found by bisection on its derivative.

A pass is judged once, at the bake's end, a time fixed in advance: that single look needs no
anytime-valid evidence (looking earlier can only fail), so it uses exact fixed-sample bounds, which
need several times less traffic than a mixture e-value for the same claim: an upper bound on
p_new and a lower bound on p_old, each at alpha/2, from the Chernoff bound P(p^ <= q) <=
exp(-n KL(q || p)) (the one-sided binomial tail; a little wider than Clopper-Pearson, and needs no
incomplete beta function). Pass when the largest rise they allow is below the tolerance: a
regression of the tolerated size passes with probability at most alpha. With no errors anywhere
that takes about log(2/alpha)/delta requests on the new release (530 for delta 1 %, alpha 0.01).

Latency: which test and why. The routers keep log-spaced histograms, not samples, so rank tests
(Kayenta's Mann-Whitney) and quantile confidence sequences on raw values are out of reach; the
histogram is exactly enough for a count. The question ``--max-p99-ratio r`` asks is "is the new
p99 above r x old's p99?"; equivalently, is more than 1 % of the new requests slower than the edge
c = r x p99(old)? So the latency test is the error-rate test above on the *slow* requests
(slower than c), new vs old, with tolerance 1 point (the p99's own 1 %). Old's share of slow
requests is in the comparison so that what slows both slots at once (a busy host) is no
regression. The edge c must not be chosen from the data it judges: it comes from the old
release's traffic *before* the window (``reference``: the routers' cumulative counters at the
bake's start, normally thousands of requests); only without such history is it read from the
window's own old traffic, where the guarantee becomes approximate (a reason says so). Buckets
are x1.25 wide, so both the reference's p99 and the share of c's own bucket above c are read
log-linearly inside the bucket (as Prometheus' histogram_quantile reads linearly): reading whole
buckets instead would blunt the test by up to two buckets (x1.56), missing a +50 % p99 under
x1.3; the price is that the guarantee assumes no more than that requests spread evenly (in log
latency) inside one bucket.

Decisions (``evaluate``): with both tests on, each runs at alpha/2 (so the two together stay
within alpha). *fail* as soon as any test's e-value reaches its 1/alpha, bake over or not;
*pass* only once the bake is over and every test rules out the tolerated regression (at the same
alpha: a missed regression is as unlikely as a false rollback); otherwise *inconclusive*: too
little data to tell at the bake's end, or "the bake goes on" before it. No data is never a
pass: with no request the e-value is 1 and the rise unbounded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

from coordinator.core import gates as gatelib
from protocol.messages import LATENCY_BOUNDS_MS, Gates

Finding = Literal["fail", "pass", "open"]

# The quantile the latency test is about, and so the tolerance of its slow-request shares.
QUANTILE = 0.99
SLOW_TOLERANCE = 1.0 - QUANTILE
# Bisection steps for the constrained maximum and the bounds: 2^-60 of the unit interval, far
# below any rate that a count can tell apart.
BISECTIONS = 60
# Old requests before the window below which the latency edge comes from the window itself.
MIN_REFERENCE = 100
# The largest tolerated rise the test can take (a rise of 100 % is no test).
MAX_TOLERANCE = 0.999
# e-values beyond this are reported as this (a float overflows near 1e308).
E_MAX = 1e300


@dataclass(frozen=True)
class Counts:
    """k of n: errors of requests, or slow requests of requests."""

    k: float  # a whole number of errors; slow requests may count part of a bucket
    n: int


@dataclass(frozen=True)
class Evidence:
    """The evidence of one two-slot comparison."""

    # Log e-value against "new <= old + tolerance" (in logs: it spans hundreds of decades).
    against_null: float
    new: Counts
    old: Counts
    alpha: float

    @property
    def e_fail(self) -> float:
        return bounded_exp(self.against_null)

    @cached_property
    def rise_at_most(self) -> float:
        """The largest rise of new over old the fixed-sample bounds allow (for the bake's end;
        computed when asked: the engine asks only then)."""
        return upper(self.new, self.alpha / 2.0) - lower(self.old, self.alpha / 2.0)


def bounded_exp(log_e: float) -> float:
    return E_MAX if log_e >= math.log(E_MAX) else math.exp(log_e)


def log_kt(c: Counts) -> float:
    """Log of the Krichevsky-Trofimov (Beta(1/2, 1/2)) mixture of Bernoulli likelihoods."""
    return (math.lgamma(c.k + 0.5) + math.lgamma(c.n - c.k + 0.5) - math.lgamma(c.n + 1.0)
            - math.log(math.pi))


def log_lik(c: Counts, p: float) -> float:
    """Log-likelihood of rate ``p`` (0 log 0 = 0; an impossible count is -inf)."""
    out = 0.0
    for count, q in ((c.k, p), (c.n - c.k, 1.0 - p)):
        if count:
            out += count * math.log(q) if q > 0.0 else -math.inf
    return out


def rate(c: Counts) -> float:
    return c.k / c.n if c.n else 0.0


def boundary_max(new: Counts, old: Counts, delta: float) -> float:
    """The largest joint log-likelihood on the line p_new = p_old + delta, p_old in [0, 1-delta].

    The log-likelihood along the line is concave in p_old, so its maximum is where its derivative
    changes sign (or an end of the interval): bisection on the derivative.
    """
    def slope(p: float) -> float:
        q = p + delta
        return (ratio(new.k, q) - ratio(new.n - new.k, 1.0 - q)
                + ratio(old.k, p) - ratio(old.n - old.k, 1.0 - p))

    lo, hi = 0.0, 1.0 - delta
    for _ in range(BISECTIONS):
        mid = (lo + hi) / 2.0
        if slope(mid) > 0.0:
            lo = mid
        else:
            hi = mid
    p = (lo + hi) / 2.0
    return log_lik(new, p + delta) + log_lik(old, p)


def ratio(count: float, x: float) -> float:
    """count / x, where a zero count weighs nothing and x at 0 (a float's end) is infinite."""
    if not count:
        return 0.0
    return count / x if x > 0.0 else math.inf


def evidence(new: Counts, old: Counts, delta: float, alpha: float) -> Evidence:
    """The evidence for and against "new's rate exceeds old's by more than ``delta``"."""
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"tolerance {delta} is outside [0, 1)")
    mixture = log_kt(new) + log_kt(old)
    # The null's largest likelihood is the free maximum when the estimate lies inside the null,
    # else the line's; the mixture is below the free maximum, so inside the null E <= 1.
    if rate(new) - rate(old) - delta <= 0.0:
        null_max = log_lik(new, rate(new)) + log_lik(old, rate(old))
    else:
        null_max = boundary_max(new, old, delta)
    return Evidence(mixture - null_max, new, old, alpha)


def kl(q: float, p: float) -> float:
    """Kullback-Leibler divergence of Bernoulli(p) from Bernoulli(q), with 0 log 0 = 0."""
    out = 0.0
    if q > 0.0:
        out += q * math.log(q / p) if p > 0.0 else math.inf
    if q < 1.0:
        out += (1.0 - q) * math.log((1.0 - q) / (1.0 - p)) if p < 1.0 else math.inf
    return out


def upper(c: Counts, a: float) -> float:
    """The largest rate p >= k/n with exp(-n KL(k/n || p)) >= a (Chernoff; 1 with no data)."""
    if c.n == 0:
        return 1.0
    q, room = rate(c), math.log(1.0 / a) / c.n
    lo, hi = q, 1.0
    for _ in range(BISECTIONS):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if kl(q, mid) <= room else (lo, mid)
    return hi


def lower(c: Counts, a: float) -> float:
    """The smallest rate p <= k/n with exp(-n KL(k/n || p)) >= a (0 with no data)."""
    if c.n == 0:
        return 0.0
    q, room = rate(c), math.log(1.0 / a) / c.n
    lo, hi = 0.0, q
    for _ in range(BISECTIONS):
        mid = (lo + hi) / 2.0
        lo, hi = (lo, mid) if kl(q, mid) <= room else (mid, hi)
    return lo


def judge(ev: Evidence, delta: float, alpha: float, over: bool) -> Finding:
    """Fail at 1/alpha at any time; pass once the bake is over and the bounds rule it out."""
    if ev.against_null >= math.log(1.0 / alpha):
        return "fail"
    if over and ev.rise_at_most < delta:
        return "pass"
    return "open"


def bucket_range(i: int) -> tuple[float, float]:
    """The latencies (ms) bucket ``i`` holds: (lower, upper]; the overflow bucket's upper is inf.
    The first bucket's lower bound is taken one log step down (no request takes 0 ms)."""
    bounds = LATENCY_BOUNDS_MS
    step = bounds[1] / bounds[0]
    lower = bounds[i - 1] if i > 0 else bounds[0] / step
    return lower, bounds[i] if i < len(bounds) else math.inf


def p99_ms(reference: Sequence[int]) -> float | None:
    """The reference's p99, interpolated log-linearly inside its bucket; None if empty."""
    n = sum(reference)
    if n == 0:
        return None
    rank = QUANTILE * n
    seen = 0
    for i, c in enumerate(reference):
        if c and seen + c >= rank:
            lower, upper = bucket_range(i)
            if upper == math.inf:
                return math.inf
            return float(lower * (upper / lower) ** ((rank - seen) / c))
        seen += c
    return math.inf


def slow(histogram: Sequence[int], edge: float) -> Counts:
    """How many of the histogram's requests are slower than ``edge`` ms: whole buckets above it,
    and of the bucket holding it the share above it (log-uniform inside the bucket)."""
    k = 0.0
    for i, c in enumerate(histogram):
        if not c:
            continue
        lower, upper = bucket_range(min(i, len(LATENCY_BOUNDS_MS)))
        if lower >= edge:
            k += c
        elif upper > edge and upper != math.inf:
            k += c * math.log(upper / edge) / math.log(upper / lower)
    return Counts(k, sum(histogram))


def e_text(e: float) -> str:
    """An e-value for people: 2.1e5, 370, 37, 0.52, 3e-4."""
    if e >= 1e4 or (0 < e < 1e-2):
        return f"{e:.1e}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")
    return f"{e:.0f}" if e >= 100 else f"{e:.2g}"


# -- the decision over a wave's figures ------------------------------------------------------------


@dataclass(frozen=True)
class Test:
    """One comparison of the new slots with the old, judged, with its evidence in words."""

    name: Literal["error", "latency"]
    finding: Finding
    evidence: Evidence | None  # None: nothing to compare with (``words`` says why)
    words: str
    figures: dict[str, float | int | None]


def counted(w: gatelib.Window) -> Counts:
    """A window's errors of its requests. More errors than requests is no router's figure
    (``evidence.distrust`` leaves such a node out); one that came in all the same (a record of
    an older coordinator) is taken as every request failing, never a math domain error that
    would stop the rollout's driver."""
    return Counts(min(max(0, w.errors), max(0, w.requests)), max(0, w.requests))


def error_test(new: gatelib.Window, old: gatelib.Window, delta: float, alpha: float,
               over: bool, names: tuple[str, str]) -> Test:
    n, o = counted(new), counted(old)
    # A tolerance of 100 % is refused with the spec; a record from elsewhere must not crash.
    delta = min(delta, MAX_TOLERANCE)
    ev = evidence(n, o, delta, alpha)
    what = f"errors {n.k}/{n.n} on {names[0]} vs {o.k}/{o.n} on {names[1]}"
    finding = judge(ev, delta, alpha, over)
    return Test("error", finding, ev, f"{what}: {said(ev, delta, alpha, finding, over)}",
                {"e_error": ev.e_fail})


def latency_test(new: gatelib.Window, old: gatelib.Window, reference: Sequence[int],
                 ratio: float, alpha: float, over: bool, names: tuple[str, str]) -> Test:
    note = ""
    if sum(reference) < MIN_REFERENCE:
        # No history before the window: the edge comes from the data it judges (approximate).
        reference, note = old.latency, " (edge from the window's own old traffic)"
    p99 = p99_ms(reference)
    if p99 is None or not old.requests:
        return Test("latency", "open", None,
                    f"no old-release traffic to compare latency with on {names[1]}",
                    {"e_latency": None})
    edge = p99 * ratio
    n, o = slow(new.latency, edge), slow(old.latency, edge)
    ev = evidence(n, o, SLOW_TOLERANCE, alpha)
    what = (f"requests slower than {edge:.3g}ms (x{ratio:g} {names[1]}'s p99 {p99:.3g}ms)"
            f"{note}: {n.k:.0f}/{n.n} on {names[0]} vs {o.k:.0f}/{o.n} on {names[1]}")
    finding = judge(ev, SLOW_TOLERANCE, alpha, over)
    return Test("latency", finding, ev, f"{what}: {said(ev, SLOW_TOLERANCE, alpha, finding, over)}",
                {"e_latency": ev.e_fail,
                 "slow_over_ms": round(edge, 3) if math.isfinite(edge) else None,
                 "slow_new": round(n.k, 1), "slow_old": round(o.k, 1)})


def said(ev: Evidence, delta: float, alpha: float, finding: Finding, over: bool) -> str:
    """The evidence against the bounds, in words."""
    bound = f"1/alpha = {1 / alpha:g}"
    if finding == "fail":
        return f"e-value {e_text(ev.e_fail)} >= {bound}: fail"
    if not over:
        return f"e-value {e_text(ev.e_fail)} of {bound} to fail"
    rise = (f"rise at most {max(0.0, ev.rise_at_most):+.2%} (alpha {alpha:g}) "
            f"{'<' if ev.rise_at_most < delta else 'not below'} tolerated {delta:.2%}")
    if finding == "pass":
        return f"e-value {e_text(ev.e_fail)}, {rise}: pass"
    return f"e-value {e_text(ev.e_fail)} of {bound} to fail, {rise} to pass"


def tests(gates: Gates, fig: gatelib.Figures, reference: Sequence[int], over: bool,
          names: tuple[str, str]) -> list[Test]:
    """The configured tests, each at its share of alpha (Bonferroni: together within alpha)."""
    wanted = [gates.max_error_rate is not None, gates.max_p99_ratio is not None]
    alpha = gates.alpha / max(1, sum(wanted))
    out = []
    if gates.max_error_rate is not None:
        out.append(error_test(fig.new, fig.old, gates.max_error_rate, alpha, over, names))
    if gates.max_p99_ratio is not None:
        out.append(latency_test(fig.new, fig.old, reference, gates.max_p99_ratio, alpha, over,
                                names))
    return out


def evaluate(gates: Gates, fig: gatelib.Figures, reference: Sequence[int] = (), *,
             over: bool = True, names: tuple[str, str] = ("new", "old")) -> gatelib.Verdict:
    """The verdict under ``--analysis sequential``; ``over``: whether the bake has ended.

    ``reference`` is the old slots' latency histogram before the window (see the module
    docstring); ``names`` the new and old versions, for the words. While the bake runs only a
    failure is final: any other outcome is reported as inconclusive and means "go on baking".
    """
    fails: list[str] = []
    unsure: list[str] = []
    done = tests(gates, fig, reference, over, names)
    fails += [t.words for t in done if t.finding == "fail"]
    if over:
        gatelib.health_check(gates, fig, fails)
        if gatelib.enough_traffic(gates, fig, unsure):
            unsure += [f"{t.words}: too little data to rule out the regression"
                       for t in done if t.finding == "open"]
        gatelib.mismatch_check(gates, fig, fails, unsure)
    elif not fails:
        unsure.append("the bake goes on")
    data = fig.as_dict() | {"thresholds": gatelib.thresholds(gates),
                            "evidence": [t.words for t in done]}
    for t in done:
        data |= {k: rounded_e(v) for k, v in t.figures.items()}
    return gatelib.judged(fails, unsure, gatelib.reads_traffic(gates), fig.untrusted, data)


def rounded_e(x: float | int | None) -> float | int | None:
    """Figures for JSON: e-values to 3 significant digits."""
    return float(f"{x:.3g}") if isinstance(x, float) else x
