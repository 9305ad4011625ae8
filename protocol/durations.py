"""Durations as people write them: ``500ms``, ``30s``, ``2m``, ``1h``, ``1m30s``.

A duration is a sequence of ``<number><unit>`` terms with units ``ms``, ``s``, ``m``, ``h``; the
plain ``0`` is also accepted. A bare number such as ``"5"`` is refused: it is a common slip
(seconds? milliseconds?) and the error names the fix.
"""

import re

from protocol.errors import ProtocolError

_TERM = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
MAX_SECONDS = 366 * 24 * 3600.0


def parse_duration(text: str, *, what: str = "duration") -> float:
    """Return the seconds in ``text``; raise ProtocolError naming ``what`` if it is bad."""
    if not isinstance(text, str):
        raise ProtocolError(f"{what}: expected a duration like '500ms' or '30s', got {text!r}")
    s = text.strip()
    if s == "0":
        return 0.0
    pos = 0
    total = 0.0
    for match in _TERM.finditer(s):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT[match.group(2)]
        pos = match.end()
    if pos != len(s) or not s:
        raise ProtocolError(
            f"{what}: {text!r} is not a duration; write a number with a unit: "
            "'500ms', '30s', '2m', '1h' or '1m30s'"
        )
    if total > MAX_SECONDS:
        raise ProtocolError(f"{what}: {text!r} is longer than a year")
    return total


def format_duration(seconds: float) -> str:
    """Render seconds the way people write them (the inverse of parse_duration, to the second)."""
    if seconds < 1 and seconds != 0:
        return f"{round(seconds * 1000)}ms"
    if seconds < 60:
        return f"{seconds:g}s"
    rest = round(seconds)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(hours, "h"), (minutes, "m"), (secs, "s")]
    return "".join(f"{n}{unit}" for n, unit in parts if n)
