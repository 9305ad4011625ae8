"""The per-node router: an HTTP/1.1 reverse proxy per service, in its own process.

The agent spawns it with ``start_router`` and drives it through ``RouterClient`` over a unix socket;
see ``control`` for the API and ``proxy`` for what happens to a request.
"""

from agent.errors import RouterRunning, RouterUnavailable
from agent.router.control import RouterClient, RouterConfig, Upstream, start_router

__all__ = [
    "RouterClient",
    "RouterConfig",
    "RouterRunning",
    "RouterUnavailable",
    "Upstream",
    "start_router",
]
