"""Signing-key rotation on disk (coordinator.runtime.keyfile): KEY.next made 0600 and never
overwritten, the switch never leaves a moment without KEY, the previous key found next to KEY."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from coordinator.runtime import keyfile
from protocol.errors import ProtocolError
from protocol.signing import generate_seed, load_seed, public_key, store_seed


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "coordinator.seed"
    store_seed(path, generate_seed())
    return path


def test_begin_makes_the_next_key_0600_and_refuses_to_overwrite_it(key: Path) -> None:
    """begin writes KEY.next readable by its owner only; a second begin refuses."""
    path, pub = keyfile.begin(key)
    assert path == keyfile.next_path(key) and public_key(load_seed(path)) == pub
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(ProtocolError, match="exists already"):
        keyfile.begin(key)
    assert keyfile.stage(key) == ("begun", public_key(load_seed(key)), pub)


def test_switch_moves_the_keys_and_the_coordinator_finds_its_previous_one(key: Path) -> None:
    """After switch KEY is the new key, KEY.previous the old; the coordinator learns the old one."""
    old = public_key(load_seed(key))
    _, new = keyfile.begin(key)
    assert keyfile.switch(key) == (old, new)
    seed = load_seed(key)
    assert public_key(seed) == new and not keyfile.next_path(key).exists()
    assert keyfile.previous_key(key, seed) == old
    assert keyfile.stage(key) == ("switched", old, new)
    with pytest.raises(ProtocolError, match="not finished"):
        keyfile.begin(key)
    assert keyfile.finish(key) == old
    assert keyfile.previous_key(key, seed) is None and keyfile.stage(key)[0] == "none"


def test_switch_refuses_a_missing_next_key_and_the_same_key(key: Path) -> None:
    """Nothing to switch to, or a KEY.next equal to KEY: refused, nothing moved."""
    with pytest.raises(ProtocolError, match="begin"):
        keyfile.switch(key)
    store_seed(keyfile.next_path(key), load_seed(key))
    with pytest.raises(ProtocolError, match="same key"):
        keyfile.switch(key)
    assert not keyfile.previous_path(key).exists()


def test_a_next_key_readable_by_others_is_refused(key: Path) -> None:
    """A KEY.next with a loose mode is refused at switch (chmod 600 says the line)."""
    keyfile.begin(key)
    keyfile.next_path(key).chmod(0o644)
    with pytest.raises(ProtocolError, match="chmod 600"):
        keyfile.switch(key)


def test_no_new_key_is_made_where_a_rotation_left_only_the_previous_one(key: Path) -> None:
    """A coordinator started with KEY gone but KEY.previous there refuses to invent a key."""
    keyfile.begin(key)
    keyfile.switch(key)
    key.unlink()
    with pytest.raises(ProtocolError, match="put the new key back"):
        keyfile.coordinator_seed(key)
    assert not key.exists()


def test_a_previous_key_equal_to_the_key_is_refused(key: Path) -> None:
    """KEY.previous holding KEY's own key is a mistake named in one line."""
    store_seed(keyfile.previous_path(key), load_seed(key))
    with pytest.raises(ProtocolError, match="same key"):
        keyfile.previous_key(key, load_seed(key))
