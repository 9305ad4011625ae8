"""Mirror comparison (pure): status class, body digest, JSON with ignored fields, headers."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from agent.router.mirror import (
    MAX_JSON_DEPTH,
    MAX_SAMPLE_TEXT,
    Answer,
    MirrorJob,
    compare,
    first_difference,
    mismatch_sample,
    redact_target,
    shadow_head,
    strip_json_fields,
)
from agent.router.stats import MAX_SAMPLES, MirrorCounters, SlotCounters
from protocol.messages import MismatchSample


def answer(status: int = 200, body: Any = None, headers: dict[str, str] | None = None) -> Answer:
    raw = body if isinstance(body, bytes) else json.dumps(body or {"ok": True}).encode()
    hdrs = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    return Answer(status=status, headers=hdrs, digest=hashlib.sha256(raw).hexdigest(), body=raw,
                  truncated=False, latency_ms=1.0)


def test_identical_answers_agree() -> None:
    """Same status class, body and headers: no mismatch, whatever Date and framing say."""
    live = answer(201, {"a": 1}, {"Date": "x", "Content-Length": "8", "X-V": "1"})
    shadow = answer(200, {"a": 1}, {"Date": "y", "Transfer-Encoding": "chunked", "x-v": "1"})
    assert compare(live, shadow) is None


def test_status_class_and_headers_differ() -> None:
    """A different status class and a different header are both named."""
    what = compare(answer(200, headers={"X-V": "1"}), answer(503, headers={"X-V": "2"}))
    assert what == "status 200 vs 503; header x-v"


def test_ignored_headers_are_not_compared() -> None:
    """ignore_headers (lower-case) take a header out of the comparison."""
    live, shadow = answer(headers={"X-Req": "1"}), answer(headers={"X-Req": "2"})
    assert compare(live, shadow, ignore_headers=frozenset({b"x-req"})) is None


def test_json_fields_ignored_by_dotted_path() -> None:
    """Ignored dotted JSON fields (also inside lists) do not count; others are named by path."""
    live = answer(body={"id": 1, "meta": {"ts": 5, "v": 1}, "items": [{"id": 7, "n": "a"}]})
    shadow = answer(body={"id": 2, "meta": {"ts": 6, "v": 1}, "items": [{"id": 8, "n": "a"}]})
    ignore = ["id", "meta.ts", "items.id"]
    assert compare(live, shadow, ignore_json_fields=ignore) is None
    assert compare(live, shadow, ignore_json_fields=["id", "meta.ts"]) == "json field $.items[0].id"


def test_non_json_bodies_compare_by_digest() -> None:
    """Bodies that are not JSON differ as a body digest."""
    assert compare(answer(body=b"hello"), answer(body=b"world")) == "body digest"
    assert compare(answer(body=b"{not json"), answer(body=b"{not jsoN")) == "body digest"


def test_truncated_bodies_fall_back_to_digest() -> None:
    """A body too large to keep is compared by digest only, even if JSON fields are ignored."""
    live, shadow = answer(body={"id": 1}), answer(body={"id": 2})
    live.truncated = True
    assert compare(live, shadow, ignore_json_fields=["id"]) == "body digest"


def test_strip_and_first_difference() -> None:
    """strip_json_fields removes paths without touching the input; first_difference finds paths."""
    value = {"a": {"b": 1, "c": 2}}
    assert strip_json_fields(value, ["$.a.b"]) == {"a": {"c": 2}}
    assert value == {"a": {"b": 1, "c": 2}}
    assert first_difference({"a": [1, 2]}, {"a": [1, 3]}) == "$.a[1]"
    assert first_difference({"a": 1}, {"b": 1}) == "$.a"
    assert first_difference([1], [1, 2]) == "$"
    assert first_difference(1, 1.0) == "$"
    assert first_difference({"x": None}, {"x": None}) is None


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 900, 5000, 100_000])
def test_json_nested_too_deep_is_compared_by_digest(depth: int) -> None:
    """JSON nested past MAX_JSON_DEPTH (near, at and far past the recursion limit, where the
    decoder itself gives up) is a body digest difference, never an exception."""
    live = answer(body=b"[" * depth + b"1" + b"]" * depth)
    shadow = answer(body=b"[" * depth + b"2" + b"]" * depth)
    assert compare(live, shadow, ignore_json_fields=["a.b"]) == (
        f"body digest (JSON deeper than {MAX_JSON_DEPTH} levels)")
    assert compare(live, live) is None


def test_json_down_to_the_depth_limit_is_compared_field_by_field() -> None:
    """Objects nested exactly MAX_JSON_DEPTH levels are still compared by field path."""
    def nested(leaf: int) -> dict[str, Any]:
        value: dict[str, Any] = {"v": leaf}
        for _ in range(MAX_JSON_DEPTH - 1):
            value = {"k": value}
        return value

    what = compare(answer(body=nested(1)), answer(body=nested(2)))
    assert what == "json field $" + ".k" * (MAX_JSON_DEPTH - 1) + ".v"


@pytest.mark.parametrize(
    ("target", "redacted"),
    [
        ("/", "/"),
        ("/a/b", "/a/b"),
        ("/s?q=alice%40example.com", "/s?q=REDACTED"),
        ("/s?token=t&page=2&flag&=x", "/s?token=REDACTED&page=REDACTED&flag&=REDACTED"),
        ("/s?", "/s?"),
        ("/p#frag", "/p"),
        ("http://user:pw@host:8080/p?k=v", "http://host:8080/p?k=REDACTED"),
        ("/" + "x" * 300, "/" + "x" * (MAX_SAMPLE_TEXT - 1) + "..."),
    ],
)
def test_redact_target_keeps_the_path_and_the_query_keys(target: str, redacted: str) -> None:
    """A sample's path: query values and userinfo replaced or dropped, length bounded."""
    assert redact_target(target) == redacted


