"""coordinator.auth: a trust root with private files 0600, enrollment and revocation rewrite
the server's users, and a node's permissions name only its own keys and inbox."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from coordinator.auth import perms
from coordinator.auth.enroll import AuthDir
from coordinator.errors import UsageError


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_init_makes_private_files_and_refuses_an_existing_dir(tmp_path: Path) -> None:
    """Keys and creds are 0600, the directory 0700; a second init changes nothing."""
    d = AuthDir(tmp_path / "auth")
    d.init("default", ("fw.example",), "alice")
    for name in ("ca-key.pem", "server-key.pem", "coordinator.creds", "auth.json",
                 "operators/alice.creds"):
        assert _mode(tmp_path / "auth" / name) == 0o600, name
    assert _mode(tmp_path / "auth") == 0o700
    before = (tmp_path / "auth" / "auth.json").read_text()
    with pytest.raises(UsageError, match="already exists"):
        d.init("default", (), "alice")
    assert (tmp_path / "auth" / "auth.json").read_text() == before


def test_add_and_revoke_rewrite_the_users(tmp_path: Path) -> None:
    """add-node adds one nkey user and a creds file; revoke removes both; unknown is refused."""
    d = AuthDir(tmp_path / "auth")
    d.init("default", (), "alice")
    path = d.add("node", "node-1")
    assert _mode(path) == 0o600
    users = (tmp_path / "auth" / "users.conf").read_text()
    nkey = next(u["nkey"] for u in json.loads((tmp_path / "auth" / "auth.json").read_text())
                ["users"] if u["name"] == "node-1")
    assert nkey in users and "_INBOX_node-1.>" in users
    with pytest.raises(UsageError, match="already enrolled"):
        d.add("node", "node-1")
    d.revoke("node-1")
    assert nkey not in (tmp_path / "auth" / "users.conf").read_text() and not path.exists()
    with pytest.raises(UsageError, match="no node or operator named"):
        d.revoke("node-1")
    with pytest.raises(UsageError, match="does not exist"):
        AuthDir(tmp_path / "missing").add("node", "node-2")


def test_a_node_may_touch_only_its_own_keys() -> None:
    """Every subject a node may publish or subscribe to that names a node names itself, and
    none lets it list or inspect what other nodes hold."""
    p = perms.node("default", "node-1")
    subjects = [*p["publish"]["allow"], *p["subscribe"]["allow"]]
    assert p["subscribe"]["allow"] == ["_INBOX_node-1.>"]
    assert not any("node-2" in s for s in subjects)
    assert not any(s.startswith(("$KV.fw-default-desired", "fw.default.api", "_INBOX."))
                   for s in subjects)
    # Its events go only on the subject naming it; nothing that lists or inspects what other
    # nodes hold (stream info with a subject filter, consumer info or deletion by name).
    assert "fw.default.evt.agent.node-1.>" in subjects
    assert not any(s.startswith("fw.default.evt.") and not s.startswith(
        "fw.default.evt.agent.node-1.") for s in subjects)
    assert not any(s.startswith(("$JS.API.STREAM.INFO.KV_", "$JS.API.CONSUMER.INFO.",
                                 "$JS.API.CONSUMER.DELETE.", "$JS.API.STREAM.MSG.GET.KV_"))
                   for s in subjects)
    op = perms.operator("default", "alice")
    assert "$KV.fw-default-desired.>" in op["publish"]["deny"]
