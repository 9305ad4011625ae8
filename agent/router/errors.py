"""The router process's errors, by whose misbehaviour.

    RouterError              the root
    ├── RouterConfigError    the agent's: a config the router refuses (answered on the control
    │                        socket; the config in force stays). Also a ValueError.
    ├── HttpError            a client's or an upstream's: a message head the router refuses;
    │                        ``status`` is the answer to give (400, 431, 501, 505)
    ├── ClientGone           a client's: it closed, stalled or sent a broken body; its
    │                        connection is dropped
    └── Broken               an upstream's: a body ended early or was malformed; the connection
                             is unusable

Socket errors (``OSError``, ``asyncio.IncompleteReadError``) and timeouts are met where they
happen and end one exchange, never the router. The agent's side of the control socket raises
``agent.errors.RouterUnavailable``.
"""

from __future__ import annotations


class RouterError(Exception):
    """Something the router refuses or cannot finish; the message says why."""


class RouterConfigError(RouterError, ValueError):
    """A router config the router refuses; the message says why."""


class HttpError(RouterError):
    """A message the router refuses; ``status`` is the answer to give."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ClientGone(RouterError):
    """The client closed, stalled or sent a broken body; its connection is dropped."""


class Broken(RouterError):
    """A body ended early or was malformed; the connection is unusable."""
