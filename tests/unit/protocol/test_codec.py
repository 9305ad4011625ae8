"""Round trips of every wire message; decoders fail with ProtocolError and nothing else."""

from __future__ import annotations

import contextlib
import itertools
import json
import sys
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import messages as m
from protocol.codec import decode, encode, shared, to_builtins
from protocol.errors import ProtocolError
from protocol.notify import Notification
from protocol.schema import WIRE_TYPES, wire_schema

REF = m.ReleaseRef(service="hello", version="2.0.0", digest="sha256:" + "ab" * 32, size=10)
DESIRED = m.DesiredState(
    fleet="default", node="node-1", service="hello", generation=7,
    slots={"a": REF}, weights={"a": 100},
    mirror=m.MirrorSpec(slot="b", percent=10.0),
)
OBSERVED = m.ObservedState(
    node="node-1", service="hello", generation=7, observed_generation=7,
    slots={"a": m.SlotStatus(slot="a", status="healthy", version="2.0.0", pid=42, port=30001)},
    weights={"a": 100},
    router=m.RouterStats(
        epoch=1.0, slots={"a": m.SlotTraffic(requests=10, latency=[0] * 53)},
        mirror=m.MirrorTraffic(samples=[m.MismatchSample(method="GET", path="/", what="body")]),
    ),
    phase="converged",
)
SPEC = m.RolloutSpec(service="hello", version="2.0.0", gates=m.Gates(max_error_rate=0.01))
SAMPLES: list[Any] = [
    m.NodeInfo(id="node-1", labels={"zone": "a"}, cpu_count=2),
    m.Heartbeat(
        node="node-1", seq=3, time=1.5,
        services=[m.ServiceSummary(service="hello", version="1.0.0", healthy=True)],
        slots=[m.SlotProcess(service="hello", slot="a", pid=5, rss=1000)],
    ),
    DESIRED,
    m.SignedEnvelope(
        fleet="default", node="node-1", service="hello", generation=7, payload=encode(DESIRED),
        key="UABC", sig=b"\x00\x01",
    ),
    OBSERVED,
    SPEC,
    m.RolloutRecord(
        id="r1", spec=SPEC, release=REF, state="running",
        waves=[m.WaveRecord(index=0, nodes=["node-1"])],
        nodes={"node-1": m.NodeProgress(node="node-1", previous=DESIRED, target=DESIRED)},
    ),
    m.Event(id="e1", time=1.0, fleet="default", kind="rollout.started", data={"n": 1}),
    m.ApiReply(ok=False, error="nope", code="usage"),
    m.NodeView(id="node-1", online=True, last_seen=1.0),
    m.NodesRequest(selector={"zone": "a"}),
    m.DeployRequest(spec=SPEC),
    m.RolloutRequest(id="r1", full=True),
    m.RollbackRequest(service="hello", to_version="1.0.0"),
    m.ListRolloutsRequest(service="hello"),
    m.CordonRequest(node="node-3", drain=True, grace=30.0),
    msgspec.structs.replace(DESIRED, drain=m.DrainSpec(grace=15.0, since=1.5, by="alice")),
    m.Cordon(node="node-3", by="alice", time=1.5, drain=True, grace=30.0),
    Notification(id="e1", what="started", severity="info", kind="rollout.started", time=1.0,
                 at="1970-01-01T00:00:01Z", fleet="default", rollout="r1", figures={"n": 1}),
]


@pytest.mark.parametrize("value", SAMPLES, ids=lambda v: type(v).__name__)
def test_round_trip(value: Any) -> None:
    """Every wire message decodes back to an equal value."""
    assert decode(type(value), encode(value)) == value


def test_every_wire_type_has_a_sample() -> None:
    """The round-trip table covers every type the schema publishes."""
    assert {type(v) for v in SAMPLES} >= set(WIRE_TYPES)


