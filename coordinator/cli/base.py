"""The root click group, its global options and the shared context object."""

from __future__ import annotations

import getpass
import importlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from protocol import creds as creds_file
from protocol.errors import ProtocolError
from protocol.subjects import caller_token, check_name

DEFAULT_NATS = "nats://127.0.0.1:4222"


@dataclass
class Ctx:
    """Global options every command sees."""

    nats_url: str
    fleet: str
    creds: creds_file.Creds | None = None  # --creds: who this client is on the bus
    tls_ca: str | None = None  # --tls-ca: the CA the server's certificate must be signed by

    def access(self) -> dict[str, Any]:
        """The credentials and TLS arguments of ``Bus.connect`` for this client."""
        return {"creds": self.creds, "tls_ca": self.tls_ca}

    @property
    def caller(self) -> str:
        """Who this CLI says it is in its API subjects (``protocol.subjects``): its credentials'
        name, the only one the server lets it publish under; on an open bus (no --creds) the OS
        user, which nothing proves."""
        return self.creds.name if self.creds is not None else os_user()


# The rollout this command follows (``deploy``, ``remove``: ``rollout_cmds._follow``), for the
# line a Ctrl-C leaves (``main``): the rollout runs on, and the id is what to follow it by.
followed: list[str] = []


def os_user() -> str:
    """The OS user as a caller token ("anonymous" when the OS knows no name for this uid)."""
    try:
        return caller_token(getpass.getuser())
    except (OSError, KeyError):  # no USER/LOGNAME and no passwd entry (a bare container)
        return caller_token("")


def load_creds(path: Path | None, fleet: str, role: str | None = None) -> creds_file.Creds | None:
    """The credentials in ``path`` (None without one), checked against the fleet (and
    ``role``); a click usage error (one line, exit 2) if they cannot be this client's."""
    if path is None:
        return None
    try:
        found = creds_file.load(path)
        creds_file.check_for(found, str(path), fleet=fleet, role=role)
    except ProtocolError as exc:
        raise click.BadParameter(str(exc), param_hint="'--creds'") from None
    return found


def check_tls_ca(path: Path | None) -> str | None:
    if path is None:
        return None
    if not path.is_file():
        raise click.BadParameter(
            f"{path} does not exist; pass the fleet's ca.pem (made by 'fleetwave auth init')",
            param_hint="'--tls-ca'")
    return str(path)


creds_option = click.option(
    "--creds", type=click.Path(dir_okay=False, path_type=Path), envvar="FLEETWAVE_CREDS",
    default=None, help="Credentials file made by 'fleetwave auth' (env FLEETWAVE_CREDS). The "
    "coordinator records its name as who asked for each change; without --creds the CLI gives "
    "your OS user name instead, which on an open bus is a claim nothing checks.",
)
tls_ca_option = click.option(
    "--tls-ca", type=click.Path(dir_okay=False, path_type=Path), envvar="FLEETWAVE_TLS_CA",
    default=None, help="CA file the server's TLS certificate must be signed by; turns TLS on "
    "(env FLEETWAVE_TLS_CA).",
)


def _fleet(_: click.Context, __: click.Parameter, value: str) -> str:
    try:
        return check_name("fleet", value)
    except ProtocolError as exc:
        raise click.BadParameter(str(exc)) from None


# Each command's module, imported when that command runs (or ``--help`` lists them all): a
# ``deploy`` need not import the auth, dev-fleet and daemon commands' dependencies, a quarter
# second of every start on this project's machine. ``tests/unit/coordinator/cli`` checks that
# this map names every command each module registers.
COMMANDS = {
    **dict.fromkeys(["abort", "deploy", "events", "pause", "promote", "resume", "rollback",
                     "rollouts", "status"], "rollout_cmds"),
    **dict.fromkeys(["cordon", "drain", "forget", "uncordon"], "node_cmds"),
    **dict.fromkeys(["coordinator", "key", "nodes"], "fleet_cmds"),
    **dict.fromkeys(["broker", "demo"], "infra"),
    "auth": "auth_cmds", "dev": "dev_cmds", "protocol": "proto", "release": "release_cmds",
    "remove": "remove_cmds",
}


class FiniteRange(click.FloatRange):
    """``click.FloatRange`` that refuses NaN (which passes every comparison of its range: a
    --lease-ttl of nan left standbys never taking over a dead leader)."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        out = super().convert(value, param, ctx)
        if not math.isfinite(out):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return out


class LazyGroup(click.Group):
    """The ``fleetwave`` group: a command's module is imported when it is asked for
    (``COMMANDS``); it registers its commands on ``cli`` as it is imported."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = COMMANDS.get(cmd_name)
        if module is not None and cmd_name not in self.commands:
            importlib.import_module(f"coordinator.cli.{module}")
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--nats", "nats_url", envvar="FLEETWAVE_NATS", default=DEFAULT_NATS, show_default=True,
    help="NATS server URL (env FLEETWAVE_NATS).",
)
@click.option(
    "--fleet", envvar="FLEETWAVE_FLEET", default="default", show_default=True, callback=_fleet,
    help="Fleet namespace (env FLEETWAVE_FLEET).",
)
@creds_option
@tls_ca_option
@click.version_option(package_name="fleetwave", prog_name="fleetwave")
@click.pass_context
def cli(ctx: click.Context, nats_url: str, fleet: str, creds: Path | None,
        tls_ca: Path | None) -> None:
    """fleetwave: progressive delivery for fleets of plain hosts, over NATS."""
    ctx.obj = Ctx(nats_url=nats_url, fleet=fleet, creds=load_creds(creds, fleet),
                  tls_ca=check_tls_ca(tls_ca))


output_option = click.option(
    "-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True,
    help="Output format: a table for people, JSON for programs.",
)
