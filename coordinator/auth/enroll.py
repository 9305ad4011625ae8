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
servers managed apart; a fleet is one account. The server never holds a private key either way.

Every change writes ``users.conf`` from ``auth.json`` whole, atomically (temp file, rename), and
``auth.json`` last, so an interrupted command leaves the previous state or the new one.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nkeys

from coordinator.auth import perms, pki
from coordinator.errors import UsageError
from protocol import creds as creds_file
from protocol.errors import ProtocolError
from protocol.subjects import RESERVED_CALLERS, check_name

META = "auth.json"
USERS = "users.conf"
CA, CA_KEY = "ca.pem", "ca-key.pem"
SERVER, SERVER_KEY = "server.pem", "server-key.pem"
COORDINATOR = "coordinator"


@dataclass(frozen=True)
class Identity:
    role: str
    name: str
    nkey: str  # public key, U...


def _write(path: Path, data: str | bytes, mode: int = 0o600) -> None:
    """Write ``path`` atomically with ``mode`` from the start (never readable by others)."""
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(raw)
            out.flush()
            os.fsync(out.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _new_seed() -> tuple[str, str]:
    """A new user nkey: (seed, public key)."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    kp = nkeys.from_seed(bytearray(seed))
    return seed.decode(), kp.public_key.decode()


class AuthDir:
    """One fleet's auth directory (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    # -- reading ----------------------------------------------------------------------------------

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
            users = [Identity(u["role"], u["name"], u["nkey"]) for u in data["users"]]
            return str(data["fleet"]), list(data["server_names"]), users
        except FileNotFoundError:
            raise UsageError(
                f"{self.path} is not a fleetwave auth directory (no {META}); pass the directory "
                "'fleetwave auth init' made"
            ) from None
        except (OSError, ValueError, KeyError, TypeError):
            raise UsageError(f"{meta} is unreadable or damaged; restore it from a backup") from None

    def refresh(self) -> bool:
        """Rewrite ``users.conf`` from ``auth.json`` if it differs from what this release renders
        (permissions change between releases: operators' API subjects came to name them); whether
        it was rewritten. UsageError as ``load``."""
        fleet, _, users = self.load()
        want = render_users(fleet, users)
        path = self.path / USERS
        try:
            if path.read_text() == want:
                return False
        except OSError:
            pass  # missing or unreadable: written anew
        _write(path, want, 0o644)
        return True

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
        if self.path.exists():
            raise UsageError(
                f"{self.path} already exists; fleetwave auth init never overwrites a trust root: "
                "pick a new directory, or use 'fleetwave auth add-node' on this one"
            )
        check_name("fleet", fleet)
        _check_operator(operator)
        when = now or dt.datetime.now(dt.UTC)
        all_names = pki.server_names(names)
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
        self._save(fleet, all_names, users)

    def add(self, role: str, name: str) -> Path:
        """Issue credentials for a new node or operator; returns its creds file."""
        fleet, names, users = self.load()
        try:
            check_name(role, name)
        except ProtocolError as exc:
            raise UsageError(str(exc)) from None
        if role == "operator":
            _check_operator(name)
        if any(u.name == name and u.role == role for u in users):
            raise UsageError(
                f"{role} {name!r} is already enrolled in {self.path}; revoke it first with "
                f"'fleetwave auth revoke {self.path} {name}' to issue new credentials"
            )
        users.append(self._issue(fleet, role, name))
        self._save(fleet, names, users)
        return self.creds_path(role, name)

    def revoke(self, name: str) -> Identity:
        """Remove a node's or an operator's identity: its user leaves the server config and its
        creds file is deleted. The coordinator's identity cannot be revoked this way."""
        fleet, names, users = self.load()
        found = [u for u in users if u.name == name and u.role != "coordinator"]
        if not found:
            raise UsageError(
                f"no node or operator named {name!r} in {self.path}; see auth.json for who is "
                "enrolled"
            )
        if len(found) > 1:
            raise UsageError(f"{name!r} is both a node and an operator in {self.path}; "
                             "rename one of them (revoke and add again)")
        gone = found[0]
        self._save(fleet, names, [u for u in users if u is not gone])
        self.creds_path(gone.role, gone.name).unlink(missing_ok=True)
        return gone

    def _issue(self, fleet: str, role: str, name: str) -> Identity:
        seed, public = _new_seed()
        _write(self.creds_path(role, name),
               creds_file.render(creds_file.Creds(fleet=fleet, role=role, name=name, seed=seed)))
        return Identity(role, name, public)

    def _save(self, fleet: str, names: list[str], users: list[Identity]) -> None:
        _write(self.path / USERS, render_users(fleet, users), 0o644)
        _write(self.path / META, json.dumps({
            "fleet": fleet, "server_names": names,
            "users": [{"role": u.role, "name": u.name, "nkey": u.nkey} for u in users],
        }, indent=2) + "\n")


def _check_operator(name: str) -> None:
    """Refuse the operator names the coordinator records itself as ``who`` (its own decisions,
    an older CLI's requests), so that on a secure fleet those words mean only that."""
    check_name("operator", name)
    if name in RESERVED_CALLERS:
        raise UsageError(f"operator name {name!r} is reserved: the audit log uses it for the "
                         "coordinator's own decisions; pick another name")


def render_users(fleet: str, users: list[Identity]) -> str:
    """The ``authorization`` block nats-server includes: one nkey user per identity."""
    lines = [
        "# generated by fleetwave auth: do not edit (rewritten by add-node, add-operator, revoke)",
        "authorization {",
        "  users: [",
    ]
    for u in users:
        p = json.dumps(perms.for_identity(fleet, u.role, u.name))
        lines.append(f"    # {u.role} {u.name}")
        lines.append(f'    {{ nkey: "{u.nkey}", permissions: {p} }}')
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


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