def test_unknown_fields_are_accepted_on_the_wire() -> None:
    """A newer peer's extra field does not break an older decoder (mixed versions in upgrades)."""
    data = to_builtins(DESIRED) | {"from_the_future": [1, 2]}
    assert decode(m.DesiredState, json.dumps(data)) == DESIRED


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"", "malformed DesiredState"),
        (b"{", "malformed DesiredState"),
        (b"[]", "invalid DesiredState"),
        (b'{"fleet": "x"}', "missing required field"),
        (b'{"fleet":"f","node":"n","service":"s","generation":"7"}', "Expected `int`"),
        (b"\xff\xfe", "malformed DesiredState"),
    ],
)
def test_bad_payloads_raise_protocol_error(payload: bytes, fragment: str) -> None:
    """Malformed or invalid bytes become one ProtocolError that says what is wrong."""
    with pytest.raises(ProtocolError, match=fragment):
        decode(m.DesiredState, payload)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@pytest.mark.parametrize("tp", WIRE_TYPES, ids=lambda t: t.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_never_escape(tp: type[msgspec.Struct], data: bytes) -> None:
    """Any bytes given to any decoder yield a value or a ProtocolError, nothing else."""
    with contextlib.suppress(ProtocolError):
        decode(tp, data)


@pytest.mark.parametrize("tp", WIRE_TYPES, ids=lambda t: t.__name__)
@settings(max_examples=60, deadline=None)
@given(value=_json)
def test_arbitrary_json_never_escapes(tp: type[msgspec.Struct], value: Any) -> None:
    """Any JSON document given to any decoder yields a value or a ProtocolError, nothing else."""
    with contextlib.suppress(ProtocolError):
        decode(tp, json.dumps(value))


@settings(max_examples=60, deadline=None)
@given(fields=st.dictionaries(st.sampled_from(
    ["fleet", "node", "service", "generation", "slots", "weights", "mirror", "rollout"]), _json))
def test_arbitrary_fields_never_escape(fields: dict[str, Any]) -> None:
    """Plausible objects with wrong field types yield a value or a ProtocolError."""
    with contextlib.suppress(ProtocolError):
        decode(m.DesiredState, json.dumps(fields))


def test_schema_names_every_message() -> None:
    """The published JSON Schema has a definition for every wire message."""
    schema = wire_schema()
    assert set(schema["messages"]) == {t.__name__ for t in WIRE_TYPES}
    assert "DesiredState" in schema["$defs"]
    json.dumps(schema)


def test_latency_bounds_are_increasing() -> None:
    """Histogram bucket bounds grow strictly, so a bucket index means one latency range."""
    b = m.LATENCY_BOUNDS_MS
    assert all(x < y for x, y in itertools.pairwise(b))
    assert b[0] <= 0.25 and b[-1] > 10_000


def test_a_desired_state_without_a_drain_keeps_its_bytes() -> None:
    """``drain`` is absent from the JSON unless set (every other desired state is written as
    before), and a drained one decodes with it; an older decoder ignores it (wire Structs)."""
    assert b"drain" not in encode(DESIRED)
    drained = msgspec.structs.replace(DESIRED, drain=m.DrainSpec(grace=15.0))
    raw = encode(drained)
    assert b'"drain":{"grace":15.0' in raw and decode(m.DesiredState, raw).drained == drained.drain
    assert DESIRED.drained is None


# -- shared ------------------------------------------------------------------------------------


def _observed(node: str) -> bytes:
    slots = {s: m.SlotStatus(slot=s, status="healthy", version=v, digest="sha256:" + "ab" * 32)
             for s, v in (("blue", "1.0.0"), ("green", "2.0.0"))}
    return encode(m.ObservedState(node=node, service="hello", slots=slots,
                                  weights={"green": 100}, phase="converged"))


def test_shared_values_are_equal_and_share_their_strings() -> None:
    """Two nodes' observed states decode into separate strings; shared, equal ones are one."""
    a = decode(m.ObservedState, _observed("n-1"))
    b = decode(m.ObservedState, _observed("n-2"))
    assert a.slots["blue"].digest is not b.slots["blue"].digest  # what decoding alone gives
    sa, sb = shared(decode(m.ObservedState, _observed("n-1"))), shared(b)
    assert sa == a and sb == decode(m.ObservedState, _observed("n-2"))
    assert sa.slots["blue"].digest is sb.slots["blue"].digest
    assert sa.service is sb.service and sa.slots["green"].version is sb.slots["green"].version
    assert next(iter(sa.slots)) is next(iter(sb.slots))  # dict keys too


def test_shared_sets_frozen_structs_and_keeps_their_hash() -> None:
    ref = m.ReleaseRef(service="hello", version="2.0.0", digest="sha256:" + "cd" * 32)
    raw = encode(m.DesiredState(fleet="f", node="n", service="hello", generation=1,
                                slots={"green": ref}))
    one, two = (shared(decode(m.DesiredState, raw)) for _ in range(2))
    assert one.slots["green"] == ref and hash(one.slots["green"]) == hash(ref)
    assert one.slots["green"].digest is two.slots["green"].digest


def test_shared_gives_up_quietly_on_nesting_deeper_than_the_stack() -> None:
    """A value nested past the recursion limit comes back as it was (equal), never an error."""
    deep: list[object] = []
    node = deep
    for _ in range(sys.getrecursionlimit() + 100):
        nxt: list[object] = []
        node.append(nxt)
        node = nxt
    assert shared(deep) is deep
    assert shared({"k": "v"}) == {"k": "v"}


def _strings(value: Any) -> list[str]:
    """Every string a value holds (struct fields, dict keys and values, list items)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, msgspec.Struct):
        return [s for f in value.__struct_fields__ for s in _strings(getattr(value, f))]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [*_strings(k), *_strings(v)]]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


@pytest.mark.parametrize("value", SAMPLES, ids=lambda v: type(v).__name__)
def test_shared_keeps_every_wire_message_equal_and_shares_every_string(value: Any) -> None:
    """Each message type's plan (built from its field types, UNSET and None fields included)
    gives an equal value, and two decodes of one message, shared, hold the very same strings
    (interned by ``shared``, or dict keys and Literal values msgspec shares itself)."""
    one = shared(decode(type(value), encode(value)))
    two = shared(decode(type(value), encode(value)))
    assert one == decode(type(value), encode(value))
    pairs = list(zip(_strings(one), _strings(two), strict=True))
    assert pairs and [a for a, b in pairs if a is not b] == []
