"""``RolloutRecord.report``: what the strategies record about a rollout, as typed Structs.

The report is part of the rollout record in KV, which coordinators of two versions read during an
upgrade, so its JSON is exactly what the engine wrote when the report was a plain dict:

- every part is optional (``UNSET``: absent from the JSON, as a key never set was), so a record
  without a part decodes, and a part is written only once set;
- the parts are declared in the one order the engine has ever set them in (the offline nodes at
  creation; then the shadow's report, blue-green's switch and switch back, or the ordinary
  waves' old window, which no rollout has together with a switch), and msgspec writes fields in
  declaration order, so the bytes are those of the dict;
- the fields of each part are in the order that part has always been written in.

A part a newer coordinator adds is ignored by this one (wire Structs never forbid unknown
fields): the record still decodes and the rollout is carried on, without that part.
"""

from __future__ import annotations

import msgspec
from msgspec import UNSET, UnsetType


class OldWindow(msgspec.Struct):
    """The old release's traffic in the latest wave window that had some: what an ordinary
    wave that leaves no old slot serving compares its new slots with."""

    wave: int = 0
    requests: int = 0
    errors: int = 0
    latency: list[int] = []


class OldTraffic(msgspec.Struct):
    """The old slots' traffic from the previous wave's start up to blue-green's switch."""

    requests: int = 0
    errors: int = 0
    latency: list[int] = []
    untrusted: dict[str, str] = {}  # nodes left out of these figures, with why


class Switch(msgspec.Struct):
    """Blue-green's switch: its decision, when each node showed it, the old traffic to compare
    with; once every node showed it, its spread (None figures if no node reported); the end of
    the warm window once it started."""

    at: float = 0.0
    wave: int = 0
    nodes: dict[str, float] = {}
    old: OldTraffic = msgspec.field(default_factory=OldTraffic)
    first: float | UnsetType | None = UNSET
    last: float | UnsetType | None = UNSET
    spread: float | UnsetType | None = UNSET
    lag: float | UnsetType | None = UNSET
    warm_until: float | UnsetType = UNSET


class SwitchBack(msgspec.Struct):
    """Blue-green's switch back: when each node showed it, the nodes expected to, how many
    of those (in order) have been seen back, and its spread once all did."""

    at: float = 0.0
    nodes: dict[str, float] = {}
    expect: list[str] = []
    confirmed: int | UnsetType = UNSET  # unset (0) until a step counts one: old records unchanged
    first: float | UnsetType | None = UNSET
    last: float | UnsetType | None = UNSET
    spread: float | UnsetType | None = UNSET
    lag: float | UnsetType | None = UNSET


class Sample(msgspec.Struct):
    """One mirrored request whose answers differed, from a node's router."""

    node: str
    method: str
    path: str
    what: str
    live: str = ""
    shadow: str = ""


Figure = int | float | None  # as the gates computed it: a count, a rate, a latency, or nothing


class ShadowReport(msgspec.Struct):
    """The shadow's figures over its bake window (the gates' ``ShadowFigures``), what was
    mirrored and ignored, the verdict, and a few sample mismatches."""

    nodes: int = 0
    healthy: int = 0
    healthy_fraction: Figure = 0.0
    mirrored: int = 0
    sent: int = 0
    compared: int = 0
    mismatched: int = 0
    dropped: int = 0
    shadow_errors: int = 0
    mismatch_rate: Figure = None
    error_rate: Figure = None
    p99_shadow_ms: Figure = None
    p99_live_ms: Figure = None
    p99_ratio: Figure = None
    untrusted: dict[str, str] = {}
    untrusted_nodes: int = 0
    mirror_percent: Figure = 0.0
    methods: list[str] = []
    ignore_headers: list[str] = []
    ignore_json_fields: list[str] = []
    keep_headers: list[str] = []
    window: list[Figure] = []
    outcome: str = ""
    reasons: list[str] = []
    samples: list[Sample] = []


class RolloutReport(msgspec.Struct):
    """Every part a rollout's report may hold, each written once set (see the module docstring
    for why in this order)."""

    skipped_offline: list[str] | UnsetType = UNSET  # selected nodes offline at the deploy
    skipped_cordoned: list[str] | UnsetType = UNSET  # selected nodes cordoned at the deploy
    shadow: ShadowReport | UnsetType = UNSET
    switch: Switch | UnsetType = UNSET
    switch_back: SwitchBack | UnsetType = UNSET
    old_window: OldWindow | UnsetType = UNSET
