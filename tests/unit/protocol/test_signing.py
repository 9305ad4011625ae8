"""protocol.signing: seeds on disk, and envelopes that refuse every tampering and replay."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import msgspec
import nkeys
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.codec import encode
from protocol.errors import ProtocolError
from protocol.messages import DesiredState, ReleaseRef, SignedEnvelope
from protocol.signing import (
    generate_seed,
    load_seed,
    public_key,
    sign,
    signed_bytes,
    store_seed,
    verify,
)

SEED = generate_seed()
PUB = public_key(SEED)
OTHER = generate_seed()


def desired(**over: object) -> DesiredState:
    base: dict[str, object] = dict(
        fleet="prod", node="node-1", service="hello", generation=7,
        slots={"a": ReleaseRef(service="hello", version="2.0.0", digest="sha256:" + "ab" * 32)},
        weights={"a": 100},
    )
    base.update(over)
    return DesiredState(**base)  # type: ignore[arg-type]


def check(env: SignedEnvelope, *, keys: set[str] | None = None, min_generation: int = 6,
          node: str = "node-1") -> DesiredState:
    return verify(env, keys if keys is not None else {PUB}, fleet="prod", node=node,
                  service="hello", min_generation=min_generation)


def test_sign_then_verify_returns_the_desired_state() -> None:
    """A genuine envelope for this node, newer than what it has, verifies to the same state."""
    d = desired()
    assert check(sign(SEED, d)) == d


def test_envelope_survives_the_wire() -> None:
    """Encoding and decoding the envelope as JSON keeps it verifiable."""
    env = sign(SEED, desired())
    again = msgspec.json.decode(encode(env), type=SignedEnvelope)
    assert check(again) == desired()


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("fleet", "staging", "bad signature"),
        ("node", "node-2", "bad signature"),
        ("service", "other", "bad signature"),
        ("generation", 99, "bad signature"),
        ("kind", "observed", "kind"),
        # An explicit id: the key is random, and pytest-xdist needs the same test ids in every
        # worker's collection.
        pytest.param("key", public_key(OTHER), "unknown key", id="key-another key-unknown key"),
        ("sig", b"\0" * 64, "bad signature"),
        ("sig", b"short", "signature"),
    ],
)
def test_changing_any_envelope_field_is_refused(field: str, value: object, reason: str) -> None:
    """Every envelope field is bound: changing one refuses the envelope with the reason."""
    env = sign(SEED, desired())
    setattr(env, field, value)
    with pytest.raises(ProtocolError, match=reason):
        check(env)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_flipping_any_payload_or_signature_byte_is_refused(data: st.DataObject) -> None:
    """Property: any single changed byte of payload or signature is refused."""
    env = sign(SEED, desired())
    flip_a_byte(data, env, ["payload", "sig"])
    with pytest.raises(ProtocolError):
        check(env)


def flip_a_byte(data: st.DataObject, env: SignedEnvelope, fields: list[str]) -> None:
    """Change one byte, drawn by ``data``, of one of ``env``'s bytes ``fields``."""
    target = data.draw(st.sampled_from(fields))
    raw = bytearray(getattr(env, target))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    setattr(env, target, bytes(raw))


def test_unknown_key_is_refused_even_if_the_signature_is_valid() -> None:
    """A correct signature by a key the agent does not trust is refused."""
    with pytest.raises(ProtocolError, match="unknown key"):
        check(sign(OTHER, desired()))


def test_envelope_for_another_node_is_refused() -> None:
    """A genuine envelope for node-1 replayed to node-2 is refused."""
    with pytest.raises(ProtocolError, match="addressed to node 'node-1'"):
        check(sign(SEED, desired()), node="node-2")


@pytest.mark.parametrize("min_generation", [7, 8, 100])
def test_old_or_same_generation_is_a_replay(min_generation: int) -> None:
    """A generation not newer than the last applied one is refused as a replay."""
    with pytest.raises(ProtocolError, match="not newer"):
        check(sign(SEED, desired()), min_generation=min_generation)


@pytest.mark.parametrize(
    ("field", "value"), [("node", "node-9"), ("fleet", "x"), ("service", "s"), ("generation", 8)]
)
def test_payload_disagreeing_with_envelope_is_refused(field: str, value: object) -> None:
    """A signer that wraps a payload for another target in this envelope is still refused."""
    env = sign(SEED, desired())
    env.payload = encode(desired(**{field: value}))
    env.sig = _resign(env)
    with pytest.raises(ProtocolError, match=f"payload {field}"):
        check(env)


def test_garbage_payload_with_valid_signature_is_a_protocol_error() -> None:
    """Signed garbage is refused as malformed, never with another exception."""
    env = sign(SEED, desired())
    env.payload = b"{not json"
    env.sig = _resign(env)
    with pytest.raises(ProtocolError, match="malformed"):
        check(env)


