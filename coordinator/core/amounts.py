"""Amounts: what an operator writes for ``--batch`` and ``--max-unavailable``.

An *amount* is a count ``N`` or a percentage ``P%`` of the selected nodes.

Rounding (as Kubernetes does for surge and unavailability): a batch percentage rounds *up*, so
``10%`` of 5 nodes is a batch of 1, never 0; a max-unavailable percentage rounds *down*, since it is
a safety bound, but never below 1, since a bound of 0 would never let a node move.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from coordinator.errors import UsageError

# ASCII digits ("\d" takes any script's), to the end ("$" passes a final newline).
_AMOUNT = re.compile(r"^(?P<n>[0-9]+(?:\.[0-9]+)?)(?P<pct>%?)\Z")


@dataclass(frozen=True)
class Amount:
    """A parsed ``N`` or ``P%``."""

    value: float
    percent: bool

    def resolve(self, total: int, *, round_up: bool) -> int:
        """The number of nodes this amount means out of ``total``."""
        if not self.percent:
            return int(self.value)
        exact = self.value * total / 100.0
        # Guard against 0.1 * 30 = 3.0000000000000004 rounding up to 4.
        exact = round(exact, 9)
        return math.ceil(exact) if round_up else math.floor(exact)


def parse_amount(text: str, *, flag: str) -> Amount:
    """Parse ``N`` (a whole number >= 1) or ``P%`` (0 < P <= 100); raise UsageError saying why."""
    m = _AMOUNT.match(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise UsageError(
            f"{flag} {text!r} is not a count or a percentage; write a whole number like 2 or a "
            "percentage like 25%"
        )
    value = float(m["n"])
    if not math.isfinite(value):  # 400 digits are infinity as a float
        raise UsageError(f"{flag} {text[:40]!r}... is far too large; write a count of nodes "
                         "like 2 or a percentage like 25%")
    if m["pct"]:
        if not 0 < value <= 100:
            raise UsageError(f"{flag} {text!r} is out of range; a percentage must be above 0% "
                             "and at most 100%")
        return Amount(value, True)
    if value != int(value):
        raise UsageError(f"{flag} {text!r} is not a whole number of nodes; write 2 or 25%")
    if value < 1:
        raise UsageError(f"{flag} {text!r} would never move a node; use at least 1")
    return Amount(value, False)


def batch_size(text: str, total: int) -> int:
    """Nodes per wave for ``--batch``: percentages round up, at least 1."""
    return max(1, parse_amount(text, flag="--batch").resolve(total, round_up=True))


def max_unavailable(text: str, total: int) -> int:
    """The bound of ``--max-unavailable``: percentages round down but never below 1."""
    return max(1, parse_amount(text, flag="--max-unavailable").resolve(total, round_up=False))
