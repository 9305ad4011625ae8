"""The coordinator's error tree.

    FleetwaveError                 anything the CLI prints as one line and an exit code
    ├── UsageError                 the operator asked for something malformed (exit 2)
    ├── ConfigError                a bad file: manifest, rollout.toml, bundle (exit 2)
    ├── BrokerError                the embedded nats-server could not start or stopped (exit 1)
    ├── RemoteError                the coordinator refused a request; ``code`` says why (exit 1,
    │                              or 2 for ``usage``)
    └── IllegalTransition          (``core.engine_types``) a rollout's state does not accept a
                                   request, or a rollout, wave or node move is not in its table;
                                   nothing was changed (the API answers ``conflict``)

Our own bugs are not in this tree: they surface as tracebacks in logs, never as a user message.
``protocol.errors`` (ProtocolError, BusError, NotReachable, Conflict) are caught at the CLI
boundary too: ProtocolError exits 2, the bus errors exit 1.
"""

from __future__ import annotations


class FleetwaveError(Exception):
    """An error meant for a person: the message is one line (what, why, what to do)."""

    exit_code = 1


class UsageError(FleetwaveError):
    exit_code = 2


class ConfigError(FleetwaveError):
    exit_code = 2


class BrokerError(FleetwaveError):
    pass


class RemoteError(FleetwaveError):
    """``data``: what the coordinator knows despite the refusal (``accepted``: the id)."""

    def __init__(self, message: str, code: str = "internal", data: object = None) -> None:
        super().__init__(message)
        self.code = code
        self.data = data
        if code == "usage":
            self.exit_code = 2
