"""``RolloutReport``: the typed report reads and writes the JSON the plain-dict report did."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from protocol.codec import decode, encode
from protocol.messages import ReleaseRef, RolloutRecord, RolloutSpec
from protocol.report import RolloutReport

SKIPPED = ["node-7"]
OLD_WINDOW = {"wave": 1, "requests": 40, "errors": 1, "latency": [0, 3, 37]}
SWITCH = {"at": 10.5, "wave": 1, "nodes": {"node-1": 11.0, "node-2": 11.25},
          "old": {"requests": 9, "errors": 0, "latency": [9], "untrusted": {}},
          "first": 11.0, "last": 11.25, "spread": 0.25, "lag": 0.75, "warm_until": 70.5}
SWITCH_UNSEEN = {"at": 10.5, "wave": 1, "nodes": {},
                 "old": {"requests": 0, "errors": 0, "latency": [], "untrusted": {"n": "why"}},
                 "first": None, "last": None, "spread": None, "lag": None}
SWITCH_BACK = {"at": 20.0, "nodes": {"node-1": 20.5}, "expect": ["node-1"]}
SHADOW = {"nodes": 2, "healthy": 2, "healthy_fraction": 1, "mirrored": 10, "sent": 10,
          "compared": 9, "mismatched": 1, "dropped": 0, "shadow_errors": 1,
          "mismatch_rate": 0.111, "error_rate": 0.1, "p99_shadow_ms": 12.5, "p99_live_ms": None,
          "p99_ratio": None, "untrusted": {}, "untrusted_nodes": 0, "mirror_percent": 10,
          "methods": ["GET"], "ignore_headers": [], "ignore_json_fields": ["ts"],
          "keep_headers": [], "window": [0.0, 30], "outcome": "fail", "reasons": ["mismatch"],
          "samples": [{"node": "node-1", "method": "GET", "path": "/", "what": "status",
                       "live": "200", "shadow": "500"}]}


@pytest.mark.parametrize(
    "parts",
    [
        pytest.param({}, id="empty"),
        pytest.param({"skipped_offline": SKIPPED, "old_window": OLD_WINDOW}, id="rolling"),
        pytest.param({"skipped_offline": SKIPPED, "switch": SWITCH, "switch_back": SWITCH_BACK},
                     id="blue-green-switched-back"),
        pytest.param({"switch": SWITCH_UNSEEN}, id="blue-green-no-node-seen"),
        pytest.param({"skipped_offline": SKIPPED, "shadow": SHADOW}, id="shadow"),
        pytest.param({"shadow": SHADOW, "switch": SWITCH}, id="shadow-then-blue-green"),
        pytest.param({"shadow": SHADOW, "old_window": OLD_WINDOW}, id="shadow-then-rolling"),
    ],
)
def test_a_report_written_as_a_dict_round_trips_byte_for_byte(parts: dict[str, Any]) -> None:
    """Every combination of parts, in the order the engine set them, as the dict wrote it."""
    old = msgspec.json.encode(parts)
    assert encode(decode(RolloutReport, old)) == old
    record = msgspec.json.encode(RolloutRecord(
        id="r1", spec=RolloutSpec(service="hello", version="2.0.0"),
        release=ReleaseRef(service="hello", version="2.0.0", digest="d" * 64)))
    with_parts = record.replace(b'"report":{}', b'"report":' + old)
    assert encode(decode(RolloutRecord, with_parts)) == with_parts


def test_a_part_a_newer_coordinator_adds_is_tolerated() -> None:
    """An unknown part is ignored: the record decodes and the known parts are kept."""
    got = decode(RolloutReport, msgspec.json.encode(
        {"future": {"x": 1}, "switch_back": SWITCH_BACK}))
    assert msgspec.to_builtins(got) == {"switch_back": SWITCH_BACK}
