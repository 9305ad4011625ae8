"""Pre-staging, the pure arithmetic: how many waves ahead are staged, and which waves those are.

Vocabulary: a node is *staged* for its wave when its new slot runs the new release at weight 0
(serving nothing, so max-unavailable is untouched) and reported healthy before the wave started;
its wave is then a router weight switch plus the bake. ``--prestage N`` stages the nodes of the
next N waves after the running one, ``all`` every later wave, ``0`` none; "" (not given) is the
strategy's default (``strategies.<name>.prestage``).

Why a window and not always ``all``: a staged slot is a second process on its node (memory, file
handles, its ``pre_start`` hooks run), and a release that fails early is found by the first wave
with only the window's nodes to undo. One wave ahead already hides all of a wave's start-up behind
the previous wave's switch and bake whenever the bake is at least as long as a start.
"""

from __future__ import annotations

from coordinator.errors import UsageError

ALL = "all"
ALL_WAVES = 1 << 30  # more waves than any rollout has


def check(text: str) -> None:
    """Refuse a ``--prestage`` that is neither "" nor ``all`` nor a whole number 0 or more."""
    value = text.strip()
    if value in ("", ALL):
        return
    try:
        number = int(value)
    except ValueError:
        raise UsageError(f"--prestage {text!r} is not a number of waves; write --prestage 1 "
                         "(the next wave), --prestage all, or 0 for none") from None
    if number < 0:
        raise UsageError(f"--prestage {text!r} is negative; write a number of waves ahead, "
                         "0 or more, or all")


def waves_ahead(text: str, default: int) -> int:
    """The number of waves staged ahead of the running one (``ALL_WAVES`` for ``all``)."""
    value = text.strip()
    if not value:
        return default
    return ALL_WAVES if value == ALL else int(value)


def window(current: int, ahead: int, total: int) -> range:
    """The indexes of the waves staged while wave ``current`` runs: the next ``ahead``."""
    return range(current + 1, min(total, current + 1 + ahead))


def refuse(text: str, strategy: str, why: str) -> None:
    """UsageError if ``--prestage`` is given to ``strategy``, where it has no meaning (``why``)."""
    if text.strip():
        raise UsageError(f"--prestage has no meaning with --strategy {strategy}: {why}; "
                         "leave --prestage out")
