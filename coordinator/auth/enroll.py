"""A fleet's auth directory: made by ``fleetwave auth init``, grown and shrunk by ``add-node``,
``add-operator`` and ``revoke``, served by ``fleetwave broker --auth DIR``.

Layout (private files 0600, the directory 0700)::

    DIR/auth.json            fleet, server names, every identity (role, name, nkey public key)
    DIR/ca.pem  ca-key.pem   the fleet's CA (clients pass ca.pem with --tls-ca)
    DIR/server.pem  server-key.pem
    DIR/users.conf           nats-server include: one nkey user per identity, with its permissions
    DIR/coordinator.creds    the coordinators' identity (one for every replica)
    DIR/operators/NAME.creds
    DIR/nodes/NODE.creds     the one file an agent needs (with ca.pem)

Why nkey users in a server config and not NATS JWTs (operator, account, user): one broker config
is the whole truth, kept in one directory; adding or revoking is rewriting ``users.conf`` and a
config reload (SIGHUP), which nats-server applies to live connections (a removed user is
disconnected, changed permissions hold at once) without dropping anyone else. JWTs need an
account resolver and signing keys per account, which pay off with many accounts or many
servers managed apart; a fleet is three fixed accounts. The server never holds a private key
either way.

**Layout.** ``users.conf`` puts the fleet in three accounts (``coordinator.auth.perms``:
FLEET, NODES, OPS; ``auth.json``'s ``"layout": "accounts"``), so that no node or operator can
have the server write into the fleet's streams. A directory made before session 23 has no
layout (one account, the server's global ``$G``) until ``fleetwave auth migrate``: its users
are rendered as before, each node and operator allowed both inbox prefixes. JetStream keeps an
account's streams under ``<store_dir>/jetstream/<account>``: ``migrate`` moves ``$G``'s to FLEET
with the users, the server stopped (``check_store`` first, so a store that cannot move changes
nothing); ``fleetwave broker --auth`` moves them at its start if a directory in the accounts
finds them still in ``$G``, and never reloads into another layout (only a restart moves them).

Every change writes ``users.conf`` from ``auth.json`` whole, atomically (temp file, rename), and
``auth.json`` last, so an interrupted command leaves the previous state or the new one; changes
hold ``DIR/.lock`` (flock), so a broker re-rendering at an expiry never interleaves with one.

**Expiry.** nkey users have no expiry in nats-server, so it is kept here: an identity issued with
``--expires`` has its time in ``auth.json`` and in its creds file's header; ``users.conf`` is
rendered for a moment ``now`` and leaves out whoever has expired by then (a comment says so).
Something must re-render it when an expiry passes: ``fleetwave broker --auth DIR`` does it itself
(``next_expiry`` tells it when), and ``fleetwave auth prune DIR`` does it for a nats-server run
by systemd (a timer, then a reload). ``renew`` moves an identity's expiry, keeping its key (a
client cut off reconnects by itself once the server has reloaded) or, with ``new_key``, issuing
a new one (the old key stops at once). Expired identities stay in ``auth.json`` until revoked, so
that they can be renewed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import nkeys

from coordinator.auth import perms, pki
from coordinator.errors import FleetwaveError, UsageError
from protocol import creds as creds_file
from protocol.durations import parse_duration
from protocol.errors import ProtocolError
from protocol.subjects import RESERVED_CALLERS, check_name

META = "auth.json"
USERS = "users.conf"
CA, CA_KEY = "ca.pem", "ca-key.pem"
# A server certificate this close to its expiry is said at every broker start and prune.
RENEW_SERVER_WITHIN = dt.timedelta(days=30)
# A new CA takes every host's FLEETWAVE_TLS_CA (and every broker's certificate) replaced:
# said long before the old one ends.
CA_WARN_WITHIN = dt.timedelta(days=90)
SERVER, SERVER_KEY = "server.pem", "server-key.pem"
COORDINATOR = "coordinator"
LOCK = ".lock"
# A user no one holds (its seed was thrown away when this constant was made), allowed nothing.
# users.conf always lists it: with every identity expired or revoked an empty users list would
# turn nats-server's authorization off and let anyone in.
NOBODY = "UBZTXX5WHESF32AKQHIXHQOHREBEW5QW2OF5HNVVVDS2HHTYDS334G7Z"
ACCOUNTS = "accounts"  # auth.json's "layout" once the users live in the fleet's three accounts
GLOBAL_ACCOUNT = "$G"  # the server's account when its config names none
MAX_LIFETIME = dt.timedelta(days=3660)
_DAYS = re.compile(r"^(\d+)d(.*)$")


@dataclass(frozen=True)
class Identity:
    role: str
    name: str
    nkey: str  # public key, U...
    expires: dt.datetime | None = None  # aware UTC; None: until revoked

    def live(self, now: dt.datetime) -> bool:
        return self.expires is None or now < self.expires


def parse_lifetime(text: str) -> dt.timedelta:
    """``--expires``: a duration as ``parse_duration`` takes it, or days first (``90d``,
    ``365d``, ``1d12h``); UsageError (one line) otherwise."""
    m = _DAYS.match(text.strip())
    days, rest = (int(m[1]), m[2]) if m else (0, text)
    try:
        seconds = parse_duration(rest, what="--expires") if rest else 0.0
    except ProtocolError as exc:
        raise UsageError(f"{exc} (or days: '90d', '365d')") from None
    if days > MAX_LIFETIME.days:  # (a timedelta of 99999999999 days is an OverflowError)
        raise UsageError(f"--expires {text!r} must be more than 0 and at most 3660d")
    life = dt.timedelta(days=days, seconds=seconds)
    if not dt.timedelta(0) < life <= MAX_LIFETIME:
        raise UsageError(f"--expires {text!r} must be more than 0 and at most 3660d")
    return life


def next_expiry(users: list[Identity], now: dt.datetime) -> dt.datetime | None:
    """The first expiry still to come after ``now`` (when ``users.conf`` must change next)."""
    coming = [u.expires for u in users if u.expires is not None and u.expires > now]
    return min(coming, default=None)


def _write(path: Path, data: str | bytes, mode: int = 0o600) -> None:
    """Write ``path`` atomically with ``mode`` from the start (never readable by others)."""
    raw = data.encode() if isinstance(data, str) else data
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as exc:
        raise _unwritable(path, exc) from None
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(raw)
            out.flush()
            os.fsync(out.fileno())
        Path(tmp).replace(path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _unwritable(path, exc) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _unwritable(path: Path, exc: OSError) -> FleetwaveError:
    return FleetwaveError(f"cannot write {path}: {exc.strerror or exc}; the trust root must be a "
                          "directory its owner can write (run as that user, or fix its modes)")


def _new_seed() -> tuple[str, str]:
    """A new user nkey: (seed, public key)."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    kp = nkeys.from_seed(bytearray(seed))
    return seed.decode(), kp.public_key.decode()


