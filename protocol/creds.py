"""A fleetwave credentials file: who a client is on the bus, and the key that proves it.

``fleetwave auth`` writes one per identity (``DIR/nodes/<node>.creds``, ``DIR/operators/<name>
.creds``, ``DIR/coordinator.creds``): a few ``# key: value`` header lines saying whose it is, then
the user's nkey seed in the armour NATS's own ``.creds`` files use for theirs::

    # fleetwave credentials: keep this file secret (mode 0600)
    # fleet: default
    # role: node
    # name: node-1
    # expires: 2027-12-02T08:00:00Z
    -----BEGIN USER NKEY SEED-----
    SUA...
    ------END USER NKEY SEED------

The server knows only the seed's public key (an nkey user in its config, with the permissions of
that role and name); the header lets a client refuse a file that cannot be its own (node-1's
file given to node-2's agent) with a clear line, before the server refuses it silently.
``load`` reads and checks one; it never logs or returns the seed in a message.

``# expires`` (RFC 3339, UTC; absent: until revoked) is when the broker stops accepting the key
(``fleetwave auth`` leaves expired users out of ``users.conf``); a client refuses to start with
an expired file (``load``), saying how to renew it, rather than being refused by the server with
nothing but "authorization violation".
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import ProtocolError
from protocol.subjects import check_name

ROLES = ("coordinator", "operator", "node")
BEGIN = "-----BEGIN USER NKEY SEED-----"
END = "------END USER NKEY SEED------"
_HEADER = re.compile(r"^#\s*(fleet|role|name|expires):\s*(\S+)\s*$")
_SEED = re.compile(r"^SU[A-Z2-7]{56}\Z")


class CredsExpired(ProtocolError):
    """A credentials file whose ``# expires`` time has passed (exit 2 where it is a flag)."""


@dataclass(frozen=True)
class Creds:
    """One identity: its fleet, role (coordinator, operator, node), name and nkey seed."""

    fleet: str
    role: str
    name: str
    seed: str
    expires: dt.datetime | None = None  # aware, UTC; None: valid until revoked

    @property
    def inbox_prefix(self) -> str:
        """Where this client's replies and deliveries arrive, the only inboxes its permissions
        let it read: a node's ``_FWN.<node>``, an operator's ``_FWO.<name>`` (two tokens, so
        that one stream export of ``_FWN.>`` carries every node's from the fleet's account:
        ``coordinator.auth.perms``), the usual ``_INBOX`` for the coordinator. (Before session
        23: ``_INBOX_<node>`` and ``_OPS_<name>``, which an unmigrated broker still allows.)"""
        if self.role == "node":
            return f"_FWN.{self.name}"
        return f"_FWO.{self.name}" if self.role == "operator" else "_INBOX"


def format_time(when: dt.datetime) -> str:
    """``when`` as RFC 3339 UTC to the second (``2027-12-02T08:00:00Z``)."""
    return when.astimezone(dt.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str, where: str) -> dt.datetime:
    """An RFC 3339 time (``Z`` or an offset) as an aware UTC datetime; ProtocolError if not."""
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ProtocolError(f"{where}: {text!r} is not an RFC 3339 time such as "
                            "2027-12-02T08:00:00Z") from None
    if when.tzinfo is None:
        raise ProtocolError(f"{where}: {text!r} has no time zone; write it in UTC with a Z")
    return when.astimezone(dt.UTC)


def render(creds: Creds) -> str:
    expires = f"# expires: {format_time(creds.expires)}\n" if creds.expires else ""
    return (
        "# fleetwave credentials: keep this file secret (mode 0600)\n"
        f"# fleet: {creds.fleet}\n# role: {creds.role}\n# name: {creds.name}\n{expires}"
        f"{BEGIN}\n{creds.seed}\n{END}\n"
    )


WARN_BEFORE = dt.timedelta(days=14)


def expiring(creds: Creds, now: dt.datetime, within: dt.timedelta = WARN_BEFORE) -> str | None:
    """A warning (one line) when ``creds`` expire within ``within`` of ``now``, else None."""
    if creds.expires is None or not now < creds.expires <= now + within:
        return None
    hours = (creds.expires - now).total_seconds() / 3600
    when = f"{hours / 24:.0f} days" if hours >= 48 else f"{hours:.0f} hours"
    return (f"credentials of {creds.role} {creds.name} expire at {format_time(creds.expires)} "
            f"(in {when}); renew them before then with 'fleetwave auth renew DIR {creds.name}'")


def expired(creds: Creds, now: dt.datetime) -> str | None:
    """Why ``creds`` can no longer be used at ``now`` (one line, with how to renew), or None."""
    if creds.expires is None or now < creds.expires:
        return None
    return (f"credentials of {creds.role} {creds.name} expired at {format_time(creds.expires)}; "
            f"renew them with 'fleetwave auth renew DIR {creds.name}' where the fleet's auth "
            "directory is, and use the new file")


def parse(text: str, where: str) -> Creds:
    """The Creds in ``text`` (a file's content; ``where`` names it in errors)."""
    fields: dict[str, str] = {}
    seed = ""
    for line in text.splitlines():
        line = line.strip()
        m = _HEADER.match(line)
        if m:
            if seed or m[1] in fields:  # a line appended later must not override the header
                raise ProtocolError(f"{where}: a second '# {m[1]}:' line, or one after the "
                                    "seed; use the file 'fleetwave auth' made, unedited")
            fields[m[1]] = m[2]
        elif _SEED.match(line):
            seed = line
    missing = [k for k in ("fleet", "role", "name") if k not in fields] + ([] if seed else ["seed"])
    if missing or fields["role"] not in ROLES:
        raise ProtocolError(
            f"{where} is not a fleetwave credentials file (no {', '.join(missing) or 'known role'}"
            "); use a file made by 'fleetwave auth init' or 'fleetwave auth add-node'"
        )
    for key in ("fleet", "name"):  # the name becomes a node id: subjects, a data dir
        try:
            check_name(key, fields[key])
        except ProtocolError as exc:
            raise ProtocolError(f"{where}: {exc}") from None
    expires = parse_time(fields["expires"], f"{where}: expires") if "expires" in fields else None
    return Creds(fleet=fields["fleet"], role=fields["role"], name=fields["name"], seed=seed,
                 expires=expires)


def load(path: Path | str, *, now: dt.datetime | None = None) -> Creds:
    """Read and check the credentials file at ``path`` (expired at ``now``, default the current
    time, is refused too); ProtocolError (one line) if unusable."""
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
    found = parse(text, str(path))
    problem = expired(found, now or dt.datetime.now(dt.UTC))
    if problem is not None:
        raise CredsExpired(f"{problem} (file {path})")
    return found


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
