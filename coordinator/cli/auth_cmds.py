"""``fleetwave auth``: a fleet's trust root and its identities (``coordinator.auth.enroll``).

Each command changes the directory and says in one line what it made and what to do next; a
broker started with ``--auth DIR`` picks every change up by itself (it reloads nats-server's
config when ``users.conf`` changes).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path
from typing import Any

import click

import coordinator.cli.client as client
from coordinator.auth import web_tokens
from coordinator.auth.enroll import (
    CA,
    SERVER,
    USERS,
    AuthDir,
    Identity,
    expiry_warnings,
    parse_lifetime,
)
from coordinator.cli.base import Ctx, cli, output_option
from coordinator.core.rotation import Status, named, short
from coordinator.errors import FleetwaveError, UsageError
from coordinator.runtime import keyfile
from coordinator.runtime.rotation import read_status
from protocol.codec import to_builtins
from protocol.creds import format_time


class _Directory(click.Path):
    """An auth directory argument; an empty one is refused (``Path('')`` is the current
    directory: ``auth init ''`` said ". already exists")."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value.strip():
            self.fail("is empty: name the auth directory (e.g. ./fleet-auth)", param, ctx)
        return super().convert(value, param, ctx)


DirArg = _Directory(file_okay=False, path_type=Path)


def _lifetime(_: click.Context, __: click.Parameter, value: str | None) -> dt.timedelta | None:
    return parse_lifetime(value) if value is not None else None


expires_option = click.option(
    "--expires", "expires", default=None, metavar="DURATION", callback=_lifetime,
    help="Valid for this long from now ('90d', '365d', '12h'); then the brokers refuse it "
    "until 'fleetwave auth renew'. Default: until revoked.")


def _until(who: Identity) -> str:
    return f"valid until {format_time(who.expires)}" if who.expires else "valid until revoked"


@cli.group()
def auth() -> None:
    """A fleet's CA, TLS certificate, server authorization and credentials."""


@auth.command("init")
@click.argument("directory", type=DirArg)
@click.option("--fleet", "fleet_name", default=None,
              help="Fleet the credentials are for [default: the global --fleet].")
@click.option("--server-name", "names", multiple=True, metavar="HOST",
              help="A host name or IP the brokers are reached by (repeatable); localhost and "
              "127.0.0.1 are always included.")
@click.option("--operator", default="admin", show_default=True,
              help="Name of the first operator's credentials.")
@click.pass_context
def init(ctx: click.Context, directory: Path, fleet_name: str | None, names: tuple[str, ...],
         operator: str) -> None:
    """Make a fleet's trust root in DIRECTORY (which must not exist)."""
    fleet = fleet_name or ctx.obj.fleet
    d = AuthDir(directory)
    d.init(fleet, names, operator)
    click.echo(
        f"made the trust root of fleet {fleet!r} in {directory}: CA {directory / CA}, server "
        f"certificate, {d.creds_path('coordinator', 'coordinator')}, "
        f"{d.creds_path('operator', operator)}; serve it with 'fleetwave broker --auth "
        f"{directory}', enroll hosts with 'fleetwave auth add-node {directory} NODE_ID'"
    )


@auth.command("add-node")
@click.argument("directory", type=DirArg)
@click.argument("node_id")
@expires_option
def add_node(directory: Path, node_id: str, expires: dt.timedelta | None) -> None:
    """Issue credentials for node NODE_ID (DIRECTORY/nodes/NODE_ID.creds)."""
    path = AuthDir(directory).add("node", node_id, expires)
    click.echo(
        f"{path}: copy it and {directory / CA} to the host (0600), then run 'fleetwave-agent "
        "--creds FILE --tls-ca ca.pem --nats tls://BROKER:4222' (its node id is the name in "
        "the file)"
    )


@auth.command("add-operator")
@click.argument("directory", type=DirArg)
@click.argument("name")
@expires_option
def add_operator(directory: Path, name: str, expires: dt.timedelta | None) -> None:
    """Issue credentials for operator NAME (DIRECTORY/operators/NAME.creds).

    The server lets these credentials call the coordinator's API only as NAME, which the
    coordinator records as who asked for every change (``fleetwave events``); "coordinator" and
    "unknown" are reserved for the audit log's own use."""
    path = AuthDir(directory).add("operator", name, expires)
    click.echo(f"{path}: give it to {name} with {directory / CA}; they pass both with --creds "
               "and --tls-ca (or FLEETWAVE_CREDS, FLEETWAVE_TLS_CA)")