def _public_key(seed: str) -> str | None:
    """The public key of a user nkey ``seed``, or None if it is none."""
    try:
        return str(nkeys.from_seed(bytearray(seed.encode())).public_key.decode())
    except (nkeys.NkeysError, ValueError, TypeError, IndexError):
        return None


class AuthDir:
    """One fleet's auth directory (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    # -- reading ----------------------------------------------------------------------------------

    def accounts(self) -> bool:
        """Whether this directory's users live in the fleet's three accounts (see Layout)."""
        try:
            return bool(json.loads((self.path / META).read_text()).get("layout") == ACCOUNTS)
        except (OSError, ValueError, AttributeError):
            self.load()  # its one-line error
            raise

    def load(self) -> tuple[str, list[str], list[Identity]]:
        """(fleet, server names, identities); UsageError (one line) if DIR is not one."""
        meta = self.path / META
        if not self.path.is_dir():
            raise UsageError(
                f"auth directory {self.path} does not exist; create it with 'fleetwave auth init "
                f"{self.path}'"
            )
        try:
            data = json.loads(meta.read_text())
            users = [Identity(u["role"], u["name"], u["nkey"], _expiry(u.get("expires")))
                     for u in data["users"]]
            return str(data["fleet"]), list(data["server_names"]), users
        except FileNotFoundError:
            raise UsageError(
                f"{self.path} is not a fleetwave auth directory (no {META}); pass the directory "
                "'fleetwave auth init' made"
            ) from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise UsageError(f"{meta} is unreadable or damaged; restore it from a backup") from None

    def creds_path(self, role: str, name: str) -> Path:
        if role == "node":
            return self.path / "nodes" / f"{name}.creds"
        if role == "operator":
            return self.path / "operators" / f"{name}.creds"
        return self.path / f"{COORDINATOR}.creds"

    # -- changing ---------------------------------------------------------------------------------

    def init(self, fleet: str, names: tuple[str, ...], operator: str,
             now: dt.datetime | None = None) -> None:
        """Make the whole trust root; refuses an existing DIR (nothing is overwritten)."""
        if os.path.lexists(self.path):  # (a dangling symlink too: mkdir would fail on it)
            raise UsageError(
                f"{self.path} already exists; fleetwave auth init never overwrites a trust root: "
                "pick a new directory, or use 'fleetwave auth add-node' on this one"
            )
        check_name("fleet", fleet)
        _check_operator(operator)
        when = now or _now()
        try:
            all_names = pki.server_names(names)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        ca = pki.make_ca(fleet, when)
        server = pki.make_server(ca, all_names, when)
        self.path.mkdir(parents=True, mode=0o700)
        self.path.chmod(0o700)
        for sub in ("nodes", "operators"):
            (self.path / sub).mkdir(mode=0o700)
        _write(self.path / CA_KEY, ca.key)
        _write(self.path / CA, ca.cert, 0o644)
        _write(self.path / SERVER_KEY, server.key)
        _write(self.path / SERVER, server.cert, 0o644)
        users: list[Identity] = []
        users.append(self._issue(fleet, "coordinator", COORDINATOR))
        users.append(self._issue(fleet, "operator", operator))
        self._save(fleet, all_names, users, when, accounts=True)

    def add(self, role: str, name: str, expires: dt.timedelta | None = None,
            now: dt.datetime | None = None) -> Path:
        """Issue credentials for a new node or operator (valid for ``expires``, default until
        revoked); returns its creds file."""
        when = now or _now()
        with self._locked():
            fleet, names, users = self.load()
            try:
                check_name(role, name)
            except ProtocolError as exc:
                raise UsageError(str(exc)) from None
            if role == "operator":
                _check_operator(name)
            if any(u.name == name and u.role == role for u in users):
                raise UsageError(
                    f"{role} {name!r} is already enrolled in {self.path}; renew it with "
                    f"'fleetwave auth renew {self.path} {name}', or revoke it first with "
                    f"'fleetwave auth revoke {self.path} {name}' to issue new credentials"
                )
            other = next((u for u in users if u.name == name), None)
            if other is not None:  # revoke and renew take a name only: it must be one identity
                raise UsageError(f"{name!r} is already the {other.role} {name!r} in {self.path}; "
                                 f"pick another name for the {role}")
            users.append(self._issue(fleet, role, name, when + expires if expires else None))
            self._save(fleet, names, users, when, accounts=self.accounts())
        return self.creds_path(role, name)

    def revoke(self, name: str, now: dt.datetime | None = None) -> Identity:
        """Remove a node's or an operator's identity: its user leaves the server config and its
        creds file is deleted. The coordinator's identity cannot be revoked this way."""
        with self._locked():
            fleet, names, users = self.load()
            gone = self._find(users, name, renewing=False)
            self._save(fleet, names, [u for u in users if u is not gone], now or _now(),
                       accounts=self.accounts())
            self.creds_path(gone.role, gone.name).unlink(missing_ok=True)
        return gone

    def renew(self, name: str, expires: dt.timedelta | None, *, new_key: bool = False,
              now: dt.datetime | None = None) -> Identity:
        """Give ``name`` a new expiry (``expires`` from ``now``; None: until revoked) and
        rewrite its creds file. The key stays unless ``new_key`` (then the old key stops
        working at the next reload); keeping it needs the creds file still in DIR (its seed)."""
        when = now or _now()
        with self._locked():
            fleet, names, users = self.load()
            old = self._find(users, name, renewing=True)
            until = when + expires if expires else None
            if new_key:
                fresh = self._issue(fleet, old.role, old.name, until)
            else:
                fresh = replace(old, expires=until)
                self._rewrite_creds(fleet, fresh)
            self._save(fleet, names, [fresh if u is old else u for u in users], when,
                       accounts=self.accounts())
        return fresh

    def renew_server(self, names: tuple[str, ...] = (), now: dt.datetime | None = None,
                     ) -> tuple[list[str], dt.datetime]:
        """Issue the brokers a new server certificate from the fleet's CA, with a new key: the
        names the old one held plus ``names``, valid ``pki.SERVER_DAYS`` from ``now``. Returns
        the names and the new expiry. Clients trust the CA, not this certificate: they accept
        it at their next connect and keep the connections they hold. The key and certificate
        are written before ``users.conf`` (rewritten whole, as every change here), whose change
        is what a broker with ``--auth`` and the systemd path unit reload on: a reload never
        sees a new key beside the old certificate. Bad names change nothing."""
        when = now or _now()
        with self._locked():
            fleet, held, users = self.load()
            try:
                all_names = pki.server_names((*held, *names))
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            try:
                ca = pki.Pem((self.path / CA).read_bytes(), (self.path / CA_KEY).read_bytes())
                server = pki.make_server(ca, all_names, when)
                until = pki.expires(server.cert)
            except OSError as exc:
                raise UsageError(f"cannot read the fleet's CA in {self.path}: {exc.strerror}; "
                                 "restore ca.pem and ca-key.pem from a backup") from None
            except (ValueError, TypeError, AssertionError):
                raise UsageError(f"the fleet's CA in {self.path} (ca.pem, ca-key.pem) is "
                                 "damaged; restore it from a backup") from None
            self._replace_pair(server)
            self._save(fleet, all_names, users, when, accounts=self.accounts())
        return all_names, until

    def _replace_pair(self, server: pki.Pem) -> None:
        """The server's key and certificate replaced together: both written aside first, then
        renamed in turn (the old key put back if the certificate's rename fails), so that no
        reload, ours or anyone's, finds a key beside a certificate that is not its own but for
        the moment between two renames."""
        key, cert = self.path / SERVER_KEY, self.path / SERVER
        staged_key, staged_cert = (self.path / f".{SERVER_KEY}.new", self.path / f".{SERVER}.new")
        try:
            old_key = key.read_bytes()
            _write(staged_key, server.key)
            _write(staged_cert, server.cert, 0o644)
            staged_key.replace(key)
            try:
                staged_cert.replace(cert)
            except OSError:
                _write(key, old_key)
                raise
        except OSError as exc:
            raise _unwritable(cert, exc) from None
        finally:
            for staged in (staged_key, staged_cert):
                with contextlib.suppress(OSError):
                    staged.unlink()

    def server_expiry(self) -> dt.datetime | None:
        """When the brokers' server certificate expires (None: unreadable)."""
        try:
            return pki.expires((self.path / SERVER).read_bytes())
        except (OSError, ValueError):
            return None

    def prune(self, now: dt.datetime | None = None) -> tuple[list[Identity], bool]:
        """Render ``users.conf`` for ``now``: (the identities left out as expired, whether the
        file changed). ``fleetwave auth prune`` and a broker with ``--auth`` call it: at its
        start (which also gives an older release's users this release's permissions: operators'
        API subjects came to name them) and at each expiry."""
        when = now or _now()
        with self._locked():
            fleet, _, users = self.load()
            text = render_users(fleet, users, when, accounts=self.accounts())
            path = self.path / USERS
            try:
                changed = path.read_text() != text
            except OSError:
                changed = True
            if changed:
                _write(path, text, 0o644)
        return [u for u in users if not u.live(when)], changed

    def migrate(self, store_dir: Path, *, revert: bool = False,
                now: dt.datetime | None = None) -> bool:
        """Put this directory's users in the fleet's three accounts and move the streams of
        the broker that serves it (``store_dir``, its JetStream store_dir; that nats-server
        stopped) to the fleet's account; with ``revert``, both back. Whether it changed
        anything (False: already so). The store is checked before anything is written
        (``check_store``: UsageError, nothing changed); the streams move first, then the
        layout: a run cut between the two is finished by running it again."""
        when = now or _now()
        check_store_dir(store_dir)  # first: "already so" must not be said of no store at all
        with self._locked():
            if self.accounts() != revert:
                return False
            check_store(store_dir, revert=revert)
            move_store(store_dir, revert=revert)
            fleet, names, users = self.load()
            self._save(fleet, names, users, when, accounts=not revert)
        return True

    def _find(self, users: list[Identity], name: str, *, renewing: bool) -> Identity:
        found = [u for u in users if u.name == name and (u.role != "coordinator" or renewing)]
        if not found:
            raise UsageError(
                f"no node or operator named {name!r} in {self.path}; see auth.json for who is "
                "enrolled"
            )
        if len(found) > 1:
            raise UsageError(f"{name!r} is both a node and an operator in {self.path}; "
                             "rename one of them (revoke and add again)")
        return found[0]

    def _rewrite_creds(self, fleet: str, who: Identity) -> None:
        """The creds file of ``who`` again, with its seed and its new expiry."""
        path = self.creds_path(who.role, who.name)
        try:
            old = creds_file.parse(path.read_text(), str(path))
            if _public_key(old.seed) != who.nkey:  # another key: keeping it would lock out
                raise ProtocolError(f"{path} holds another key than {who.role} {who.name}'s")
        except (OSError, ProtocolError):
            raise UsageError(
                f"{path} is missing or damaged, so its key cannot be kept; renew with --new-key "
                "(a new key: copy the new file to the host)"
            ) from None
        _write(path, creds_file.render(creds_file.Creds(
            fleet=fleet, role=who.role, name=who.name, seed=old.seed, expires=who.expires)))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One change at a time (commands and a broker's re-rendering), across processes."""
        if not self.path.is_dir():
            self.load()  # the one-line error for a missing DIR
        try:
            lock = (self.path / LOCK).open("a")
        except OSError as exc:
            raise _unwritable(self.path / LOCK, exc) from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _issue(self, fleet: str, role: str, name: str,
               expires: dt.datetime | None = None) -> Identity:
        seed, public = _new_seed()
        _write(self.creds_path(role, name), creds_file.render(
            creds_file.Creds(fleet=fleet, role=role, name=name, seed=seed, expires=expires)))
        return Identity(role, name, public, expires)

    def _save(self, fleet: str, names: list[str], users: list[Identity],
              now: dt.datetime, *, accounts: bool) -> None:
        _write(self.path / USERS, render_users(fleet, users, now, accounts=accounts), 0o644)
        _write(self.path / META, json.dumps({
            "fleet": fleet, "server_names": names,
            **({"layout": ACCOUNTS} if accounts else {}),
            "users": [_identity_json(u) for u in users],
        }, indent=2) + "\n")


def server_expiry_warning(auth: AuthDir, now: dt.datetime | None = None) -> str | None:
    """A line for a server certificate within ``RENEW_SERVER_WITHIN`` of its expiry (or past
    it): once it expires every client refuses the brokers. None while it has longer."""
    until = auth.server_expiry()
    when = now or _now()
    if until is None or until - when > RENEW_SERVER_WITHIN:
        return None
    state = "expired at" if until <= when else "expires at"
    return (f"the brokers' server certificate in {auth.path} {state} "
            f"{creds_file.format_time(until)}: every client refuses the brokers then; renew it "
            f"with 'fleetwave auth renew-server {auth.path}'")


def ca_expiry_warning(auth: AuthDir, now: dt.datetime | None = None) -> str | None:
    """A line for a CA within ``CA_WARN_WITHIN`` of its expiry (or past it): from then no client
    trusts the brokers, and a server certificate renewed meanwhile ends with it. None while it
    has longer, or when it cannot be read (the commands that need it say so)."""
    try:
        until = pki.expires((auth.path / CA).read_bytes())
    except (OSError, ValueError):
        return None
    when = now or _now()
    if until - when > CA_WARN_WITHIN:
        return None
    state = "expired at" if until <= when else "expires at"
    return (f"the fleet's CA in {auth.path} {state} {creds_file.format_time(until)}: no client "
            "trusts the brokers from then, and no renewed server certificate outlives it; make "
            "a new auth directory ('fleetwave auth init') and move every host to it before then")


def expiry_warnings(auth: AuthDir, now: dt.datetime | None = None) -> list[str]:
    """What of the fleet's TLS expires soon (the CA, the brokers' server certificate)."""
    return [w for w in (ca_expiry_warning(auth, now), server_expiry_warning(auth, now))
            if w is not None]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _expiry(text: object) -> dt.datetime | None:
    if text is None:
        return None
    return creds_file.parse_time(str(text), META)


def _identity_json(u: Identity) -> dict[str, str]:
    out = {"role": u.role, "name": u.name, "nkey": u.nkey}
    if u.expires is not None:
        out["expires"] = creds_file.format_time(u.expires)
    return out


def _check_operator(name: str) -> None:
    """Refuse the operator names the coordinator records itself as ``who`` (its own decisions,
    an older CLI's requests), so that on a secure fleet those words mean only that."""
    check_name("operator", name)
    if name in RESERVED_CALLERS:
        raise UsageError(f"operator name {name!r} is reserved: the audit log uses it for the "
                         "coordinator's own decisions; pick another name")


def check_store_dir(store_dir: Path) -> None:
    """UsageError (one line) unless ``store_dir`` is a directory."""
    if not store_dir.is_dir():
        raise UsageError(f"{store_dir} is no directory: pass the JetStream store_dir of the "
                         "nats-server that serves this fleet (fleetwave broker's --store-dir)")


def check_store(store_dir: Path, *, revert: bool = False) -> None:
    """UsageError (one line) unless the fleet's streams in ``store_dir`` may move between the
    global account and the fleet's (``move_store``): a running nats-server holding files in
    it (it must be stopped: renaming its store under it, or a reload into the new layout with
    the streams still in the old account, splits the fleet's state), a store holding both
    accounts (a human must choose), a cluster member's store (the cluster's meta group records
    each stream's account: the streams would not follow the files)."""
    js, src, dst = _account_dirs(store_dir, revert)
    check_store_dir(store_dir)
    held = holder(store_dir)
    if held is not None:
        raise UsageError(f"a running process (pid {held}) serves the store in {store_dir}: stop "
                         "it first, then run this again and start it")
    if src.is_dir():
        _refuse_both(js, dst)
    if (js / "$SYS" / "_js_").exists():
        raise UsageError(
            f"{store_dir} is a cluster member's store: its streams cannot move between accounts "
            "in place yet; keep this cluster's auth directory as it is")


def _account_dirs(store_dir: Path, revert: bool) -> tuple[Path, Path, Path]:
    """The store's JetStream directory, and the account directories the streams move from
    and to (the global account to the fleet's; ``revert``: back)."""
    js = store_dir / "jetstream"
    old, new = js / GLOBAL_ACCOUNT, js / perms.FLEET
    return (js, new, old) if revert else (js, old, new)


def _refuse_both(js: Path, dst: Path) -> None:
    if dst.exists():
        raise UsageError(
            f"{js} holds both {GLOBAL_ACCOUNT} and {perms.FLEET}: the fleet's streams were kept in "
            "both accounts; move one aside and try again")


def holder(store_dir: Path) -> int | None:
    """The pid of a running process that serves ``store_dir`` (``store_server``), or None."""
    from coordinator.runtime.deliveries import store_server  # (the bus: CLI paths need it)

    server = store_server(store_dir)
    return server[0] if server is not None else None


def move_store(store_dir: Path, *, revert: bool = False) -> bool:
    """Move the streams a broker kept in the global account (``<store_dir>/jetstream/$G``) to
    the fleet's (``.../FLEET``; ``revert``: back), whether it moved anything; the caller has
    checked the store (``check_store``). The stream files name no account (checked:
    ``tests/integration/test_auth_accounts.py``), so this is a rename, atomic on one file
    system; it refuses, changing nothing, a store that holds both."""
    js, src, dst = _account_dirs(store_dir, revert)
    if not src.is_dir():
        return False
    _refuse_both(js, dst)
    try:
        src.rename(dst)
    except OSError as exc:
        raise FleetwaveError(f"cannot move {src} to {dst}: {exc.strerror or exc}; run this as "
                             "the user the broker runs as") from None
    return True


def render_users(fleet: str, users: list[Identity], now: dt.datetime, *,
                 accounts: bool = True) -> str:
    """What nats-server includes: one nkey user per identity still valid at ``now`` (an
    expired one is a comment: the server must not know its key), in the fleet's three
    ``accounts`` (``perms.accounts``: each with its exports and imports, FLEET with
    JetStream), or in one ``authorization`` block (a directory not migrated: see Layout)."""
    head = ["# generated by fleetwave auth: do not edit (rewritten by add-node, add-operator, "
            "revoke,", "# renew, migrate, and when an expiry passes)"]
    nothing = json.dumps({"publish": {"deny": [">"]}, "subscribe": {"deny": [">"]}})
    nobody = ["# no one: keeps authorization on when no identity is left",
              f'{{ nkey: "{NOBODY}", permissions: {nothing} }}']

    def user_lines(role: str | None) -> list[str]:
        out: list[str] = []
        for u in users:
            if role is not None and u.role != role:
                continue
            until = creds_file.format_time(u.expires) if u.expires else ""
            if not u.live(now):
                out.append(f"# {u.role} {u.name}: expired at {until}")
                continue
            until = f" until {until}" if until else ""
            p = json.dumps(perms.for_identity(fleet, u.role, u.name, accounts=accounts))
            out.append(f"# {u.role} {u.name}{until}")
            out.append(f'{{ nkey: "{u.nkey}", permissions: {p} }}')
        return out

    def indented(lines: list[str], by: int) -> list[str]:
        return [" " * by + line for line in lines]

    if not accounts:
        return "\n".join([*head, "authorization {", "  users: [",
                          *indented([*user_lines(None), *nobody], 4), "  ]", "}", ""])
    lines = [*head, "accounts {"]
    accounts_rules = perms.accounts(fleet)
    for role, account in perms.ACCOUNT_OF.items():
        rules = accounts_rules[account]
        lines += [f"  {account} {{"]
        if account == perms.FLEET:
            lines += ["    jetstream: enabled"]
        lines += ["    users: [", *indented(user_lines(role), 6),
                  *(indented(nobody, 6) if account == perms.OPS else []), "    ]"]
        for kind in ("exports", "imports"):
            if rules[kind]:
                lines += [f"    {kind}: [", *indented([json.dumps(r) for r in rules[kind]], 6),
                          "    ]"]
        lines += ["  }"]
    return "\n".join([*lines, "}", ""])


def broker_block(path: Path, conf_dir: Path) -> str:
    """The lines ``fleetwave broker --auth DIR`` adds to its config in ``conf_dir``: TLS
    required, and the users (an include, so that a reload reads the current file; nats-server
    takes an include's path relative to the including file)."""
    d = path.absolute()
    users = os.path.relpath(d / USERS, conf_dir.absolute())
    return (
        "tls {\n"
        f'  cert_file: "{d / SERVER}"\n'
        f'  key_file: "{d / SERVER_KEY}"\n'
        "  timeout: 2\n"
        "}\n"
        f'include "{users}"\n'
    )

