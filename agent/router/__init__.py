"""The per-node router: an HTTP/1.1 reverse proxy per service, in its own process.

The agent spawns it with ``start_router`` and drives it through ``RouterClient`` over a unix socket;
see ``control`` for the API and ``client`` for what happens to a request.

    control.py   the agent's side: RouterClient, start_router, the control messages
    __main__.py  ``python -m agent.router``; server.py: the process (control and public sockets)
    proxy.py     Proxy: the routing in force, pools, counters, the connections' sweeper
    client.py    ClientConn: one client connection, its callback fast path
    exchange.py  the general path (bodies, retries, mirroring); ports.py: what it needs of the
                 proxy and a connection, so that it imports neither
    mirror.py    shadow copies and their comparison; routing.py, balance.py: a config made
                 usable (pure); http11.py: heads (pure); channel.py, upstream.py: connections
                 and bodies; stats.py: counters; errors.py: the router's error tree

The router imports ``protocol``, ``agent.errors``, ``agent.edge`` and ``agent.host.identity``
(to run as the service user), never the manager or the daemon: it outlives the agent.
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
