"""``python -m coordinator.daemon``: the coordinator daemon's module entry point.

Dev fleets, tests and benchmarks start the coordinator this way. It is the CLI's ``coordinator``
command (``coordinator.cli.fleet_cmds``) with the word ``coordinator`` added when missing; the
daemon itself is ``coordinator.runtime.daemon.Coordinator``. Nothing imports this module, so the
CLI imports the daemon and never the other way round.
"""

from __future__ import annotations

import sys

from coordinator.cli import main as cli_main


def main(argv: list[str] | None = None) -> None:
    """``python -m coordinator.daemon [--nats URL] [--fleet NAME]``: same as the CLI command."""
    args = list(sys.argv[1:] if argv is None else argv)
    # Options of the 'coordinator' command itself (--key-file) follow the word 'coordinator'.
    has_command = any(a == "coordinator" and (i == 0 or args[i - 1] not in ("--nats", "--fleet"))
                      for i, a in enumerate(args))
    cli_main(args if has_command else [*args, "coordinator"])


if __name__ == "__main__":
    main()