@auth.command("revoke")
@click.argument("directory", type=DirArg)
@click.argument("name")
def revoke(directory: Path, name: str) -> None:
    """Revoke a node's or an operator's credentials; a running broker with --auth disconnects
    them within a second."""
    gone = AuthDir(directory).revoke(name)
    said = (f"revoked {gone.role} {name!r}: removed from {directory / 'users.conf'} and its "
            "credentials file deleted; brokers with --auth reload it by themselves")
    if gone.role != "operator":
        click.echo(said)
        return
    try:
        dropped = web_tokens.forget(directory, name)
    except UsageError as exc:
        raise FleetwaveError(f"{said}; but its dashboard token could not be removed: {exc}; "
                             "a coordinator whose token file is bound to "
                             f"{directory} refuses it all the same") from None
    click.echo(said + (f"; its dashboard token removed from {dropped}" if dropped else "")
               + f"; a dashboard token of {name!r} is refused from the next request where the "
               f"token file is bound to {directory}, elsewhere remove it with 'fleetwave auth "
               f"revoke-web-token DIR {name}'")


@auth.command("add-web-token")
@click.argument("directory", type=DirArg)
@click.argument("name")
@click.option("--expires", "expires", default=None, metavar="DURATION", callback=_lifetime,
              help="Valid for this long from now ('90d', '12h'); then the dashboard refuses it. "
              "Default: until revoked.")
@click.option("--auth-dir", "auth_dir", default=None, metavar="AUTH_DIR",
              type=click.Path(file_okay=False, path_type=Path),
              help="The fleet's auth directory (made by 'fleetwave auth init'), when DIRECTORY "
              "is not it: NAME must be an operator enrolled there whose credentials have not "
              "expired, and the token file is bound to it, so the coordinator refuses the token "
              "of an operator revoked or expired there (it must be able to read AUTH_DIR). "
              "Not needed when DIRECTORY is the auth directory or the file is bound already.")
@output_option
def add_web_token(directory: Path, name: str, expires: dt.timedelta | None,
                  auth_dir: Path | None, output: str) -> None:
    """Make an operator token NAME for the web dashboard; print it once.

    Only its SHA-256 is kept, in DIRECTORY/web-tokens.json (0600), which the coordinator reads
    with --http-tokens FILE. An action taken with the token (pause, resume, promote, abort,
    rollback) is recorded with who = NAME in the audit log ('fleetwave events').

    When the file is bound to the fleet's auth directory (DIRECTORY is that directory, or
    --auth-dir names it), NAME must be an enrolled operator, and the coordinator refuses the
    token once NAME is revoked ('fleetwave auth revoke') or its credentials expire. A file
    bound to nothing takes any name, and only revoke-web-token ends its tokens."""
    now = dt.datetime.now(dt.UTC).timestamp()
    until = now + expires.total_seconds() if expires is not None else None
    token, path = web_tokens.add(directory, name, until, now, auth_dir)
    when = format_time(dt.datetime.fromtimestamp(until, dt.UTC)) if until else "revoked"
    bound = web_tokens.bound_to(path, web_tokens.read_doc(path))
    if output == "json":
        click.echo(json.dumps({"name": name, "token": token, "file": str(path),
                               "expires": until, "auth_dir": str(bound) if bound else None}))
        return
    click.echo(token)
    checked = (f"bound to the auth directory {bound}: refused once {name!r} is revoked there"
               if bound is not None else "bound to no auth directory (pass --auth-dir to have "
               f"the coordinator refuse it once {name!r} is revoked)")
    click.echo(f"token {name!r} for the dashboard, valid until {when}: shown once, only its "
               f"hash is kept in {path}, {checked}; start the coordinator with '--http "
               f"HOST:PORT --http-tokens {path}' and enter the token in the page (it reads the "
               "file again when it changes)", err=True)


@auth.command("revoke-web-token")
@click.argument("directory", type=DirArg)
@click.argument("name")
def revoke_web_token(directory: Path, name: str) -> None:
    """Remove the dashboard token NAME from DIRECTORY/web-tokens.json; a running coordinator
    refuses it from its next request on."""
    path = web_tokens.revoke(directory, name)
    click.echo(f"revoked dashboard token {name!r}: removed from {path}")


@auth.command("renew")
@click.argument("directory", type=DirArg)
@click.argument("name")
@expires_option
@click.option("--new-key", is_flag=True,
              help="Issue a new key too (the old one stops working at the brokers' next "
              "reload); by default the key stays, so a client cut off at expiry reconnects by "
              "itself.")
