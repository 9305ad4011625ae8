"""A fleetwave credentials file: who a client is on the bus, and the key that proves it.

``fleetwave auth`` writes one per identity (``DIR/nodes/<node>.creds``, ``DIR/operators/<name>
.creds``, ``DIR/coordinator.creds``): a few ``# key: value`` header lines saying whose it is, then
the user's nkey seed in the armour NATS's own ``.creds`` files use for theirs::

    # fleetwave credentials: keep this file secret (mode 0600)
    # fleet: default
    # role: node
    # name: node-1
    -----BEGIN USER NKEY SEED-----
    SUA...
    ------END USER NKEY SEED------

The server knows only the seed's public key (an nkey user in its config, with the permissions of
that role and name); the header lets a client refuse a file that cannot be its own (node-1's
file given to node-2's agent) with a clear line, before the server refuses it silently.
``load`` reads and checks one; it never logs or returns the seed in a message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import ProtocolError

ROLES = ("coordinator", "operator", "node")
BEGIN = "-----BEGIN USER NKEY SEED-----"
END = "------END USER NKEY SEED------"
_HEADER = re.compile(r"^#\s*(fleet|role|name):\s*(\S+)\s*$")
_SEED = re.compile(r"^SU[A-Z2-7]{56}$")


@dataclass(frozen=True)
class Creds:
    """One identity: its fleet, role (coordinator, operator, node), name and nkey seed."""

    fleet: str
    role: str
    name: str
    seed: str

    @property
    def inbox_prefix(self) -> str:
        """Where this client's replies arrive, the only inboxes its permissions let it read: a
        node's ``_INBOX_<node>``, an operator's ``_OPS_<name>`` (node ids never start with
        ``_``, so no node's prefix is an operator's), the usual ``_INBOX`` for the coordinator."""
        if self.role == "node":
            return f"_INBOX_{self.name}"
        return f"_OPS_{self.name}" if self.role == "operator" else "_INBOX"


def render(creds: Creds) -> str:
    return (
        "# fleetwave credentials: keep this file secret (mode 0600)\n"
        f"# fleet: {creds.fleet}\n# role: {creds.role}\n# name: {creds.name}\n"
        f"{BEGIN}\n{creds.seed}\n{END}\n"
    )


def parse(text: str, where: str) -> Creds:
    """The Creds in ``text`` (a file's content; ``where`` names it in errors)."""
    fields: dict[str, str] = {}
    seed = ""
    for line in text.splitlines():
        line = line.strip()
        m = _HEADER.match(line)
        if m:
            fields[m[1]] = m[2]
        elif _SEED.match(line):
            seed = line
    missing = [k for k in ("fleet", "role", "name") if k not in fields] + ([] if seed else ["seed"])
    if missing or fields["role"] not in ROLES:
        raise ProtocolError(
            f"{where} is not a fleetwave credentials file (no {', '.join(missing) or 'known role'}"
            "); use a file made by 'fleetwave auth init' or 'fleetwave auth add-node'"
        )
    return Creds(fleet=fields["fleet"], role=fields["role"], name=fields["name"], seed=seed)


def load(path: Path | str) -> Creds:
    """Read and check the credentials file at ``path``; ProtocolError (one line) if unusable."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ProtocolError(
            f"credentials file {path} does not exist; pass the file 'fleetwave auth' made for "
            "this client with --creds (or FLEETWAVE_CREDS)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "unreadable"
        raise ProtocolError(f"cannot read credentials file {path}: {why}") from None
    return parse(text, str(path))


def check_for(
    creds: Creds, where: str, *, fleet: str, role: str | None = None, name: str | None = None,
) -> None:
    """Refuse ``creds`` that are not this client's: another fleet's, role's or node's."""
    if creds.fleet != fleet:
        raise ProtocolError(
            f"credentials {where} are for fleet {creds.fleet!r}, not {fleet!r}; pass --fleet "
            f"{creds.fleet} or that fleet's credentials"
        )
    if role is None:
        return
    if creds.role != role or (name is not None and creds.name != name):
        whose = f"{creds.role} {creds.name!r}"
        want = f"{role} {name!r}" if name is not None else f"a {role}"
        fix = (f"use DIR/nodes/{name}.creds (made by 'fleetwave auth add-node DIR {name}')"
               if role == "node" else "use the credentials made for it by 'fleetwave auth'")
        raise ProtocolError(f"credentials {where} are {whose}'s, not {want}'s; {fix}")
