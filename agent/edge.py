"""The operator's limits for every router's public port (``fleetwave-agent --router-*``).

Apart from ``agent.router`` so that the agent's flag table can name the defaults without
importing the router's control module (and with it asyncio: see ``agent.main``).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_CONNECTIONS = 4096  # client connections a router holds at once, by default
BODY_TIMEOUT = 60.0  # seconds for a whole request body after its head, by default


@dataclass(frozen=True)
class Edge:
    """Limits of a router's public port: connections held at once, the whole-body deadline,
    and the proxies whose X-Forwarded-For is trusted (addresses or networks)."""

    max_connections: int = MAX_CONNECTIONS
    body_timeout: float = BODY_TIMEOUT
    trusted_proxies: tuple[str, ...] = ()