def test_non_coordinator_key_text_is_refused() -> None:
    """A trusted-looking key that is not an nkeys account key is refused, not crashed on."""
    env = sign(SEED, desired())
    env.key = "not-a-key"
    with pytest.raises(ProtocolError):
        check(env, keys={"not-a-key"})


def test_signed_bytes_are_unambiguous() -> None:
    """Moving bytes between fields changes the signed bytes (length prefixes)."""
    a = SignedEnvelope(fleet="ab", node="c", service="s", generation=1, payload=b"")
    b = SignedEnvelope(fleet="a", node="bc", service="s", generation=1, payload=b"")
    assert signed_bytes(a) != signed_bytes(b)


def test_seed_file_round_trip_is_private(tmp_path: Path) -> None:
    """store_seed writes 0600 atomically (no temp left); load_seed reads it back."""
    path = tmp_path / "coordinator.nk"
    store_seed(path, SEED)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_seed(path) == SEED
    assert [p.name for p in tmp_path.iterdir()] == ["coordinator.nk"]
    store_seed(path, OTHER)  # replacing keeps the file private and whole
    assert load_seed(path) == OTHER


def test_load_seed_refuses_readable_or_bogus_files(tmp_path: Path) -> None:
    """A seed others can read, a missing file, or one without a seed are one-line errors."""
    path = tmp_path / "k"
    store_seed(path, SEED)
    path.chmod(0o644)
    with pytest.raises(ProtocolError, match="chmod 600"):
        load_seed(path)
    path.write_bytes(b"hello")
    path.chmod(0o600)
    with pytest.raises(ProtocolError, match="does not hold"):
        load_seed(path)
    with pytest.raises(ProtocolError, match="cannot read"):
        load_seed(tmp_path / "missing")


def test_store_seed_refuses_non_seed(tmp_path: Path) -> None:
    """Storing something that is not a seed fails before touching the disk."""
    with pytest.raises(ProtocolError):
        store_seed(tmp_path / "k", b"SXXXX")
    assert list(tmp_path.iterdir()) == []


def _resign(env: SignedEnvelope) -> bytes:
    """Sign ``env`` as it is now, as a (trusted) signer that wraps the wrong payload would."""
    sig: bytes = nkeys.from_seed(SEED).sign(signed_bytes(env))
    return sig


@pytest.mark.parametrize(("signed", "forged"), [(3, 4), (3, 0), (0, 5)])
def test_the_lease_term_is_bound(signed: int, forged: int) -> None:
    """A term changed after signing (raised, dropped, or added) breaks the signature."""
    env = sign(SEED, desired(), term=signed)
    env.term = forged
    with pytest.raises(ProtocolError, match="bad signature"):
        check(env)


def test_a_lower_term_than_the_one_run_is_refused_and_an_equal_or_higher_accepted() -> None:
    """A deposed leader's state (or a replay of one) is refused even with a newer generation."""
    env = sign(SEED, desired(generation=9), term=2)
    with pytest.raises(ProtocolError, match="lease term 2 is older than term 3"):
        verify(env, {PUB}, fleet="prod", node="node-1", service="hello", min_generation=6,
               min_term=3)
    for seen in (0, 1, 2):
        assert verify(env, {PUB}, fleet="prod", node="node-1", service="hello",
                      min_generation=6, min_term=seen).generation == 9


def test_a_negative_term_is_refused() -> None:
    with pytest.raises(ProtocolError, match="lease term"):
        check(sign(SEED, desired(), term=-1))


def test_load_seed_refuses_a_key_not_surely_the_coordinators(tmp_path: Path) -> None:
    """Something not a regular file, or a user seed (SU...), are one-line errors naming the
    file; a symbolic link to our own key is followed (keys are often managed so)."""
    path = tmp_path / "k"
    store_seed(path, SEED)
    link = tmp_path / "link"
    link.symlink_to(path)
    assert load_seed(link) == load_seed(path)
    with pytest.raises(ProtocolError, match="not a regular file"):
        load_seed(tmp_path)
    user = nkeys.encode_seed(bytes(32), nkeys.PREFIX_BYTE_USER)
    path.write_bytes(user + b"\n")
    with pytest.raises(ProtocolError, match=r"another kind \(SU\.\.\.\)"):
        load_seed(path)


def test_load_seed_refuses_a_key_another_user_owns(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A private seed file owned by neither this user nor root could have been planted, also
    behind a symbolic link: the checks hold for the file the link names."""
    path = tmp_path / "k"
    store_seed(path, SEED)
    link = tmp_path / "link"
    link.symlink_to(path)
    if os.geteuid() == 0:  # root is trusted as an owner: plant it as nobody
        os.chown(path, 65534, 65534)
    else:  # only root may chown: be another user instead
        monkeypatch.setattr(os, "geteuid", lambda: path.stat().st_uid + 1)
    for planted in (path, link):
        with pytest.raises(ProtocolError, match="owned by uid"):
            load_seed(planted)
