"""``fleetwave auth migrate DIR --store S`` refuses a store that is no directory even when DIR
is already migrated: it used to exit 0 saying the streams in S "already" used the accounts."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from coordinator.auth.enroll import AuthDir
from coordinator.cli import main

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def test_a_missing_store_of_a_migrated_directory_exits_2_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """A directory made with accounts, a --store that does not exist: exit 2, one line naming
    it, auth.json unchanged."""
    d = AuthDir(tmp_path / "auth")
    d.init("default", (), "alice", now=T0)
    assert d.accounts()
    before = (d.path / "auth.json").read_text()
    missing = tmp_path / "nonexistent"
    with pytest.raises(SystemExit) as info:
        main(["auth", "migrate", str(d.path), "--store", str(missing)])
    out, err = capsys.readouterr()
    assert info.value.code == 2 and "already" not in out + err
    assert err.strip() == f"fleetwave: {missing} is no directory: pass the JetStream store_dir " \
        "of the nats-server that serves this fleet (fleetwave broker's --store-dir)"
    assert (d.path / "auth.json").read_text() == before
