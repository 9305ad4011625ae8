"""coordinator.auth.web_tokens: the dashboard's operator tokens, their file and their check."""

from __future__ import annotations

import datetime as dt
import json
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from coordinator.auth import web_tokens
from coordinator.auth.enroll import META, AuthDir
from coordinator.auth.web_tokens import TokenDoc, TokenFile, WebToken, digest, verify
from coordinator.errors import UsageError

NOW = 1_800_000_000.0


def entry(name: str, token: str, expires: float | None = None) -> WebToken:
    return WebToken(name=name, sha256=digest(token), created=NOW - 10, expires=expires)


@pytest.mark.parametrize(
    ("presented", "expect_name", "expect_refusal"),
    [
        ("fwt_alice", "alice", ""),
        ("fwt_bob", "", "has expired"),
        ("fwt_nobody", "", "not valid (unknown or revoked)"),
        ("", "", "no operator token given"),
        ("x" * 300, "", "too long"),
        ("fwt_\udcff\udcfe", "", "not valid (not ASCII)"),
        ("fwt_é", "", "not valid (not ASCII)"),
    ],
    ids=["known", "expired", "unknown", "none", "too-long", "undecodable", "not-ascii"],
)
def test_verify_names_the_operator_or_says_why_not(presented: str, expect_name: str,
                                                  expect_refusal: str) -> None:
    """A known token names its operator; an expired, unknown, empty, oversized or non-ASCII one
    (a header's undecodable bytes included) is refused with a reason and no name."""
    tokens = [entry("alice", "fwt_alice"), entry("bob", "fwt_bob", expires=NOW - 1)]
    v = verify(tokens, presented, NOW)
    assert v.name == expect_name
    assert expect_refusal in v.refusal if expect_refusal else v.refusal == ""


@pytest.mark.parametrize(
    ("doc", "why"),
    [
        (b"{nope", "is not a web token file"),
        (b'{"version": 2, "tokens": []}', "version 2"),
        (b'{"tokens": [], "extra": 1}', "is not a web token file"),
        (json.dumps({"tokens": [{"name": "a.b", "sha256": "0" * 64, "created": 1}]}).encode(),
         "token name"),
        (json.dumps({"tokens": [{"name": "coordinator", "sha256": "0" * 64, "created": 1}]})
         .encode(), "the coordinator's own"),
        (json.dumps({"tokens": [{"name": "a", "sha256": "xyz", "created": 1}]}).encode(),
         "not 64 hex digits"),
        (json.dumps({"tokens": [{"name": "a", "sha256": "0" * 64, "created": 1}] * 2}).encode(),
         "appears twice"),
    ],
    ids=["not-json", "version", "unknown-key", "bad-name", "reserved", "bad-digest", "twice"],
)
def test_a_malformed_file_is_one_line_naming_it(doc: bytes, why: str) -> None:
    """Every way a token file can be wrong is a UsageError naming the file and the fault."""
    with pytest.raises(UsageError) as err:
        web_tokens.parse(doc, "F")
    assert why in str(err.value) and "\n" not in str(err.value)


def test_add_keeps_only_the_hash_0600_and_revoke_removes_it(tmp_path: Path) -> None:
    """``add`` returns a fresh token and stores its SHA-256 alone in a 0600 file; a second
    token of the same name is refused; ``revoke`` removes it, and an unknown name is refused."""
    token, path = web_tokens.add(tmp_path / "web", "alice", None, NOW)
    assert token.startswith("fwt_") and len(token) > 40
    text = path.read_text()
    assert token not in text and digest(token) in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert verify(web_tokens.read(path), token, NOW).name == "alice"
    with pytest.raises(UsageError, match="already has a token named 'alice'"):
        web_tokens.add(tmp_path / "web", "alice", None, NOW)
    web_tokens.revoke(tmp_path / "web", "alice")
    assert web_tokens.read(path) == []
    with pytest.raises(UsageError, match="no token named 'alice'"):
        web_tokens.revoke(tmp_path / "web", "alice")


def test_token_file_rereads_on_change_and_fails_closed(tmp_path: Path) -> None:
    """A running coordinator sees a new token and a revocation at the next check; a file that
    turns malformed refuses every token until it is fixed; a bad file at start raises."""
    with pytest.raises(UsageError, match="cannot read it"):
        TokenFile(tmp_path / "web" / web_tokens.FILE_NAME)
    first, path = web_tokens.add(tmp_path / "web", "alice", None, NOW)
    tf = TokenFile(path)
    assert tf.verify(first, NOW).name == "alice"
    second, _ = web_tokens.add(tmp_path / "web", "bob", NOW + 60, NOW)
    assert tf.verify(second, NOW).name == "bob"
    assert "expired" in tf.verify(second, NOW + 61).refusal
    web_tokens.revoke(tmp_path / "web", "alice")
    assert "not valid" in tf.verify(first, NOW).refusal
    path.write_text("{broken")
    assert "cannot read its token file" in tf.verify(second, NOW).refusal
    path.unlink()
    web_tokens.add(tmp_path / "web", "carol", None, NOW)
    assert tf.current()[1] == ""


