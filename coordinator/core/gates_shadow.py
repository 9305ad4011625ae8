"""Shadow gates: how a shadow's bake is judged, from the router's mirror counters.

A shadow slot gets no live traffic, so its gates read the router's mirror counters instead: of
the requests copied to the shadow, how many were compared with the live answer, how many
differed, how many the shadow answered with an error, and both sides' latency histograms. The
window, trust and verdict rules are those of ``core.gates``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from coordinator.core.evidence import MIRROR_COUNTERS, listed
from coordinator.core.gates import (
    Verdict,
    add_histograms,
    judged,
    quantile,
    reads_traffic,
    rounded,
    sub_histograms,
    thresholds,
)
from protocol.messages import Gates, MirrorTraffic, RouterStats


@dataclass(frozen=True)
class ShadowWindow:
    """Mirror counters of one router (or a sum of routers) inside the bake window."""

    mirrored: int = 0
    compared: int = 0
    mismatched: int = 0
    dropped: int = 0
    shadow_errors: int = 0
    shadow_latency: tuple[int, ...] = ()
    live_latency: tuple[int, ...] = ()

    def __add__(self, other: ShadowWindow) -> ShadowWindow:
        return ShadowWindow(
            self.mirrored + other.mirrored, self.compared + other.compared,
            self.mismatched + other.mismatched, self.dropped + other.dropped,
            self.shadow_errors + other.shadow_errors,
            add_histograms(self.shadow_latency, other.shadow_latency),
            add_histograms(self.live_latency, other.live_latency),
        )


def shadow_window(start: RouterStats | None, end: RouterStats | None) -> ShadowWindow:
    """The mirror traffic between two snapshots of one router (same epoch rule as ``window``)."""
    if end is None or end.mirror is None:
        return ShadowWindow()
    after = end.mirror
    before = MirrorTraffic()
    if start is not None and start.epoch == end.epoch and start.mirror is not None:
        before = start.mirror
    if any(getattr(after, c) < getattr(before, c) for c in MIRROR_COUNTERS):
        before = MirrorTraffic()  # counters went backwards: a restart the epoch did not show
    return ShadowWindow(
        after.mirrored - before.mirrored, after.compared - before.compared,
        after.mismatched - before.mismatched, after.dropped - before.dropped,
        after.shadow_errors - before.shadow_errors,
        sub_histograms(after.shadow_latency, before.shadow_latency),
        sub_histograms(after.live_latency, before.live_latency),
    )


@dataclass(frozen=True)
class ShadowFigures:
    """Everything the shadow gates look at: staged-slot health and the summed mirror window."""

    nodes: int
    healthy: int
    mirror: ShadowWindow
    untrusted: Mapping[str, str] = field(default_factory=dict)  # node -> why, left out

    @property
    def healthy_fraction(self) -> float:
        return self.healthy / self.nodes if self.nodes else 0.0

    @property
    def mismatch_rate(self) -> float | None:
        m = self.mirror
        return m.mismatched / m.compared if m.compared else None

    @property
    def sent(self) -> int:
        """Copies sent to the shadow: answered (and so compared) or failed (no answer in time)."""
        return self.mirror.compared + self.mirror.shadow_errors

    @property
    def error_rate(self) -> float | None:
        """Copies the shadow did not answer (refused, reset, timed out) per copy sent.

        An error *answer* (a 5xx) is compared instead, and differs from the live answer in its
        status class. Judged over copies sent, not compared pairs: a shadow that never answers
        has no compared pair at all, and must fail this gate rather than look inconclusive.
        """
        sent = self.sent
        return self.mirror.shadow_errors / sent if sent else None

    @property
    def p99_shadow(self) -> float | None:
        return quantile(self.mirror.shadow_latency, 0.99)

    @property
    def p99_live(self) -> float | None:
        return quantile(self.mirror.live_latency, 0.99)

    @property
    def p99_ratio(self) -> float | None:
        shadow, live = self.p99_shadow, self.p99_live
        return shadow / live if shadow is not None and live else None

    def as_dict(self) -> dict[str, Any]:
        """Plain figures for events, the wave's gates and the rollout report (JSON-safe)."""
        m = self.mirror
        return {
            "nodes": self.nodes, "healthy": self.healthy,
            "healthy_fraction": round(self.healthy_fraction, 4),
            "mirrored": m.mirrored, "sent": self.sent, "compared": m.compared,
            "mismatched": m.mismatched,
            "dropped": m.dropped, "shadow_errors": m.shadow_errors,
            "mismatch_rate": rounded(self.mismatch_rate), "error_rate": rounded(self.error_rate),
            "p99_shadow_ms": self.p99_shadow, "p99_live_ms": self.p99_live,
            "p99_ratio": rounded(self.p99_ratio), "untrusted": listed(self.untrusted),
            "untrusted_nodes": len(self.untrusted),
        }


