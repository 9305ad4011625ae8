"""coordinator.auth: a trust root with private files 0600, enrollment and revocation rewrite
the server's users, expired identities leave them (renewal brings them back), and a node's
permissions name only its own keys and inbox."""

from __future__ import annotations

import datetime as dt
import json
import stat
from pathlib import Path

import pytest
from cryptography import x509

from coordinator.auth import perms, pki
from coordinator.auth.enroll import (
    NOBODY,
    SERVER,
    AuthDir,
    move_store,
    next_expiry,
    parse_lifetime,
)
from coordinator.auth.routes import check_serves_routes, route_password
from coordinator.dev.cluster import ClusterSpec, render_cluster
from coordinator.errors import FleetwaveError, UsageError
from protocol import creds as creds_file


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
    assert nkey in users and "_FWN.node-1.>" in users
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
    # its inbox, the leader's heartbeat pace and its word of the releases pushed (which name
    # no node and only coordinators may publish: ``perms.operator`` allows no fw.<fleet> subject
    # but the API's)
    assert p["subscribe"]["allow"] == ["_FWN.node-1.>", "fw.default.pace", "fw.default.released"]
    assert not any(s.startswith(("fw.default.pace", "fw.default.released"))
                   for s in perms.operator("default", "alice")["publish"]["allow"])
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


T0 = dt.datetime(2027, 1, 1, 12, 0, tzinfo=dt.UTC)


def _auth(tmp_path: Path) -> AuthDir:
    d = AuthDir(tmp_path / "auth")
    d.init("default", (), "alice", now=T0)
    return d


def test_an_expired_user_is_left_out_of_the_servers_users(tmp_path: Path) -> None:
    """users.conf rendered after a node's expiry lacks its key (a comment says why), keeps
    everyone else's, and prune says whom it left out and that the file changed once."""
    d = _auth(tmp_path)
    path = d.add("node", "node-3", dt.timedelta(seconds=5), now=T0)
    d.add("node", "node-4", now=T0)
    assert creds_file.load(path, now=T0).expires == T0 + dt.timedelta(seconds=5)
    _, _, users = d.load()
    n3 = next(u for u in users if u.name == "node-3")
    assert n3.expires == T0 + dt.timedelta(seconds=5)
    assert n3.nkey in (d.path / "users.conf").read_text()
    assert next_expiry(users, T0) == n3.expires
    expired, changed = d.prune(now=T0 + dt.timedelta(seconds=5))
    text = (d.path / "users.conf").read_text()
    assert [u.name for u in expired] == ["node-3"] and changed
    assert n3.nkey not in text and "# node node-3: expired at 2027-01-01T12:00:05Z" in text
    assert next(u.nkey for u in users if u.name == "node-4") in text
    assert next_expiry(users, T0 + dt.timedelta(seconds=5)) is None
    assert d.prune(now=T0 + dt.timedelta(seconds=6)) == (expired, False)


def test_renew_keeps_the_key_or_issues_a_new_one(tmp_path: Path) -> None:
    """renew moves the expiry in auth.json and the file, with the same seed; --new-key gives a
    new seed whose key replaces the old one in users.conf; an unknown name is one line."""
    d = _auth(tmp_path)
    path = d.add("node", "node-3", dt.timedelta(seconds=5), now=T0)
    before = creds_file.parse(path.read_text(), "x")
    later = T0 + dt.timedelta(hours=1)
    same = d.renew("node-3", dt.timedelta(days=30), now=later)
    after = creds_file.parse(path.read_text(), "x")
    assert after.seed == before.seed and after.expires == later + dt.timedelta(days=30)
    assert same.nkey in (d.path / "users.conf").read_text()
    fresh = d.renew("node-3", None, new_key=True, now=later)
    text = (d.path / "users.conf").read_text()
    assert fresh.nkey != same.nkey and fresh.nkey in text and same.nkey not in text
    assert creds_file.parse(path.read_text(), "x").expires is None
    path.unlink()
    with pytest.raises(UsageError, match="--new-key"):
        d.renew("node-3", None, now=later)
    with pytest.raises(UsageError, match="no node or operator named"):
        d.renew("node-9", None, now=later)


def test_lifetimes_take_days_and_refuse_nonsense() -> None:
    """--expires takes '90d', '1d12h' and plain durations; a bare number or 0 is one line."""
    assert parse_lifetime("90d") == dt.timedelta(days=90)
    assert parse_lifetime("1d12h") == dt.timedelta(days=1, hours=12)
    assert parse_lifetime("30s") == dt.timedelta(seconds=30)
    for bad in ("5", "0s", "9999d", "d"):
        with pytest.raises(UsageError, match="--expires"):
            parse_lifetime(bad)