def renew(directory: Path, name: str, expires: dt.timedelta | None, new_key: bool) -> None:
    """Give a node's, an operator's or the coordinator's credentials a new expiry (expired
    or not) and rewrite its credentials file."""
    who = AuthDir(directory).renew(name, expires, new_key=new_key)
    path = AuthDir(directory).creds_path(who.role, who.name)
    copy = ("copy it to the host and restart its client: the old key no longer works" if new_key
            else "copy it to the host (its client reconnects by itself; the new file is needed "
            "at its next start)")
    click.echo(f"renewed {who.role} {name!r}, {_until(who)}: {path}; {copy}")


@auth.command("renew-server")
@click.argument("directory", type=DirArg)
@click.option("--server-name", "names", multiple=True, metavar="HOST",
              help="Another host name or IP address the brokers are reached by (repeatable); "
              "the names the certificate held are kept.")
def renew_server(directory: Path, names: tuple[str, ...]) -> None:
    """Issue the brokers a new server certificate (and key) from the fleet's CA, valid 825
    days: before the old one expires (every client would then refuse the brokers), or to add a
    name. Clients trust the CA, not the certificate: they keep their connections and accept the
    new one at their next."""
    held, until = AuthDir(directory).renew_server(names)
    click.echo(f"{directory / SERVER} renewed for {', '.join(held)}, valid until "
               f"{format_time(until)}; a broker run with 'fleetwave broker --auth' reloads it by "
               "itself, a nats-server run by systemd at its reload (fleetwave-auth-reload.path, "
               "or 'systemctl reload nats-server' / each 'fleetwave-broker@N' of a cluster); "
               "copy server.pem and server-key.pem to every broker host that has its own copy "
               "of the directory")


@auth.command("prune")
@click.argument("directory", type=DirArg)
def prune(directory: Path) -> None:
    """Render DIRECTORY/users.conf for now, leaving out expired credentials; then reload the
    nats-server (systemctl reload). 'fleetwave broker --auth' does this by itself."""
    d = AuthDir(directory)
    expired, changed = d.prune()
    _, _, users = d.load()
    gone = ", ".join(f"{u.role} {u.name}" for u in expired) or "none"
    upcoming = [u for u in users if u not in expired and u.expires is not None]
    soon = min(upcoming, key=lambda u: u.expires or dt.datetime.max, default=None)
    nxt = f"; next to expire: {soon.role} {soon.name} at {format_time(soon.expires)}" if (
        soon is not None and soon.expires is not None) else ""
    what = "rewritten: reload the nats-server" if changed else "unchanged"
    click.echo(f"{directory / USERS} {what}; expired: {gone}{nxt}")
    for warning in expiry_warnings(d):
        click.echo(f"fleetwave: {warning}", err=True)


@auth.command("migrate")
@click.argument("directory", type=DirArg)
@click.option("--store", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The JetStream store_dir of the nats-server that serves DIRECTORY (fleetwave "
              "broker's --store-dir), which must be stopped: its streams move with the users.")
@click.option("--revert", is_flag=True,
              help="Back to one account (the streams back to the global account).")
def migrate(directory: Path, store: Path, revert: bool) -> None:
    """Put an auth directory made before accounts in the fleet's three accounts (the fleet's
    streams and coordinators, nodes, operators), so that no node or operator can have the
    server write into the fleet's state, and move the stopped server's streams there.

    \b
    Order: this release's fleetwave on the broker's host first ('fleetwave auth prune DIR' and
    a reload, or a restart of 'fleetwave broker', allow both inbox names), then every agent and
    CLI, then stop the broker, migrate, start it. Nothing is written when the store cannot move
    (a running server, a cluster member's store, both accounts present): one line, exit 2."""
    changed = AuthDir(directory).migrate(store.absolute(), revert=revert)
    layout = "one account" if revert else "the fleet's own accounts"
    click.echo(f"{directory / USERS} and the streams in {store} {'now' if changed else 'already'} "
               f"use {layout}" + ("; start the broker" if changed else ""))


@auth.command("rotate-signing-key")
@click.argument("phase", type=click.Choice(["begin", "check", "switch", "finish"]),
                default="check", metavar="[PHASE]")
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), required=True,
              envvar="FLEETWAVE_KEY_FILE",
              help="The coordinators' signing key file, KEY (env FLEETWAVE_KEY_FILE); the new "
              "key is made as KEY.next, the old one kept as KEY.previous until finish.")
@click.option("--force", is_flag=True,
              help="switch although nodes do not trust the new key (they then take no new "
              "desired state until they do), or finish although desired states are still "
              "signed by the old key (nodes that drop it then take them no more). Dangerous.")
