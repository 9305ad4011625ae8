"""The notification document: what ``fleetwave coordinator --notify URL`` POSTs, as JSON.

One document per rollout event a person cares about (``coordinator.runtime.notify_doc`` says
which), built from the ``Event`` in the events stream and the rollout's record. Receivers may
rely on the fields below; new ones get defaults, so a receiver must ignore fields it does not
know. ``id`` is the event's id: the same event delivered twice (a coordinator that died between
a successful POST and its acknowledgement) has the same id, so a receiver can drop the copy.
"""

from __future__ import annotations

from typing import Any

import msgspec


class Notification(msgspec.Struct, kw_only=True):
    """One rollout event, for a webhook receiver (``X-Fleetwave-Signature`` signs its bytes).

    ``what`` is the event's class for people and routing rules: ``started``, ``wave_passed``,
    ``paused`` (also after inconclusive gates: ``reason`` says why), ``resumed``, ``promoted``,
    ``gate_failed`` (``figures`` has the gate's figures), ``progress_deadline`` (a wave's nodes
    did not converge in time), ``wave_failed``, ``rolling_back``, ``rolled_back``,
    ``succeeded``, ``aborted``, ``failed``, and ``refused`` (a deploy or rollback refused
    before any wave ran; ``rollout`` is "" as none was made, ``reason`` says why, ``who`` asked).
    ``kind`` is the events stream's exact kind.
    ``severity`` is ``info``, ``warning`` (a person may have to act) or ``critical`` (the
    rollout failed or is being undone).
    """

    schema: int = 1
    id: str  # the event's id, unique per event: de-duplicate on it
    what: str
    severity: str
    kind: str
    time: float  # when the event happened, Unix seconds
    at: str  # the same, RFC 3339 in UTC
    fleet: str
    rollout: str
    service: str = ""
    from_version: str = ""
    to_version: str = ""
    strategy: str = ""
    wave: int | None = None
    who: str = ""  # the operator who caused it, or "coordinator" for its own decisions
    reason: str = ""
    message: str = ""
    figures: dict[str, Any] = {}