def test_a_secure_members_routes_need_mutual_tls_and_the_route_user(tmp_path: Path) -> None:
    """With an auth directory a member's cluster block verifies the peer's certificate
    against the fleet's CA and asks a route user, whose password (from the server key, the
    same on every broker) is in each route URL; the server certificate may serve routes."""
    d = _auth(tmp_path)
    spec = ClusterSpec("fw-2", "127.0.0.1", 6223, ("nats-route://127.0.0.1:6222",))
    conf = render_cluster(spec, d.path)
    password = route_password(d.path)
    assert password == route_password(d.path) and len(password) == 64
    assert "verify: true" in conf and f'ca_file: "{d.path.absolute() / "ca.pem"}"' in conf
    assert f'user: "fleetwave-route"\n    password: "{password}"' in conf
    assert f'"nats-route://fleetwave-route:{password}@127.0.0.1:6222"' in conf
    assert pki.serves_routes((d.path / "server.pem").read_bytes())
    assert password not in render_cluster(spec)


def test_a_trust_root_from_before_secured_routes_is_refused_for_a_cluster(
        tmp_path: Path) -> None:
    """A server certificate naming serverAuth alone (as made before routes were secured)
    cannot serve routes: a secure cluster is refused in one line saying what to do."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = _auth(tmp_path)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    old = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
           .public_key(key.public_key()).serial_number(1)
           .not_valid_before(T0).not_valid_after(T0 + dt.timedelta(days=1))
           .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                          critical=False)
           .sign(key, hashes.SHA256()))
    (d.path / "server.pem").write_bytes(old.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(UsageError, match="made before brokers secured their routes") as info:
        check_serves_routes(d.path)
    assert "\n" not in str(info.value)


def test_with_every_identity_expired_the_users_are_never_empty(tmp_path: Path) -> None:
    """An empty users list would switch nats-server's authorization off (tried: a client
    without credentials got in): users.conf always keeps a user no one holds, allowed
    nothing."""
    d = _auth(tmp_path)
    d.revoke("alice", now=T0)
    d.renew("coordinator", dt.timedelta(seconds=1), now=T0)
    d.prune(now=T0 + dt.timedelta(seconds=1))
    text = (d.path / "users.conf").read_text()
    users = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("{ nkey")]
    assert users == [f'{{ nkey: "{NOBODY}", permissions: {{"publish": {{"deny": [">"]}}, '
                     '"subscribe": {"deny": [">"]}} }']


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


def test_prune_rewrites_users_an_older_release_wrote(tmp_path: Path) -> None:
    """A users.conf with other permissions (an older release's) is rewritten from auth.json;
    a current one is left alone."""
    d = AuthDir(tmp_path / "auth")
    d.init("default", (), "alice")
    users = tmp_path / "auth" / "users.conf"
    current = users.read_text()
    assert d.prune() == ([], False) and users.read_text() == current
    users.write_text(current.replace("fw.default.api.alice.*", "fw.default.api.>"))
    assert d.prune() == ([], True) and users.read_text() == current
    assert _mode(users) == 0o644


def test_a_trust_root_that_cannot_be_written_is_one_line_and_changes_nothing(
    tmp_path: Path,
) -> None:
    """A creds file that cannot be written (here: nodes/ is a file) is one line naming the
    file and what to do, not a traceback, and the users and auth.json stay as they were."""
    d = AuthDir(tmp_path / "auth")
    d.init("default", (), "alice")
    before = {p: (tmp_path / "auth" / p).read_bytes() for p in ("users.conf", "auth.json")}
    nodes = tmp_path / "auth" / "nodes"
    for f in nodes.iterdir():
        f.unlink()
    nodes.rmdir()
    nodes.write_text("")
    with pytest.raises(FleetwaveError, match=r"cannot write .*node-9\.creds: Not a directory; "
                       "the trust root must be a directory its owner can write") as info:
        d.add("node", "node-9")
    assert "\n" not in str(info.value)
    assert {p: (tmp_path / "auth" / p).read_bytes() for p in before} == before
    assert not [p for p in (tmp_path / "auth").iterdir() if p.name.startswith(".node-9")]


def test_a_new_directory_puts_each_role_in_its_account(tmp_path: Path) -> None:
    """init makes the accounts layout: the coordinator in FLEET (with JetStream), nodes in
    NODES, operators in OPS, each account with the exports and imports of ``perms.accounts``;
    a node may read only this release's inbox prefix there."""
    d = _auth(tmp_path)
    d.add("node", "node-1", now=T0)
    assert d.accounts()
    text = (d.path / "users.conf").read_text()
    fleet, nodes, ops = (text.index(f"  {a} {{") for a in ("FLEET", "NODES", "OPS"))
    assert "accounts {" in text and "authorization {" not in text and fleet < nodes < ops
    assert "jetstream: enabled" in text[fleet:nodes] and "jetstream" not in text[nodes:]
    assert "# coordinator coordinator" in text[fleet:nodes]
    assert "# node node-1" in text[nodes:ops] and "# operator alice" in text[ops:]
    assert '"_FWN.node-1.>"' in text and "_INBOX_node-1" not in text
    assert '{"stream": "_FWN.>"}' in text[fleet:nodes]


def test_accounts_exports_cover_every_import_once() -> None:
    """Every import of NODES and OPS from FLEET falls under exactly one of FLEET's exports of
    its kind (one that two wildcard exports match takes either's response type, by map order),
    or is exported as it is (the server takes that export before any wildcard one: the
    releases' batches of direct gets, answered by many messages)."""
    rules = perms.accounts("default")
    exports = rules["FLEET"]["exports"]
    for account in ("NODES", "OPS"):
        for imp in rules[account]["imports"]:
            kind = "service" if "service" in imp else "stream"
            source = imp[kind]
            if source["account"] != "FLEET":
                continue
            under = [e for e in exports if kind in e
                     and _matches(e[kind], source["subject"].replace(">", "x.y"))]
            exact = [e for e in under if e[kind] == source["subject"]]
            assert len(under) == 1 or len(exact) == 1, (account, source["subject"], under)


def test_an_unmigrated_directory_keeps_one_account_until_migrate(tmp_path: Path) -> None:
    """A directory made before accounts (no layout in auth.json) is rendered as before, its
    nodes and operators allowed both inbox prefixes; migrate moves it and its store's streams,
    once; revert moves both back."""
    d = _auth(tmp_path)
    d.add("node", "node-1", now=T0)
    meta = json.loads((d.path / "auth.json").read_text())
    del meta["layout"]
    (d.path / "auth.json").write_text(json.dumps(meta))
    d.prune(now=T0)
    text = (d.path / "users.conf").read_text()
    assert not d.accounts() and "authorization {" in text and "accounts" not in text
    assert '"_FWN.node-1.>"' in text and '"_INBOX_node-1.>"' in text
    assert '"_FWO.alice.>"' in text and '"_OPS_alice.>"' in text
    d.add("node", "node-2", now=T0)  # a change keeps the layout
    assert not d.accounts()
    store = tmp_path / "store"
    (store / "jetstream" / "$G" / "streams").mkdir(parents=True)
    assert d.migrate(store, now=T0) and d.accounts()
    assert "accounts {" in (d.path / "users.conf").read_text()
    assert (store / "jetstream" / "FLEET" / "streams").is_dir()
    assert not d.migrate(store, now=T0)
    assert d.migrate(store, revert=True, now=T0) and not d.accounts()
    assert (store / "jetstream" / "$G" / "streams").is_dir()
    assert "authorization {" in (d.path / "users.conf").read_text()


@pytest.mark.parametrize("case", ["both", "cluster member", "no directory"])
def test_a_store_that_cannot_move_changes_nothing(tmp_path: Path, case: str) -> None:
    """migrate checks the store before it writes anything: a store holding both accounts, a
    cluster member's (its meta group names each stream's account) and a missing one are
    refused with one line, the directory and the store as they were. (A store a running
    nats-server holds: tests/integration/test_auth_accounts.py.)"""
    d = _auth(tmp_path)
    meta = json.loads((d.path / "auth.json").read_text())
    del meta["layout"]
    (d.path / "auth.json").write_text(json.dumps(meta))
    d.prune(now=T0)
    before = (d.path / "users.conf").read_text(), (d.path / "auth.json").read_text()
    store = tmp_path / "store"
    if case != "no directory":
        (store / "jetstream" / "$G").mkdir(parents=True)
    if case == "both":
        (store / "jetstream" / "FLEET").mkdir()
    if case == "cluster member":
        (store / "jetstream" / "$SYS" / "_js_").mkdir(parents=True)
    with pytest.raises(UsageError, match={"both": "holds both", "cluster member": "cluster member",
                                          "no directory": "no directory"}[case]):
        d.migrate(store, now=T0)
    assert ((d.path / "users.conf").read_text(), (d.path / "auth.json").read_text()) == before
    assert case == "no directory" or (store / "jetstream" / "$G").is_dir()


def test_the_store_moves_to_the_fleets_account_or_nothing_changes(tmp_path: Path) -> None:
    """move_store renames jetstream/$G to jetstream/FLEET (and back); it refuses, changing
    nothing, a store holding both; nothing to move is no error."""
    store = tmp_path / "store"
    assert not move_store(store)
    (store / "jetstream" / "$G" / "streams" / "KV_x").mkdir(parents=True)
    assert move_store(store)
    assert (store / "jetstream" / "FLEET" / "streams" / "KV_x").is_dir()
    assert not (store / "jetstream" / "$G").exists()
    (store / "jetstream" / "$G").mkdir()
    with pytest.raises(UsageError, match="holds both"):
        move_store(store)
    (store / "jetstream" / "$G").rmdir()
    assert move_store(store, revert=True)
    assert (store / "jetstream" / "$G" / "streams" / "KV_x").is_dir()


def test_a_name_is_one_identity_whatever_its_role(tmp_path: Path) -> None:
    """A node may not take an operator's name (nor the coordinator's), so revoke and renew,
    which take a name only, always find one identity."""
    d = _auth(tmp_path)
    before = (d.path / "auth.json").read_text()
    with pytest.raises(UsageError, match="already the operator 'alice'"):
        d.add("node", "alice", now=T0)
    with pytest.raises(UsageError, match="already the coordinator 'coordinator'"):
        d.add("node", "coordinator", now=T0)
    d.add("node", "node-1", now=T0)
    with pytest.raises(UsageError, match="already the node 'node-1'"):
        d.add("operator", "node-1", now=T0)
    assert not (d.path / "nodes" / "alice.creds").exists()
    assert d.revoke("node-1").role == "node"
    assert (d.path / "auth.json").read_text() == before


def test_renew_keeps_only_the_identitys_own_key(tmp_path: Path) -> None:
    """A creds file holding another identity's seed (or a damaged one) is refused when the
    key is kept, changing nothing; --new-key still works."""
    d = _auth(tmp_path)
    path = d.add("node", "node-3", now=T0)
    other = creds_file.parse((d.path / "operators" / "alice.creds").read_text(), "x")
    mine = creds_file.parse(path.read_text(), "x")
    path.write_text(creds_file.render(creds_file.Creds(
        fleet="default", role="node", name="node-3", seed=other.seed)))
    before = (d.path / "auth.json").read_text()
    with pytest.raises(UsageError, match=r"missing or damaged.*--new-key"):
        d.renew("node-3", dt.timedelta(days=1), now=T0)
    bad = mine.seed[:20] + ("A" if mine.seed[20] != "A" else "B") + mine.seed[21:]  # damaged
    path.write_text(creds_file.render(creds_file.Creds(
        fleet="default", role="node", name="node-3", seed=bad)))
    with pytest.raises(UsageError, match=r"missing or damaged.*--new-key"):
        d.renew("node-3", dt.timedelta(days=1), now=T0)
    assert (d.path / "auth.json").read_text() == before
    fresh = d.renew("node-3", None, new_key=True, now=T0)
    assert fresh.nkey in (d.path / "users.conf").read_text()


@pytest.mark.parametrize("name", ["", "a" * 64 + ".example.com", "bücher.example",
                                  'foo bar"}', "-lead.example", "a..b"])
def test_a_server_name_no_certificate_can_hold_is_one_line(tmp_path: Path, name: str) -> None:
    """--server-name values that broke certificate generation with a traceback (a CN of 64+
    characters, Unicode without its xn-- form, empty) or were taken as garbage SANs are refused
    in one line, and nothing is made (found by a review)."""
    with pytest.raises(UsageError, match="not a host name a certificate can hold") as info:
        AuthDir(tmp_path / "auth").init("default", (name,), "alice", now=T0)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "auth").exists()