def test_parallel_adds_and_revokes_lose_nothing(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Adds and revokes running at once each hold the file from read to rewrite: every token
    added is kept and every revocation reported done holds."""
    web_tokens.add(tmp_path, "gone", None, now=1.0)
    read = web_tokens._existing

    def slow(path: Path) -> TokenDoc:
        tokens = read(path)
        time.sleep(0.02)  # widen the read-to-write window, as a slow disk would
        return tokens

    monkeypatch.setattr(web_tokens, "_existing", slow)
    names = [f"op-{i}" for i in range(6)]
    with ThreadPoolExecutor(len(names) + 1) as pool:
        done = [pool.submit(web_tokens.add, tmp_path, n, None, 1.0) for n in names]
        done.append(pool.submit(web_tokens.revoke, tmp_path, "gone"))
        for f in done:
            f.result()
    kept = web_tokens.read(tmp_path / web_tokens.FILE_NAME)
    assert sorted(t.name for t in kept) == names


@pytest.mark.parametrize("made", [False, True], ids=["no-directory", "no-file"])
def test_revoke_in_a_wrong_directory_changes_nothing(tmp_path: Path, made: bool) -> None:
    """``revoke`` given a directory that does not exist, or one without a token file (a
    typo), is refused before anything is made: no directory, no lock file."""
    typo = tmp_path / "typo-web"
    if made:
        typo.mkdir()
    with pytest.raises(UsageError, match="typo-web") as err:
        web_tokens.revoke(typo, "alice")
    assert "\n" not in str(err.value)
    assert typo.is_dir() == made
    assert not made or list(typo.iterdir()) == []


@pytest.fixture
def auth(tmp_path: Path) -> AuthDir:
    """A fleet's auth directory with operators admin, alice and bob (bob's credentials valid
    for an hour from NOW) and node node-1."""
    d = AuthDir(tmp_path / "auth")
    when = dt.datetime.fromtimestamp(NOW, dt.UTC)
    d.init("default", (), "admin", now=when)
    d.add("operator", "alice", now=when)
    d.add("operator", "bob", dt.timedelta(hours=1), now=when)
    d.add("node", "node-1", now=when)
    return d


def test_a_bound_file_takes_only_a_live_operators_name(tmp_path: Path, auth: AuthDir) -> None:
    """``add`` bound to an auth directory refuses a name that is not an operator there (never
    enrolled, a node's, expired) before it makes anything; it records the directory, and later
    adds to that file are checked against it without naming it again, and refused against
    another."""
    web = tmp_path / "web"
    for name, why in [("carol", "not an enrolled operator"), ("node-1", "not an enrolled "),
                      ("bob", "expired")]:
        with pytest.raises(UsageError, match=why):
            web_tokens.add(web, name, None, NOW + 7200, auth_dir=auth.path)
        assert not web.exists()
    _, path = web_tokens.add(web, "alice", None, NOW, auth_dir=auth.path)
    assert json.loads(path.read_text())["auth_dir"] == str(auth.path.resolve())
    with pytest.raises(UsageError, match="not an enrolled operator"):
        web_tokens.add(web, "carol", None, NOW)
    with pytest.raises(UsageError, match="is bound to the auth directory"):
        web_tokens.add(web, "bob", None, NOW, auth_dir=tmp_path / "other")
    web_tokens.add(web, "bob", None, NOW)
    assert [t.name for t in web_tokens.read(path)] == ["alice", "bob"]


def test_binding_a_file_refuses_while_it_holds_a_non_operators_token(tmp_path: Path,
                                                                   auth: AuthDir) -> None:
    """A file bound to nothing whose tokens name someone who is no operator is not bound by a
    later ``--auth-dir`` (the coordinator would then refuse that token): refused, unchanged."""
    _, path = web_tokens.add(tmp_path / "web", "dashboard-only", None, NOW)
    before = path.read_bytes()
    with pytest.raises(UsageError, match="holds tokens of dashboard-only"):
        web_tokens.add(tmp_path / "web", "alice", None, NOW, auth_dir=auth.path)
    assert path.read_bytes() == before


def test_the_coordinator_refuses_a_revoked_or_expired_operators_token(tmp_path: Path,
                                                                     auth: AuthDir) -> None:
    """A token file bound to an auth directory (apart from it, or in it): once alice is
    revoked there, her token is refused at the next check with the file unchanged, bob's is
    taken until his credentials expire; a file bound to nothing takes any name."""
    apart = tmp_path / "web"
    a, path = web_tokens.add(apart, "alice", None, NOW, auth_dir=auth.path)
    b, _ = web_tokens.add(apart, "bob", None, NOW)
    a_in, path_in = web_tokens.add(auth.path, "alice", None, NOW)
    files = [TokenFile(path), TokenFile(path_in)]
    assert (files[0].verify(a, NOW).name, files[1].verify(a_in, NOW).name) == ("alice", "alice")
    auth.revoke("alice")
    assert "'alice' is not an enrolled operator" in files[0].verify(a, NOW).refusal
    assert "'alice' is not an enrolled operator" in files[1].verify(a_in, NOW).refusal
    assert [t.name for t in web_tokens.read(path)] == ["alice", "bob"]
    assert files[0].verify(b, NOW).name == "bob"
    assert "expired at" in files[0].verify(b, NOW + 3601).refusal
    loose, loose_path = web_tokens.add(tmp_path / "loose", "carol", None, NOW)
    assert TokenFile(loose_path).verify(loose, NOW).name == "carol"


@pytest.mark.parametrize("how", ["enrolled again", "renewed with --new-key"])
def test_an_operators_token_ends_with_the_key_it_was_made_for(tmp_path: Path, auth: AuthDir,
                                                              how: str) -> None:
    """A bound token names its operator's key: alice revoked and enrolled again under the same
    name (or given a new key) no longer passes with the token made for her old key, where a
    review found it passing again by name; a token made after passes, and so does renewing
    her expiry alone (same key). A token without a key (made before) is checked by name."""
    when = dt.datetime.fromtimestamp(NOW, dt.UTC)
    old, path = web_tokens.add(tmp_path / "web", "alice", None, NOW, auth_dir=auth.path)
    tf = TokenFile(path)
    auth.renew("alice", None, now=when)  # the same key: the token still works
    assert tf.verify(old, NOW).name == "alice"
    if how == "enrolled again":
        auth.revoke("alice")
        auth.add("operator", "alice", now=when)
    else:
        auth.renew("alice", None, new_key=True, now=when)
    refusal = tf.verify(old, NOW).refusal
    assert "operator 'alice' has a new key since the token was made" in refusal, refusal
    web_tokens.revoke(tmp_path / "web", "alice")
    new, _ = web_tokens.add(tmp_path / "web", "alice", None, NOW)
    assert tf.verify(new, NOW).name == "alice"
    doc = json.loads(path.read_text())  # a token of an older fleetwave: no key, by name
    del doc["tokens"][0]["key"]
    path.write_text(json.dumps(doc))
    assert TokenFile(path).verify(new, NOW).name == "alice"


def test_a_bound_auth_directory_the_coordinator_cannot_read_refuses_every_token(
        tmp_path: Path, auth: AuthDir) -> None:
    """Unreadable at start: one line (exit 2); turned bad while running: every token refused
    until it reads again."""
    token, path = web_tokens.add(tmp_path / "web", "alice", None, NOW, auth_dir=auth.path)
    tf = TokenFile(path)
    meta = auth.path / META
    good = meta.read_bytes()
    meta.write_text("{damaged")
    assert "cannot read the auth directory" in tf.verify(token, NOW).refusal
    with pytest.raises(UsageError, match="checked against the auth directory") as err:
        TokenFile(path)
    assert "\n" not in str(err.value)
    meta.write_bytes(good)
    assert tf.verify(token, NOW).name == "alice"


def test_forget_removes_only_that_operators_token_and_makes_nothing(tmp_path: Path,
                                                                   auth: AuthDir) -> None:
    """``forget`` (what ``auth revoke`` calls) drops the name's token from the auth
    directory's own token file and keeps the others; with no such file it makes none."""
    assert web_tokens.forget(auth.path, "alice") is None
    assert not (auth.path / web_tokens.FILE_NAME).exists()
    assert not (auth.path / web_tokens.LOCK_NAME).exists()
    web_tokens.add(auth.path, "alice", None, NOW)
    web_tokens.add(auth.path, "admin", None, NOW)
    assert web_tokens.forget(auth.path, "alice") == auth.path / web_tokens.FILE_NAME
    assert [t.name for t in web_tokens.read(auth.path / web_tokens.FILE_NAME)] == ["admin"]
    assert web_tokens.forget(auth.path, "alice") is None
