"""The agent's errors: what it raises on purpose, by whose misbehaviour.

    AgentError               the root
    ├── FlagError            the operator's: a bad flag or flag value (one line, exit 2)
    ├── StartupError         the host's: the agent cannot start as asked, e.g. its data dir
    │                        cannot be created (one line, exit 1)
    ├── ReleaseError         the fleet's: a release cannot be made ready on this node (not
    │                        stored, wrong digest, hostile bundle); ``transient`` when the bus
    │                        failed, which a later attempt may not meet
    ├── RouterUnavailable    the host's: a service's router cannot be reached or started, or it
    │   │                    refused a request
    │   └── RouterRunning    a live router already owns the control socket: use it (``pid``)
    └── ProbeAnswerError     a service's: a health probe got no HTTP answer (the prober turns it
        ├── AnswerClosed     into a failed probe): the connection closed before the answer,
        └── AnswerMalformed  or the bytes were no HTTP answer

Anything else is our own mistake, a bug: ``agent.main`` logs it with its traceback and exits 1
for systemd to restart the agent. The protocol's errors (``ProtocolError``: a message or bundle
refused; ``BusError``: NATS failed us) come from ``protocol.errors``; nats-py's own never reach
the agent. The router process draws its own small tree in ``agent.router.errors``.

Each message says what is wrong in one line, fit for the terminal, an observed state or an event.
"""

from __future__ import annotations


class AgentError(Exception):
    """Something the agent refuses or cannot do; the message says why in one line."""


class FlagError(AgentError):
    """A bad flag or flag value; the message is one line, printed with the program's name."""


class StartupError(AgentError):
    """A failure the user can fix (exit 1, one line): not a bug."""


class ReleaseError(AgentError):
    """A release that cannot be made ready on this node; ``reason`` says why in one line.

    ``transient`` marks a failure of the bus (a timeout, a broker away), which a later attempt
    may not meet; anything else (not stored, wrong digest, hostile bundle) will not change.
    """

    def __init__(self, reason: str, *, transient: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


class RouterUnavailable(AgentError):
    """The router cannot be reached, started, or refused a request; the message says why."""


class RouterRunning(RouterUnavailable):
    """A live router already owns the control socket (use it: ``RouterClient`` on that path)."""

    def __init__(self, message: str, pid: int) -> None:
        super().__init__(message)
        self.pid = pid


class ProbeAnswerError(AgentError):
    """A health probe's answer is no HTTP answer; the prober reports a failed probe."""


class AnswerClosed(ProbeAnswerError):
    """The server closed the connection before a complete answer."""


class AnswerMalformed(ProbeAnswerError):
    """The bytes received are no HTTP answer."""