def test_long_names_and_wildcards_are_held_with_a_fixed_common_name(tmp_path: Path) -> None:
    """A 63-character label, a 200-character name and a wildcard are fine: clients check the
    SANs; the CN is fixed (a name over 64 characters cannot be one)."""
    names = ("b" * 63 + ".example.com", ".".join(["c" * 49] * 4), "*.nats.example.com")
    AuthDir(tmp_path / "auth").init("default", names, "alice", now=T0)
    cert = x509.load_pem_x509_certificate((tmp_path / "auth" / SERVER).read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names) <= set(sans.get_values_for_type(x509.DNSName))
    assert cert.subject.rfc4514_string() == "CN=fleetwave broker"


def test_expires_far_too_long_and_init_over_a_dangling_link_are_one_line(
        tmp_path: Path) -> None:
    """--expires 99999999999d overflowed a timedelta, and init over a dangling symlink failed in
    mkdir: both tracebacks before (found by a review)."""
    with pytest.raises(UsageError, match="at most 3660d"):
        parse_lifetime("99999999999d")
    (tmp_path / "auth").symlink_to(tmp_path / "nowhere")
    with pytest.raises(UsageError, match="already exists"):
        AuthDir(tmp_path / "auth").init("default", (), "alice", now=T0)


def _verified_by_ca(auth: Path) -> x509.Certificate:
    """The server certificate, checked to be signed by the directory's CA."""
    cert = x509.load_pem_x509_certificate((auth / SERVER).read_bytes())
    ca = x509.load_pem_x509_certificate((auth / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)  # raises unless the CA signed it
    return cert


def _names(cert: x509.Certificate) -> list[str]:
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n.value) for n in sans]