@output_option
@click.pass_obj
def rotate_signing_key(ctx: Ctx, phase: str, key_file: Path, force: bool, output: str) -> None:
    """Rotate the coordinators' signing key with no outage, in steps (PHASE, default check):

    \b
    begin   make KEY.next (0600) and print its public key: add it to every agent's
            FLEETWAVE_TRUST_KEYS, keeping the old one, and restart the agents (their services
            keep running)
    check   where the rotation stands: nodes that do not trust the new key, the key the
            leader signs with, desired states not yet signed by the new key; the next step
    switch  refused while a registered node does not trust the new key; then KEY becomes
            KEY.previous and KEY.next becomes KEY: copy both to every coordinator host and
            restart the coordinators. The first to lead re-signs every desired state (same
            generation and content: no service restarts); old-key coordinators left running
            refuse to lead from then on
    finish  refused until the leader signs with the new key and every desired state is
            signed by it; deletes KEY.previous here (delete it on the other hosts too), after
            which the old key can leave the agents' FLEETWAVE_TRUST_KEYS

    Exit status: 0 done, 1 refused (one line says why), 2 bad key files or flags.
    """
    if phase == "begin":
        _begin(key_file, output)
        return
    st = _status(ctx, key_file)
    if phase == "switch":
        _switch(st, key_file, force, output)
    elif phase == "finish":
        _finish(st, key_file, force, output)
    else:
        _say(output, {"phase": "check", **to_builtins(st), "next": st.next_step()},
             _check_text(st))


def _begin(key_file: Path, output: str) -> None:
    path, key = keyfile.begin(key_file)
    _say(output, {"phase": "begin", "new_key_file": str(path), "new_key": key},
         f"made {path} (0600), public key {key}; add it to every agent's FLEETWAVE_TRUST_KEYS "
         "(keep the old key), restart the agents, then run 'fleetwave auth rotate-signing-key "
         f"check --key-file {key_file}'")


def _switch(st: Status, key_file: Path, force: bool, output: str) -> None:
    if st.stage != "begun":
        raise UsageError(f"nothing to switch to: {keyfile.next_path(key_file)} does not exist; "
                         "run 'begin' first" if st.stage == "none" else
                         "switched already; run 'check', then 'finish'")
    if (why := st.switch_refusal()) is not None and not force:
        raise FleetwaveError(f"not switching: {why}")
    old, new = keyfile.switch(key_file)
    _say(output, {"phase": "switch", "old_key": old, "new_key": new,
                  "forced_past": st.untrusting},
         f"switched {key_file} to {new} (the old key kept as "
         f"{keyfile.previous_path(key_file)}); copy both files to every coordinator host (0600) "
         "and restart the coordinators, then run check")


def _finish(st: Status, key_file: Path, force: bool, output: str) -> None:
    if st.stage != "switched":
        raise UsageError("nothing to finish: 'switch' has not run on this host")
    if (why := st.finish_refusal()) is not None and not force:
        raise FleetwaveError(f"not finishing: {why}")
    old = keyfile.finish(key_file)
    _say(output, {"phase": "finish", "old_key": old, "still_trusting_old": st.still_old},
         f"deleted {keyfile.previous_path(key_file)}; delete it on the other coordinator hosts "
         f"too, and remove {old} from FLEETWAVE_TRUST_KEYS"
         + (f" on {', '.join(st.still_old)}" if st.still_old else "")
         + " (then restart those agents)")


def _status(ctx: Ctx, key_file: Path) -> Status:
    where, old, new = keyfile.stage(key_file)

    async def read() -> Status:
        async with client.connected(ctx) as bus:
            return await read_status(bus, stage=where, old=old, new=new)

    return asyncio.run(read())


def _check_text(st: Status) -> str:
    if st.stage == "none":
        lines = [f"no rotation under way; the signing key is {st.new}"]
    else:
        lines = [f"rotation {st.stage}: old key {st.old}, new key {st.new}"]
    lines.append(f"leader signs with: {_whose(st, st.leader_key)}")
    if st.stage != "none":
        lines.append(f"nodes: {st.nodes} registered; "
                     + (f"not trusting the new key: {named(st.untrusting)}" if st.untrusting
                        else "all trust the new key"))
    if st.stage == "switched":
        lines.append("desired states: " + (f"not yet signed by the new key: "
                                           f"{named(st.not_resigned)}" if st.not_resigned
                                           else "all signed by the new key"))
    lines.append(f"next: {st.next_step()}")
    return "\n".join(lines)


def _whose(st: Status, key: str) -> str:
    if not key:
        return "nothing (no coordinator leads)"
    if key == st.new:
        return "this key" if st.stage == "none" else "the new key"
    return "the old key" if key == st.old else short(key)


def _say(output: str, data: dict[str, object], text: str) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True) if output == "json" else text)
