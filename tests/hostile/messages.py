"""Hostile wire messages: every Struct's decoder, the signed envelope, the router's control
socket."""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any

import msgspec
from hypothesis import strategies as st

from agent.router.control import REQUEST_DECODER, Configure
from agent.router.errors import RouterConfigError
from agent.router.routing import build_routing
from protocol import messages
from protocol.codec import decode, encode
from protocol.errors import ProtocolError
from protocol.signing import generate_seed, public_key, sign, verify
from tests.hostile.kit import (
    CASE_SECONDS,
    blob,
    mutate,
    pick,
    raw_json_tokens,
    shaped,
    spoil,
    within,
)


@st.composite
def wire_inputs(draw: Any, tp: type[msgspec.Struct]) -> bytes:
    """Bytes for a decoder of ``tp``: schema-shaped JSON, spoiled, or broken at the byte level."""
    how = draw(pick(tuple(["shaped", "spoiled", "mutated", "raw", "bytes"])))
    if how == "raw":
        return bytes(draw(raw_json_tokens()))
    if how == "bytes":
        return bytes(draw(blob(300)))
    value = draw(shaped(tp))
    if how != "shaped":
        value = spoil(value, draw)
    data = json.dumps(value).encode()
    return mutate(data, draw) if how == "mutated" else data


def check_wire(tp: type[msgspec.Struct], data: bytes) -> None:
    """Property: a decoder yields a ``tp`` or raises ProtocolError; nothing else, promptly."""

    def run() -> None:
        try:
            value = decode(tp, data)
        except ProtocolError:
            return
        assert isinstance(value, tp)
        encode(value)  # what was accepted can be written back (no value msgspec cannot encode)

    within(CASE_SECONDS, run)


# -- signed envelopes ------------------------------------------------------------------------------

SEED = generate_seed()
TRUSTED = frozenset({public_key(SEED)})
GENUINE = messages.DesiredState(
    fleet="f", node="n1", service="hello", generation=5,
    slots={"a": messages.ReleaseRef(service="hello", version="1.0.0",
                                    digest="sha256:" + "ab" * 32, size=1)},
    weights={"a": 100},
)
GENUINE_ENVELOPE = sign(SEED, GENUINE, term=3)


@st.composite
def envelopes(draw: Any) -> bytes:
    """A genuine signed envelope with a field spoiled, or its JSON broken."""
    value = msgspec.to_builtins(GENUINE_ENVELOPE)
    how = draw(pick(tuple(["spoiled", "mutated", "genuine", "payload"])))
    if how == "spoiled":
        value = spoil(value, draw)
    elif how == "payload":
        inner = spoil(msgspec.to_builtins(GENUINE), draw)
        value["payload"] = base64.b64encode(json.dumps(inner).encode()).decode()
    data = json.dumps(value).encode()
    return mutate(data, draw) if how == "mutated" else data


def check_envelope(data: bytes) -> None:
    """Property: an envelope opens to exactly the genuine state or is refused with ProtocolError."""

    def run() -> None:
        try:
            env = decode(messages.SignedEnvelope, data)
            desired = verify(env, TRUSTED, fleet="f", node="n1", service="hello",
                             min_generation=4, min_term=3)
        except ProtocolError:
            return
        assert desired == GENUINE, f"a tampered envelope was accepted: {desired}"

    within(CASE_SECONDS, run)


# -- the router's control socket -------------------------------------------------------------------


@st.composite
def control_lines(draw: Any) -> bytes:
    """A control-socket line: a configure with a schema-shaped config, spoiled, or bytes."""
    how = draw(pick(tuple(["configure", "spoiled", "mutated", "bytes"])))
    if how == "bytes":
        return bytes(draw(blob(200)))
    value = draw(shaped(Configure))
    value["type"] = "configure"
    if how != "configure":
        value = spoil(value, draw)
    data = json.dumps(value).encode()
    return mutate(data, draw) if how == "mutated" else data


def check_control(line: bytes) -> None:
    """Property: the control decoder raises only msgspec.DecodeError, and a decoded config is
    built into a routing or refused with RouterConfigError."""

    def run() -> None:
        try:
            request = REQUEST_DECODER.decode(line)
        except msgspec.DecodeError:
            return
        if isinstance(request, Configure):
            with contextlib.suppress(RouterConfigError):
                build_routing(request.config)

    within(CASE_SECONDS, run)
