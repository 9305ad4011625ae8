"""coordinator.dev.broker with --auth: a users.conf that cannot be re-rendered at an expiry is
said once and tried again, never the end of the watch that applies revocations."""

from __future__ import annotations

import datetime as dt
import errno
import logging
import os
from pathlib import Path

import pytest

from coordinator.auth.enroll import USERS, AuthDir
from coordinator.dev.broker import Broker

T0 = dt.datetime(2020, 1, 1, 12, 0, tzinfo=dt.UTC)  # the broker renders for the real now


def test_a_failed_re_render_is_retried_and_keeps_the_expiry_due(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A full disk at an expiry is one warning, leaves the expiry due (the next poll tries
    again) and the render succeeds once space is back."""
    d = AuthDir(tmp_path / "auth")
    d.init("default", (), "alice", now=T0)
    d.add("node", "short", dt.timedelta(seconds=1), now=T0)
    b = Broker(auth=d.path, store_dir=tmp_path / "store")
    b._pruned_at = T0

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", full)
        with caplog.at_level(logging.WARNING):
            b._prune()
            b._prune()
    assert [r.getMessage() for r in caplog.records if "cannot re-render" in r.getMessage()] \
        == [f"cannot re-render {d.path / USERS}: cannot write {d.path / USERS}: No space left "
            "on device; the trust root must be a directory its owner can write (run as that "
            "user, or fix its modes)"]
    assert b._pruned_at == T0 and b._next_expiry() == T0 + dt.timedelta(seconds=1)
    b._prune()
    assert b._pruned_at > T0 and b._next_expiry() is None
    assert "# node short: expired at" in (d.path / USERS).read_text()


def test_a_broker_says_when_its_server_certificate_expires_soon(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A certificate made in 2020 expired long ago: the broker's check says so and how to renew
    (at its start and every few hours while it runs); renewed, it says nothing."""
    d = AuthDir(tmp_path / "auth")
    d.init("default", (), "alice", now=T0)
    b = Broker(auth=d.path, store_dir=tmp_path / "store")
    with caplog.at_level(logging.WARNING):
        b._check_certificate()
        [said] = [r.getMessage() for r in caplog.records]
        assert "server certificate" in said and "expired at 2022-04-05" in said
        assert f"fleetwave auth renew-server {d.path}" in said
        caplog.clear()
        d.renew_server()
        b._check_certificate()
    assert not caplog.records
