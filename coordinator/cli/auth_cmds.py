"""``fleetwave auth``: a fleet's trust root and its identities (``coordinator.auth.enroll``).

Each command changes the directory and says in one line what it made and what to do next; a
broker started with ``--auth DIR`` picks every change up by itself (it reloads nats-server's
config when ``users.conf`` changes).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click

from coordinator.auth.enroll import CA, USERS, AuthDir, Identity, parse_lifetime
from coordinator.cli.base import cli
from protocol.creds import format_time

DirArg = click.Path(file_okay=False, path_type=Path)


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
        f"--node-id {node_id} --creds FILE --tls-ca ca.pem --nats tls://BROKER:4222'"
    )


@auth.command("add-operator")
@click.argument("directory", type=DirArg)
@click.argument("name")
@expires_option
def add_operator(directory: Path, name: str, expires: dt.timedelta | None) -> None:
    """Issue credentials for operator NAME (DIRECTORY/operators/NAME.creds)."""
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
    click.echo(f"revoked {gone.role} {name!r}: removed from {directory / 'users.conf'} and its "
               "credentials file deleted; brokers with --auth reload it by themselves")


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