def test_renew_server_issues_a_new_certificate_from_the_same_ca(tmp_path: Path) -> None:
    """A new key and certificate, signed by the fleet's CA, valid SERVER_DAYS from the renewal,
    with the names it held plus those given (kept in auth.json); users.conf is written after
    them (what the brokers reload on). The CA and the identities are untouched."""
    auth = tmp_path / "auth"
    d = AuthDir(auth)
    d.init("default", ("nats-1.example",), "alice", now=dt.datetime(2025, 1, 1, tzinfo=dt.UTC))
    old = _verified_by_ca(auth)
    ca, key, creds = ((auth / n).read_bytes() for n in ("ca.pem", "server-key.pem",
                                                         "coordinator.creds"))
    users = (auth / "users.conf").stat()
    when = dt.datetime(2027, 3, 1, tzinfo=dt.UTC)
    names, until = d.renew_server(("10.0.0.7",), now=when)
    new = _verified_by_ca(auth)
    assert names == _names(new) == ["nats-1.example", "localhost", "127.0.0.1", "10.0.0.7"]
    assert until == new.not_valid_after_utc == when + dt.timedelta(days=pki.SERVER_DAYS)
    assert new.serial_number != old.serial_number
    assert (auth / "server-key.pem").read_bytes() != key
    assert _mode(auth / "server-key.pem") == 0o600
    assert (auth / "ca.pem").read_bytes() == ca
    assert (auth / "coordinator.creds").read_bytes() == creds
    assert json.loads((auth / "auth.json").read_text())["server_names"] == names
    after = (auth / "users.conf").stat()
    assert after.st_ino != users.st_ino  # rewritten: a broker with --auth reloads on it
    assert after.st_mtime_ns >= (auth / "server.pem").stat().st_mtime_ns
    assert d.server_expiry() == until


