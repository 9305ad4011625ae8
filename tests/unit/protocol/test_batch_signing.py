"""protocol.signing's batch signatures: one signature over a Merkle root, a proof per envelope,
and every tampering with a state, its proof or its signature refused as with a single one."""

from __future__ import annotations

import math

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.codec import encode
from protocol.errors import ProtocolError
from protocol.messages import DesiredState, ReleaseRef, SignedEnvelope
from protocol.signing import (
    HASH_SIZE,
    MAX_PROOF,
    batch_root,
    generate_seed,
    public_key,
    sign,
    sign_batch,
    verify,
)
from tests.unit.protocol.test_signing import flip_a_byte

SEED = generate_seed()
PUB = public_key(SEED)
OTHER = generate_seed()


def desired(node: str, **over: object) -> DesiredState:
    base: dict[str, object] = dict(
        fleet="prod", node=node, service="hello", generation=7,
        slots={"a": ReleaseRef(service="hello", version="2.0.0", digest="sha256:" + "ab" * 32)},
        weights={"a": 100},
    )
    base.update(over)
    return DesiredState(**base)  # type: ignore[arg-type]


def batch(n: int, *, term: int = 0, seed: bytes = SEED) -> list[SignedEnvelope]:
    return sign_batch(seed, [desired(f"node-{i}") for i in range(n)], term=term)


def check(env: SignedEnvelope, *, node: str | None = None, keys: set[str] | None = None,
          min_term: int = 0) -> DesiredState:
    return verify(env, keys if keys is not None else {PUB}, fleet="prod",
                  node=env.node if node is None else node, service="hello", min_generation=6,
                  min_term=min_term)


@pytest.mark.parametrize("n", [2, 3, 5, 8, 17, 500])
def test_every_state_of_a_batch_verifies_for_its_node_under_one_signature(n: int) -> None:
    """Each envelope verifies to its own state; all share one signature; no proof is longer
    than the tree is deep."""
    envs = batch(n)
    assert len({bytes(e.sig) for e in envs}) == 1
    for i, env in enumerate(envs):
        assert check(env) == desired(f"node-{i}")
        assert 0 < len(env.proof) <= math.ceil(math.log2(n)) * HASH_SIZE
    assert len({batch_root(e) for e in envs}) == 1


@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_states_are_signed_alone(n: int) -> None:
    envs = batch(n)
    assert len(envs) == n and all(e.proof == b"" for e in envs)
    assert all(e == sign(SEED, desired(e.node)) for e in envs)


def test_a_batch_envelope_survives_the_wire() -> None:
    env = batch(5)[3]
    again = msgspec.json.decode(encode(env), type=SignedEnvelope)
    assert check(again) == desired("node-3")


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("fleet", "staging", "bad signature"),
        ("node", "node-2", "bad signature"),
        ("service", "other", "bad signature"),
        ("generation", 99, "bad signature"),
        ("term", 5, "bad signature"),
        ("payload", encode(desired("node-1", generation=8)), "bad signature"),
        ("kind", "observed", "kind"),
        pytest.param("key", public_key(OTHER), "unknown key", id="key-another key-unknown key"),
        ("sig", b"\0" * 64, "bad signature"),
        ("sig", b"short", "signature"),
    ],
)
def test_changing_any_field_of_a_batch_envelope_is_refused(field: str, value: object,
                                                           reason: str) -> None:
    """Every bound field is in the leaf, the leaf is under the root, the root is signed."""
    env = batch(4)[1]
    setattr(env, field, value)
    with pytest.raises(ProtocolError, match=reason):
        check(env, node="node-1")


def test_a_state_cannot_borrow_another_envelopes_proof_or_drop_its_own() -> None:
    """Another node's proof leads elsewhere; no proof means 'signed alone', which it is not."""
    envs = batch(4)
    envs[0].proof = envs[1].proof
    with pytest.raises(ProtocolError, match="bad signature"):
        check(envs[0])
    envs[2].proof = b""
    with pytest.raises(ProtocolError, match="bad signature"):
        check(envs[2])


def test_a_single_signature_cannot_pass_as_a_batch_one() -> None:
    """A state signed alone, given a made-up proof, is refused: the domains differ."""
    env = sign(SEED, desired("node-1"))
    env.proof = b"\1" * HASH_SIZE
    with pytest.raises(ProtocolError, match="bad signature"):
        check(env)


def test_a_state_signed_into_another_batch_is_refused_with_this_batchs_signature() -> None:
    """A genuine leaf of batch A under batch B's signature: the roots differ."""
    a, b = batch(4), sign_batch(SEED, [desired(f"node-{i}", generation=9) for i in range(4)])
    a[2].sig = b[2].sig
    with pytest.raises(ProtocolError, match="bad signature"):
        check(a[2])


@pytest.mark.parametrize("proof", [b"\0" * 31, b"\0" * 33, b"\0" * HASH_SIZE * (MAX_PROOF + 1)],
                         ids=["short", "ragged", "too long"])
def test_an_unusable_proof_is_refused_saying_so(proof: bytes) -> None:
    env = batch(3)[0]
    env.proof = proof
    with pytest.raises(ProtocolError, match="unusable batch proof"):
        check(env)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_flipping_any_byte_of_proof_payload_or_signature_is_refused(data: st.DataObject) -> None:
    """Property: any single changed byte of a batch envelope's proof, payload or signature is
    refused, also after the genuine batch was verified (and its root remembered)."""
    envs = batch(9)
    check(envs[0])
    env = envs[data.draw(st.integers(0, 8))]
    flip_a_byte(data, env, ["payload", "sig", "proof"])
    with pytest.raises(ProtocolError):
        check(env)


def test_a_forged_root_is_refused_every_time_not_remembered() -> None:
    """A failed check is not cached: the same forgery is refused again, and the genuine
    batch still verifies after it."""
    envs = batch(3)
    forged = msgspec.structs.replace(envs[0], sig=b"\0" * 64)
    for _ in range(2):
        with pytest.raises(ProtocolError, match="bad signature"):
            check(forged)
    assert check(envs[0]) == desired("node-0")


def test_the_term_of_a_batch_is_bound_and_checked() -> None:
    env = batch(3, term=4)[1]
    assert check(env, min_term=4) == desired("node-1")
    with pytest.raises(ProtocolError, match="lease term 4 is older than term 5"):
        check(env, min_term=5)
