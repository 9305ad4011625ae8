"""``fleetwave protocol ...``: the wire contract for integrations."""

from __future__ import annotations

import json

import click

from coordinator.cli.base import cli
from protocol.schema import wire_schema


@cli.group()
def protocol() -> None:
    """The wire protocol, for integrations in other languages."""


@protocol.command()
def schema() -> None:
    """Print the JSON Schema of every wire message."""
    click.echo(json.dumps(wire_schema(), indent=2, sort_keys=True))