def evaluate_shadow(gates: Gates, fig: ShadowFigures) -> Verdict:
    """Apply the gates to a shadow's figures: fail beats inconclusive beats pass.

    The mismatch and p99 gates are judged over compared pairs, the error gate over copies sent
    (a hanging shadow answers nothing, so it has errors but no pairs); fewer than
    ``min_requests`` of them (or none at all while the gate is set) is inconclusive, never a pass.
    """
    fails: list[str] = []
    unsure: list[str] = []
    m = fig.mirror
    if gates.min_healthy is not None and fig.healthy_fraction < gates.min_healthy:
        fails.append(
            f"shadow slots healthy {fig.healthy}/{fig.nodes} ({fig.healthy_fraction:.0%}) is "
            f"below min-healthy {gates.min_healthy:.0%}"
        )
    pairs = gates.max_mismatch_rate is not None or gates.max_p99_ratio is not None
    errors = gates.max_error_rate is not None
    n = gates.min_requests
    if n:  # (--min-requests 0 asks for no more than any traffic gate does: at least one)
        compared, sent = m.compared >= n, fig.sent >= n
        if not compared and (pairs or not errors):
            unsure.append(f"{m.compared} mirrored requests compared, fewer than min-requests {n}")
        elif errors and not sent:
            unsure.append(f"{fig.sent} copies sent to the shadow, fewer than min-requests {n}")
    else:
        compared, sent = m.compared > 0, fig.sent > 0
        if pairs and not compared:
            unsure.append("no mirrored request was compared during the bake, so the shadow "
                          "gates cannot pass")
        elif errors and not sent:
            unsure.append("no request was mirrored during the bake, so the shadow error gate "
                          "cannot pass")
    if gates.max_error_rate is not None and sent:
        rate = fig.error_rate or 0.0
        if rate > gates.max_error_rate:
            fails.append(f"shadow error rate {rate:.2%} ({m.shadow_errors} of {fig.sent} copies "
                         f"unanswered) is above max-error-rate {gates.max_error_rate:.2%}")
    if compared and gates.max_mismatch_rate is not None:
        rate = fig.mismatch_rate or 0.0
        if rate > gates.max_mismatch_rate:
            fails.append(f"mismatch rate {rate:.2%} ({m.mismatched}/{m.compared}) is above "
                         f"max-mismatch-rate {gates.max_mismatch_rate:.2%}")
    if compared and gates.max_p99_ratio is not None:
        ratio = fig.p99_ratio
        if ratio is None:
            unsure.append("no latency of both the shadow and the live answers to compare p99 "
                          "with")
        elif ratio > gates.max_p99_ratio:
            fails.append(f"shadow p99 {fig.p99_shadow}ms vs live {fig.p99_live}ms "
                         f"(x{ratio:.2f}) is above max-p99-ratio x{gates.max_p99_ratio:g}")
    data = fig.as_dict() | {"thresholds": thresholds(gates)}
    return judged(fails, unsure, reads_traffic(gates), fig.untrusted, data)
