"""The agent's state file: atomic writes, tolerant of a missing file, refusing a corrupt one."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from agent.host.state import AgentState, ServiceRecord, SlotRecord, load_state, save_state
from protocol.messages import SignedEnvelope


def _state() -> AgentState:
    env = SignedEnvelope(
        fleet="f", node="n", service="hello", generation=3, payload=b"{}", key="K", sig=b"s"
    )
    slot = SlotRecord(
        slot="a",
        status="healthy",
        digest="sha256:1",
        pid=42,
        create_time=1.5,
        port=40000,
        generation=3,
    )
    svc = ServiceRecord(
        service="hello",
        envelope=env,
        generation=3,
        slots={"a": slot},
        router_pid=7,
        router_socket="/x.sock",
        router_weights={"a": 100},
    )
    return AgentState(node="n", services={"hello": svc})


def test_round_trip(tmp_path: Path) -> None:
    """What is saved is read back equal."""
    p = tmp_path / "state.json"
    save_state(p, _state())
    assert load_state(p) == _state()


def test_missing_file_is_an_empty_state(tmp_path: Path) -> None:
    """A first start has no file: the state is empty, nothing is raised."""
    assert load_state(tmp_path / "nope.json") == AgentState()


def test_corrupt_file_is_kept_aside_and_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A corrupt file gives an empty state, is kept as .corrupt, and one error line says so."""
    p = tmp_path / "state.json"
    p.write_bytes(b'{"services": {"hello": {"service": 12')
    with caplog.at_level(logging.ERROR, logger="fleetwave.agent.state"):
        assert load_state(p) == AgentState()
    assert (tmp_path / "state.json.corrupt").read_bytes().startswith(b'{"services"')
    assert not p.exists()
    assert "corrupt" in caplog.text and "state.json.corrupt" in caplog.text


def test_wrong_types_count_as_corrupt(tmp_path: Path) -> None:
    """Valid JSON of the wrong shape is refused like a truncated file."""
    p = tmp_path / "state.json"
    p.write_bytes(b'{"services": []}')
    assert load_state(p) == AgentState()
    assert (tmp_path / "state.json.corrupt").exists()


def test_save_replaces_atomically_and_leaves_no_temp(tmp_path: Path) -> None:
    """Saving over an old file replaces it whole and leaves no temp file behind."""
    p = tmp_path / "state.json"
    save_state(p, AgentState(node="old"))
    inode_before = p.stat().st_ino
    save_state(p, _state())
    assert load_state(p).node == "n"
    assert p.stat().st_ino != inode_before  # a new file was renamed over, not rewritten in place
    assert sorted(os.listdir(tmp_path)) == ["state.json"]


def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the rename fails the old state is intact and the temp file is removed."""
    p = tmp_path / "state.json"
    save_state(p, AgentState(node="old"))

    def boom(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        save_state(p, _state())
    monkeypatch.undo()
    assert load_state(p).node == "old"
    assert sorted(os.listdir(tmp_path)) == ["state.json"]


def test_overlapping_writers_never_leave_a_mixed_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two saves that overlap (a final save while a threaded one is mid-write) each write whole.

    The agent saves from a worker thread and again on shutdown; a shared temp name let the
    second writer truncate the first one's temp file, which then got the tail of a longer state.
    """
    p = tmp_path / "state.json"
    long_state = _state()
    short_state = AgentState(node="short")
    real_write = os.write
    nested = []

    def write(fd: int, data: object) -> int:
        if not nested:
            nested.append(True)
            save_state(p, long_state)  # the other writer, between our open and our write
        return real_write(fd, data)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "write", write)
    save_state(p, short_state)
    monkeypatch.undo()
    assert load_state(p) == short_state  # the last rename wins, whole
    assert sorted(os.listdir(tmp_path)) == ["state.json"]