@pytest.mark.parametrize("case", ["bad-name", "no-ca-key", "damaged-ca"])
def test_renew_server_refusals_are_one_line_and_change_nothing(tmp_path: Path, case: str) -> None:
    auth = tmp_path / "auth"
    d = AuthDir(auth)
    d.init("default", (), "alice")
    names: tuple[str, ...] = ()
    if case == "bad-name":
        names, message = ("bad name",), "is not a host name a certificate can hold"
    elif case == "no-ca-key":
        (auth / "ca-key.pem").unlink()
        message = "cannot read the fleet's CA in .*restore ca.pem and ca-key.pem"
    else:
        (auth / "ca-key.pem").write_text("not a key\n")
        message = "is damaged; restore it from a backup"
    before = {n: (auth / n).read_bytes() for n in ("server.pem", "server-key.pem", "auth.json",
                                                   "users.conf")}
    with pytest.raises(UsageError, match=message):
        d.renew_server(names)
    assert {n: (auth / n).read_bytes() for n in before} == before


def _made(tmp_path: Path, days: int) -> tuple[AuthDir, dt.datetime]:
    """An auth directory made on 2025-01-01, and that day plus ``days`` (an end to look at)."""
    d = AuthDir(tmp_path / "auth")
    born = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    d.init("default", (), "alice", now=born)
    return d, born + dt.timedelta(days=days)


