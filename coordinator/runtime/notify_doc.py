"""What a notification says and how it is sent: the pure half of ``coordinator.runtime.notify``.

Vocabulary:

- a *target* is one ``--notify`` URL: ``http://`` or ``https://`` gets the JSON document
  (``protocol.notify.Notification``), ``slack+https://`` gets Slack's incoming-webhook JSON
  (the same facts as a message) POSTed to the ``https://`` URL behind it. Webhook URLs are
  secrets themselves (Slack's path is its token), so logs show a target's ``shown`` form only:
  scheme, host and port, and the path for plain webhooks, never user info or a query.
- a *notable* event is one a person cares about (``NOTABLE``); every other kind (node
  heartbeats, per-node progress, bakes) is read and skipped.
- a *signature*: with a secret, ``X-Fleetwave-Timestamp: <unix seconds>`` and
  ``X-Fleetwave-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>." + body>``. The timestamp is
  inside the MAC, so a receiver that refuses timestamps older than a few minutes refuses replays.
- the *backoff*: ``ATTEMPTS`` POSTs at most, the n-th retry ``FIRST_DELAY * 2**(n-1)`` seconds
  after the previous attempt ended (1, 2, 4, 8, 16 s: with ``POST_TIMEOUT`` per attempt about a
  minute in all before a delivery is given up). A 2xx is delivered; connection errors,
  timeouts, 408, 429 and 5xx are retried; any other answer is final (the receiver refuses it).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from protocol.messages import Event
from protocol.notify import Notification

ATTEMPTS = 6
FIRST_DELAY = 1.0
POST_TIMEOUT = 5.0
SIGNATURE_HEADER = "X-Fleetwave-Signature"
TIMESTAMP_HEADER = "X-Fleetwave-Timestamp"
RETRIED_STATUS = frozenset({408, 429})

# kind -> (what, severity). Inconclusive gates pause the rollout: the pause says why, once.
NOTABLE: dict[str, tuple[str, str]] = {
    "rollout.started": ("started", "info"),
    "gate.passed": ("wave_passed", "info"),
    "gate.skipped": ("wave_passed", "info"),
    "rollout.paused": ("paused", "warning"),
    "rollout.resumed": ("resumed", "info"),
    "rollout.promoted": ("promoted", "info"),
    "gate.failed": ("gate_failed", "critical"),
    "wave.failed": ("wave_failed", "critical"),
    "rollout.rolling_back": ("rolling_back", "critical"),
    "rollout.rolled_back": ("rolled_back", "critical"),
    "rollout.succeeded": ("succeeded", "info"),
    "rollout.aborted": ("aborted", "warning"),
    "rollout.failed": ("failed", "critical"),
    # A deploy or rollback the coordinator refused before any wave ran (no node matches the
    # selector, the release was never pushed, the service is locked by another rollout): the
    # pipeline that asked may have failed silently, so a person hears of it. It names no
    # rollout (none was made); a flag the CLI refused never reaches the coordinator.
    "rollout.refused": ("refused", "warning"),
}
# The notable kinds that name no rollout: notified all the same.
WITHOUT_ROLLOUT = frozenset({"rollout.refused"})
# What a target's consumer reads of the events stream: every notable kind, by a wildcard that
# does not change when NOTABLE does (a durable consumer keeps the filters it was made with).
FILTERS = ("rollout.>", "gate.>", "wave.>")
# A wave that failed because its nodes were not there in time (``--progress-deadline``).
DEADLINE_MARKS = ("did not converge within", "not back in time", "deadline")
NOT_FIGURES = frozenset({"wave", "reason", "moved"})


class BadTarget(ValueError):
    """A ``--notify`` URL fleetwave cannot post to; the message says why and what to give."""


@dataclass(frozen=True)
class Target:
    """One ``--notify`` URL: where to POST, in which format, and how logs name it."""

    given: str  # as the operator wrote it (names the durable consumer)
    url: str  # what is POSTed to
    slack: bool
    shown: str
    # This target's own signing secret (a [[notify]] table's ``secret``); None: the global one.
    secret: bytes | None = field(default=None, repr=False)

    @property
    def consumer(self) -> str:
        """The durable consumer of this target: its position survives restarts and leaders."""
        return "notify-" + hashlib.sha256(self.given.encode()).hexdigest()[:16]


def parse_target(text: str) -> Target:
    """The target ``text`` names; BadTarget unless it is an http(s) or slack+https URL."""
    slack = text.startswith("slack+")
    url = text.removeprefix("slack+")
    try:
        parts = urlsplit(url)
        port = parts.port
        if port == 0:
            raise ValueError("port 0")
        if parts.hostname:
            parts.hostname.encode("idna")  # an empty label or one over 63 characters
    except (ValueError, UnicodeError):
        # No ({exc}): urlsplit's words quote the URL's userinfo (a password) or path.
        raise BadTarget(f"notify URL {_safe(text)!r} is malformed (its host or port); give "
                        "http(s)://HOST[:PORT]/PATH or slack+https://hooks.slack.com/...") from None
    schemes = ("https",) if slack else ("http", "https")
    if parts.scheme not in schemes or not parts.hostname:
        want = ("slack+https://hooks.slack.com/services/..." if slack
                else "http(s)://HOST[:PORT]/PATH or slack+https://...")
        raise BadTarget(f"notify URL {_safe(text)!r} is not one fleetwave can post to; give {want}")
    where = parts.hostname + (f":{port}" if port is not None else "")
    shown = f"{'slack+' if slack else ''}{parts.scheme}://{where}" + (
        "/..." if slack else (parts.path or "/"))
    return Target(given=text, url=url, slack=slack, shown=shown)


def _safe(text: str) -> str:
    """``text`` for an error message: its scheme and host, nothing after (a Slack URL's path
    is its token; a password may sit in userinfo, a token in the query)."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        return "(not a URL)"
    # After the last "@" (userinfo may hold "/" or "?"), up to the path, query or fragment.
    host = re.split(r"[/?#]", rest.rsplit("@", 1)[-1], maxsplit=1)[0]
    return f"{scheme}://{host[:60]}/..."[:80]


