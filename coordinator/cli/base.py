"""The root click group, its global options and the shared context object."""

from __future__ import annotations

from dataclasses import dataclass

import click

from protocol.errors import ProtocolError
from protocol.subjects import check_name

DEFAULT_NATS = "nats://127.0.0.1:4222"


@dataclass
class Ctx:
    """Global options every command sees."""

    nats_url: str
    fleet: str


def _fleet(_: click.Context, __: click.Parameter, value: str) -> str:
    try:
        return check_name("fleet", value)
    except ProtocolError as exc:
        raise click.BadParameter(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--nats", "nats_url", envvar="FLEETWAVE_NATS", default=DEFAULT_NATS, show_default=True,
    help="NATS server URL (env FLEETWAVE_NATS).",
)
@click.option(
    "--fleet", envvar="FLEETWAVE_FLEET", default="default", show_default=True, callback=_fleet,
    help="Fleet namespace (env FLEETWAVE_FLEET).",
)
@click.version_option(package_name="fleetwave", prog_name="fleetwave")
@click.pass_context
def cli(ctx: click.Context, nats_url: str, fleet: str) -> None:
    """fleetwave: progressive delivery for fleets of plain hosts, over NATS."""
    ctx.obj = Ctx(nats_url=nats_url, fleet=fleet)


output_option = click.option(
    "-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True,
    help="Output format: a table for people, JSON for programs.",
)