def test_a_server_certificate_near_its_expiry_is_said(tmp_path: Path) -> None:
    """Within 30 days of its expiry (or past it) a line says when and how to renew; before
    that, and after a renewal, nothing."""
    from coordinator.auth.enroll import server_expiry_warning

    d, until = _made(tmp_path, pki.SERVER_DAYS)
    assert server_expiry_warning(d, until - dt.timedelta(days=31)) is None
    near = server_expiry_warning(d, until - dt.timedelta(days=29))
    assert near is not None and "expires at" in near and "fleetwave auth renew-server" in near
    past = server_expiry_warning(d, until + dt.timedelta(days=1))
    assert past is not None and "expired at" in past
    d.renew_server(now=until)
    assert server_expiry_warning(d, until + dt.timedelta(days=1)) is None


def test_a_ca_near_its_expiry_is_said_three_months_ahead(tmp_path: Path) -> None:
    """The CA (ten years) is said within 90 days of its end, and past it: a new one takes
    every host's CA file replaced, and a server certificate renewed then ends with it. A
    review found nothing said at all: the whole fleet would have stopped trusting its brokers
    on the day."""
    from coordinator.auth.enroll import ca_expiry_warning, expiry_warnings

    d, until = _made(tmp_path, pki.CA_DAYS)
    assert ca_expiry_warning(d, until - dt.timedelta(days=91)) is None
    near = ca_expiry_warning(d, until - dt.timedelta(days=89))
    assert near is not None and "the fleet's CA in" in near and "expires at" in near
    assert "fleetwave auth init" in near and "\n" not in near
    past = ca_expiry_warning(d, until + dt.timedelta(days=1))
    assert past is not None and "expired at" in past
    # A renewal near the CA's end gets a certificate that ends with it: both are said.
    d.renew_server(now=until - dt.timedelta(days=10))
    both = expiry_warnings(d, until - dt.timedelta(days=9))
    assert [w.split(" in ")[0] for w in both] == ["the fleet's CA",
                                                 "the brokers' server certificate"]


def test_prune_says_when_the_server_certificate_expires_soon(tmp_path: Path) -> None:
    """``fleetwave auth prune`` (the systemd timer's, every minute) says on stderr that the
    server certificate expired and how to renew it; after ``renew-server`` it says nothing."""
    from click.testing import CliRunner

    from coordinator.cli import cli

    d = AuthDir(tmp_path / "auth")
    d.init("default", (), "alice", now=dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
    result = CliRunner().invoke(cli, ["auth", "prune", str(d.path)])
    assert result.exit_code == 0, result.output
    assert "expired at 2022-04-05" in result.stderr and "auth renew-server" in result.stderr
    renewed = CliRunner().invoke(cli, ["auth", "renew-server", str(d.path)])
    assert renewed.exit_code == 0 and "renewed for localhost, 127.0.0.1" in renewed.stdout
    result = CliRunner().invoke(cli, ["auth", "prune", str(d.path)])
    assert result.exit_code == 0 and result.stderr == ""


def test_renew_server_keeps_key_and_certificate_a_pair(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both are written aside and renamed in turn: the certificate's rename failing puts the
    old key back (a reload would otherwise find a key beside another's certificate), one line,
    and no staged file is left."""
    d = AuthDir(tmp_path / "auth")
    d.init("default", (), "alice")
    before = {n: (d.path / n).read_bytes() for n in ("server.pem", "server-key.pem")}
    real = Path.replace

    def failing(self: Path, target: Path) -> Path:  # type: ignore[override]
        if Path(target).name == "server.pem":
            raise OSError(28, "No space left on device")
        return real(self, target)

    monkeypatch.setattr(Path, "replace", failing)
    with pytest.raises(FleetwaveError, match=r"cannot write .*server\.pem: No space left"):
        d.renew_server()
    monkeypatch.undo()
    assert {n: (d.path / n).read_bytes() for n in before} == before
    assert sorted(p.name for p in d.path.iterdir() if p.name.endswith(".new")) == []


def test_a_renewed_server_certificate_never_outlives_the_ca(tmp_path: Path) -> None:
    d = AuthDir(tmp_path / "auth")
    d.init("default", (), "alice", now=dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
    ca = x509.load_pem_x509_certificate((d.path / "ca.pem").read_bytes())
    _, until = d.renew_server(now=dt.datetime(2029, 6, 1, tzinfo=dt.UTC))
    assert until == ca.not_valid_after_utc < dt.datetime(2029, 6, 1, tzinfo=dt.UTC) + \
        dt.timedelta(days=pki.SERVER_DAYS)