@dataclass(frozen=True)
class Facts:
    """What the rollout's record adds to its events (they name only the rollout)."""

    from_version: str = ""
    to_version: str = ""
    strategy: str = ""


def notable(event: Event) -> bool:
    return event.kind in NOTABLE and (bool(event.rollout) or event.kind in WITHOUT_ROLLOUT)


def facts_of_refusal(event: Event) -> Facts:
    """What a ``rollout.refused`` event says of the deploy it refused (it has no record)."""
    return Facts(to_version=str(event.data.get("version") or ""),
                 strategy=str(event.data.get("strategy") or ""))


def document(event: Event, facts: Facts) -> Notification:
    """The notification of a notable ``event`` of a rollout described by ``facts``."""
    what, severity = NOTABLE[event.kind]
    data = event.data
    reason = str(data.get("reason") or "")
    if event.kind in ("wave.failed", "gate.failed"):
        reason = reason or event.message
        if any(mark in event.message for mark in DEADLINE_MARKS):
            what = "progress_deadline"
    elif event.kind == "rollout.refused":
        reason = reason or event.message
    elif event.kind == "rollout.paused" and not reason:
        reason = event.message.removeprefix("paused: ")
    wave = data.get("wave")
    return Notification(
        id=event.id, what=what, severity=severity, kind=event.kind, time=event.time,
        at=dt.datetime.fromtimestamp(event.time, dt.UTC).isoformat().replace("+00:00", "Z"),
        fleet=event.fleet, rollout=event.rollout, service=event.service,
        from_version=facts.from_version, to_version=facts.to_version,
        strategy=facts.strategy or str(data.get("strategy") or ""),
        wave=wave if isinstance(wave, int) else None, who=event.who, reason=reason,
        message=event.message,
        figures={k: v for k, v in data.items() if k not in NOT_FIGURES},
    )


SLACK_ICONS = {"info": ":large_blue_circle:", "warning": ":warning:", "critical": ":red_circle:"}


def slack_message(n: Notification) -> dict[str, Any]:
    """Slack's incoming-webhook JSON for ``n``: a one-line ``text`` (also what notifications on
    phones show) and the facts as a section's fields."""
    versions = f"{n.from_version or '(nothing)'} → {n.to_version}" if n.to_version else ""
    icon = SLACK_ICONS.get(n.severity, "")
    # Every value escaped (Slack's control characters: a service's log line in a reason could
    # say <!channel> or carry a disguised link), and cut to Slack's limits (3,000 characters a
    # section's text, 2,000 a field: a longer message is refused with a 400, and the alert is
    # lost; the JSON webhook carries the whole text).
    head = _cut(f"{icon} *{_esc(n.service or n.rollout)}* {n.what.replace('_', ' ')}"
                + (f" ({_esc(versions)})" if versions else "") + f": {_esc(n.message)}",
                SLACK_TEXT_MAX)
    fields = [("Rollout", n.rollout), ("Fleet", n.fleet), ("Strategy", n.strategy),
              ("Wave", "" if n.wave is None else str(n.wave + 1)), ("Who", n.who),
              ("Reason", n.reason), ("At", n.at)]
    fields += [(k, _figure(v)) for k, v in sorted(n.figures.items())
               if isinstance(v, (int, float, str))]
    return {
        "text": head,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": head}},
            {"type": "section", "fields": [
                {"type": "mrkdwn", "text": f"*{_esc(k)}*\n{_cut(_esc(v), SLACK_FIELD_MAX)}"}
                for k, v in fields if v != ""][:10]},
        ],
    }


SLACK_TEXT_MAX = 2900  # Slack's section text: 3,000 characters
SLACK_FIELD_MAX = 1900  # a section's field: 2,000


def _esc(text: str) -> str:
    """``text`` with Slack's control characters escaped, as its documentation asks."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cut(text: str, most: int) -> str:
    return text if len(text) <= most else text[:most - 1] + "…"


def _figure(value: float | int | str) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def sign(secret: bytes, body: bytes, timestamp: int) -> dict[str, str]:
    """The headers that sign ``body`` at ``timestamp`` with ``secret`` (see the module)."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return {TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: f"sha256={mac}"}


def verify(secret: bytes, body: bytes, headers: dict[str, str], *, now: float,
           tolerance: float = 300.0) -> bool:
    """What a receiver checks (tests do too): the MAC matches and the timestamp is recent."""
    try:
        timestamp = int(headers[TIMESTAMP_HEADER])
    except (KeyError, ValueError):
        return False
    expected = sign(secret, body, timestamp)[SIGNATURE_HEADER]
    return (hmac.compare_digest(expected, headers.get(SIGNATURE_HEADER, ""))
            and abs(now - timestamp) <= tolerance)


def retried(status: int | None) -> bool:
    """Whether an attempt that ended with ``status`` (None: no answer) is worth another."""
    return status is None or status in RETRIED_STATUS or status >= 500


def delivered(status: int | None) -> bool:
    return status is not None and 200 <= status < 300


def backoff(attempt: int, *, first: float = FIRST_DELAY) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based) before the next."""
    return first * 2.0 ** (attempt - 1)
