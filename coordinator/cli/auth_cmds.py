"""``fleetwave auth``: a fleet's trust root and its identities (``coordinator.auth.enroll``).

Each command changes the directory and says in one line what it made and what to do next; a
broker started with ``--auth DIR`` picks every change up by itself (it reloads nats-server's
config when ``users.conf`` changes).
"""

from __future__ import annotations

from pathlib import Path

import click

from coordinator.auth.enroll import CA, AuthDir
from coordinator.cli.base import cli

DirArg = click.Path(file_okay=False, path_type=Path)


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
def add_node(directory: Path, node_id: str) -> None:
    """Issue credentials for node NODE_ID (DIRECTORY/nodes/NODE_ID.creds)."""
    path = AuthDir(directory).add("node", node_id)
    click.echo(
        f"{path}: copy it and {directory / CA} to the host (0600), then run 'fleetwave-agent "
        f"--node-id {node_id} --creds FILE --tls-ca ca.pem --nats tls://BROKER:4222'"
    )


@auth.command("add-operator")
@click.argument("directory", type=DirArg)
@click.argument("name")
def add_operator(directory: Path, name: str) -> None:
    """Issue credentials for operator NAME (DIRECTORY/operators/NAME.creds).

    The server lets these credentials call the coordinator's API only as NAME, which the
    coordinator records as who asked for every change (``fleetwave events``); "coordinator" and
    "unknown" are reserved for the audit log's own use."""
    path = AuthDir(directory).add("operator", name)
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
