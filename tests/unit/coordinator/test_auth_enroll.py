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
    """Every subject a node may publish or subscribe to that names a node names itself."""
    p = perms.node("default", "node-1")
    subjects = [*p["publish"]["allow"], *p["subscribe"]["allow"]]
    assert p["subscribe"]["allow"] == ["_INBOX_node-1.>"]
    assert not any("node-2" in s for s in subjects)
    assert not any(s.startswith(("$KV.fw-default-desired", "fw.default.api", "_INBOX."))
                   for s in subjects)
    op = perms.operator("default", "alice")
    assert "$KV.fw-default-desired.>" in op["publish"]["deny"]


def _matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: '*' one token, a final '>' one or more."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


def _may_publish(p: perms.Permissions, subject: str) -> bool:
    allow = any(_matches(a, subject) for a in p["publish"]["allow"])
    return allow and not any(_matches(d, subject) for d in p["publish"].get("deny", []))


@pytest.mark.parametrize(("subject", "allowed"), [
    ("fw.default.api.alice.deploy", True),
    ("fw.default.coord.c0ffee.api.alice.abort", True),
    ("fw.default.api.deploy", True),  # an older CLI's: the coordinator refuses its writes
    ("fw.default.api.bob.deploy", False),
    ("fw.default.coord.c0ffee.api.bob.abort", False),
    ("fw.default.api.coordinator.deploy", False),
    ("fw.default.coord.c0ffee.api.coordinator.abort", False),
    ("fw.other.api.alice.deploy", False),
])
def test_an_operator_may_ask_the_api_only_as_itself(subject: str, allowed: bool) -> None:
    """Operator alice may publish API requests on subjects naming her and no one else (nor a
    forwarding subject naming another caller), so the caller a coordinator reads is hers."""
    assert _may_publish(perms.operator("default", "alice"), subject) is allowed


def test_a_node_may_ask_no_api() -> None:
    """No API subject of any form is open to a node."""
    p = perms.node("default", "node-1")
    for subject in ("fw.default.api.node-1.deploy", "fw.default.api.deploy",
                    "fw.default.coord.c0.api.node-1.abort", "fw.default.api.node-1.status"):
        assert not _may_publish(p, subject), subject


@pytest.mark.parametrize("name", ["coordinator", "unknown"])
def test_the_audit_logs_own_names_are_no_operators(tmp_path: Path, name: str) -> None:
    """add-operator and init refuse the names the coordinator records for itself."""
    d = AuthDir(tmp_path / "auth")
    with pytest.raises(UsageError, match="reserved"):
        d.init("default", (), name)
    d.init("default", (), "admin")
    with pytest.raises(UsageError, match="reserved"):
        d.add("operator", name)


def test_refresh_rewrites_users_an_older_release_wrote(tmp_path: Path) -> None:
    """A users.conf with other permissions (an older release's) is rewritten from auth.json;
    a current one is left alone."""
    d = AuthDir(tmp_path / "auth")
    d.init("default", (), "alice")
    users = tmp_path / "auth" / "users.conf"
    current = users.read_text()
    assert d.refresh() is False and users.read_text() == current
    users.write_text(current.replace("fw.default.api.alice.*", "fw.default.api.>"))
    assert d.refresh() is True and users.read_text() == current
    assert _mode(users) == 0o644