def test_mismatch_sample_is_bounded_and_holds_no_body() -> None:
    """A sample's difference is cut at MAX_SAMPLE_TEXT; answers are status, size and digest
    (a "+" when the body was longer than what was kept)."""
    live, shadow = answer(body=b'{"secret": 1}'), answer(503, body=b"x" * 10)
    shadow.truncated = True
    job = MirrorJob(host="h", port=1, method="GET", target="/p?k=v", head=b"", body=b"",
                    live=live, ignore_headers=frozenset(), ignore_json_fields=())
    sample = mismatch_sample(job, shadow, "header " + "x" * 500)
    assert sample.path == "/p?k=REDACTED" and len(sample.what) == MAX_SAMPLE_TEXT + 3
    assert sample.live == f"200, 13 bytes, sha256:{live.digest[:16]}"
    assert sample.shadow == f"503, 10+ bytes, sha256:{shadow.digest[:16]}"


def test_shadow_head_drops_credentials_unless_kept() -> None:
    """Cookie, Authorization and Proxy-Authorization (any case) go; kept ones and the rest stay;
    a head with none is returned as it is."""
    head = (b"GET /?a=1 HTTP/1.1\r\nHost: h\r\nCookie: c=1\r\nauthorization: x\r\n"
            b"Proxy-Authorization: p\r\nX-Cookie: y\r\n\r\n")
    assert shadow_head(head, frozenset()) == b"GET /?a=1 HTTP/1.1\r\nHost: h\r\nX-Cookie: y\r\n\r\n"
    assert shadow_head(head, frozenset({b"authorization"})) == (
        b"GET /?a=1 HTTP/1.1\r\nHost: h\r\nauthorization: x\r\nX-Cookie: y\r\n\r\n")
    plain = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
    assert shadow_head(plain, frozenset()) is plain


def test_counters_keep_the_last_samples() -> None:
    """Mirror counters keep at most MAX_SAMPLES mismatch samples, the most recent ones."""
    m = MirrorCounters()
    for i in range(25):
        sample = MismatchSample(method="GET", path=f"/{i}", what="body digest") if i % 2 else None
        m.compared_pair(1.0, 2.0, sample)
    snap = m.snapshot()
    assert (snap.compared, snap.mismatched, len(snap.samples)) == (25, 12, MAX_SAMPLES)
    assert snap.samples[-1].path == "/23"
    assert sum(snap.live_latency) == 25 and sum(snap.shadow_latency) == 25


def test_slot_counters_count_5xx_as_errors() -> None:
    """A 5xx answer is an error; latency lands in one bucket."""
    c = SlotCounters()
    c.observe(200, 0.1)
    c.observe(502, 3000.0)
    snap = c.snapshot()
    assert (snap.requests, snap.errors, sum(snap.latency)) == (2, 1, 2)
