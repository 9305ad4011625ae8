"""The router's readiness path: what an external load balancer's health check asks.

``GET /.well-known/fleetwave/ready`` (or HEAD; a query string is ignored) on the service's public
port is answered by the router itself, never passed to the service: 200 ``ready`` while the
router would serve a request (it has a healthy slot with traffic and is not drained), 503 with
the reason otherwise. Why the public port and a reserved path, not a port of its own: the load
balancer already reaches the public port of every node (no firewall rule or extra port per
service to allocate), and the answer is about exactly the listener it sends users to; the
``/.well-known/`` prefix (RFC 8615) is where paths reserved on someone else's namespace belong,
so no application path is taken. The answers are not counted in the slots' figures (a probe
every second would otherwise weigh in a rollout's gates).

``fleetwave drain`` (``RouterConfig.drained``) orders the rest in the server
(``agent.router.server``): 503 here at once, serving as usual for the grace, then no more
accepting; so a load balancer that checks this path stops sending before any connection is cut.
"""

from __future__ import annotations

from agent.router.http11 import REASONS, RequestHead

READY_PATH = "/.well-known/fleetwave/ready"
_REASONS = {200: "OK", **REASONS}


def is_ready_probe(req: RequestHead) -> bool:
    """Whether ``req`` asks the readiness path (GET or HEAD, without a body)."""
    if req.method not in ("GET", "HEAD") or req.has_body:
        return False
    path = req.target.split("?", 1)[0]
    return path == READY_PATH


def ready_response(reason: str, *, head_only: bool, keep_alive: bool) -> bytes:
    """200 ``ready`` when ``reason`` is empty, else 503 with ``reason``; no body to a HEAD."""
    status = 503 if reason else 200
    body = f"{reason or 'ready'}\n".encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
    )
    if not keep_alive:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + (b"" if head_only else body)
