"""The shadow's deploy settings (mirror methods, ignored headers and JSON fields) and its report
as the CLI prints it."""

from __future__ import annotations

import pytest

from coordinator.cli.render import shadow_report_lines, status_text
from coordinator.cli.rollout_cmds import build_spec
from coordinator.errors import UsageError

BASE = {"service": "hello", "version": "2.0.0", "strategy": "shadow", "mirror": "50%"}


def test_defaults_mirror_get_and_head_and_ignore_nothing() -> None:
    """Without the flags a shadow mirrors GET and HEAD and compares every field and header."""
    spec = build_spec(dict(BASE))
    assert spec.mirror == 50.0
    assert spec.mirror_methods == ["GET", "HEAD"]
    assert spec.ignore_headers == [] and spec.ignore_json_fields == []


def test_repeated_and_comma_separated_values_are_flattened() -> None:
    """Repeated flags and comma lists mean the same: every name, in order, normalised."""
    spec = build_spec(BASE | {
        "mirror_methods": "get, options",
        "ignore_headers": ("X-Request-Id", "etag,Server"),
        "ignore_json_fields": ["version,greeting", "$.meta.time"],
    })
    assert spec.mirror_methods == ["GET", "OPTIONS"]
    assert spec.ignore_headers == ["x-request-id", "etag", "server"]
    assert spec.ignore_json_fields == ["version", "greeting", "$.meta.time"]


def test_rollout_file_lists_are_accepted() -> None:
    """A rollout.toml gives the same settings as TOML arrays."""
    spec = build_spec(BASE | {"mirror_methods": ["GET"], "ignore_json_fields": ["a.b"]})
    assert spec.mirror_methods == ["GET"] and spec.ignore_json_fields == ["a.b"]


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("mirror_methods", "GET,PO ST", "not an HTTP method"),
        ("mirror_methods", ",", "is empty"),
        ("ignore_headers", "bad header:", "not a header name"),
        ("ignore_json_fields", "meta..time", "not a dotted field path"),
        ("ignore_json_fields", ["$."], "not a dotted field path"),
    ],
)
def test_bad_values_are_one_line_usage_errors(key: str, value: object, says: str) -> None:
    """A bad method, header name or field path is refused before anything is sent."""
    with pytest.raises(UsageError, match=says) as err:
        build_spec(BASE | {key: value})
    assert "\n" not in str(err.value)


REPORT = {"shadow": {
    "nodes": 3, "healthy": 3, "mirrored": 120, "compared": 118, "mismatched": 118,
    "dropped": 2, "shadow_errors": 0, "mismatch_rate": 1.0, "error_rate": 0.0,
    "p99_shadow_ms": 4, "p99_live_ms": 3, "p99_ratio": 1.3333, "mirror_percent": 50.0,
    "methods": ["GET", "HEAD"], "outcome": "failed",
    "reasons": ["mismatch rate 100.00% > 1.00%"],
    "samples": [{"node": "node-1", "method": "GET", "path": "/", "what": "json field $.version",
                 "live": '200 {"version": "1.0.0"}', "shadow": '200 {"version": "2.0.0"}'}],
}}


def test_report_lines_name_counts_rates_and_what_differed() -> None:
    """The printed report carries the counts, the rates, the gate reasons and each sample."""
    text = "\n".join(shadow_report_lines(REPORT))
    assert "shadow report: failed (50% of GET,HEAD mirrored to 3/3 healthy shadows)" in text
    assert "compared 118, mismatched 118 (100.00%)" in text and "dropped 2" in text
    assert "p99 shadow 4ms vs live 3ms (x1.33)" in text
    assert "gate: mismatch rate 100.00% > 1.00%" in text
    assert "mismatch on node-1: GET /: json field $.version" in text
    assert 'shadow: 200 {"version": "2.0.0"}' in text


def test_report_without_answers_shows_dashes() -> None:
    """A shadow that never answered has no latency: dashes, not "None"."""
    sh = REPORT["shadow"] | {"p99_shadow_ms": None, "p99_live_ms": None, "p99_ratio": None,
                             "compared": 0, "mismatch_rate": None}
    text = "\n".join(shadow_report_lines({"shadow": sh}))
    assert "p99 shadow - vs live -" in text and "None" not in text


def test_no_shadow_no_report() -> None:
    """A rollout of another strategy prints no shadow report, in status either."""
    assert shadow_report_lines({}) == []
    st = {"id": "r1", "service": "hello", "version": "2", "strategy": "rolling",
          "state": "succeeded", "report": {}}
    assert "shadow" not in status_text(st)
    assert "shadow report" in status_text(st | {"report": REPORT})
