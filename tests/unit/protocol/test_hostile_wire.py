"""Hostile wire messages: every Struct's decoder, the signed envelope and the router's control
socket, fuzzed with the strategies of ``tests.hostile`` (bounded and derandomized here; the
100k-case run is ``tests/perf/fuzz_inputs.py``)."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings

from tests import hostile
from tests.hostile import CI


@pytest.mark.parametrize("tp", hostile.WIRE_STRUCTS, ids=lambda t: t.__name__)
def test_every_decoder_yields_its_type_or_protocol_error(tp: type[msgspec.Struct]) -> None:
    """Schema-shaped, spoiled and broken JSON given to any Struct's decoder gives a value of
    that type or a ProtocolError, promptly, and nothing else."""

    @settings(CI, max_examples=50)  # times 31 types
    @given(data=hostile.wire_inputs(tp))
    def run(data: bytes) -> None:
        hostile.check_wire(tp, data)

    run()


@CI
@given(data=hostile.envelopes())
def test_a_spoiled_envelope_never_opens(data: bytes) -> None:
    """A signed envelope with any field spoiled or its bytes broken is refused with
    ProtocolError; only the genuine one opens, to exactly the state that was signed."""
    hostile.check_envelope(data)


@CI
@given(line=hostile.control_lines())
def test_control_lines_are_refused_or_built(line: bytes) -> None:
    """A control-socket line decodes or raises msgspec.DecodeError; a decoded config is built
    or refused with RouterConfigError, never another exception."""
    hostile.check_control(line)


def test_every_struct_is_fuzzed() -> None:
    """The fuzzed types are every Struct of protocol.messages (a new one is fuzzed at once)."""
    assert {t.__name__ for t in hostile.WIRE_STRUCTS} >= {"DesiredState", "SignedEnvelope"}
    assert len(hostile.WIRE_STRUCTS) >= 30
