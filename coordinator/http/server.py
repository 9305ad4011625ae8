"""The coordinator's HTTP surface: ``fleetwave coordinator --http HOST:PORT``.

Theory of operation: one aiohttp application on the coordinator's own event loop, bound before
the coordinator connects to the bus (so an address in use is one line at startup, exit 2, and a
load balancer or Prometheus sees the process as soon as it runs). It owns nothing of the
coordinator: every handler reads the ``Coordinator`` it was given, and answers from what that
coordinator holds in memory or reads through its own bus connection, each read bounded.

Routes:
- ``/healthz``: 200 while the process and its loop answer (liveness; nothing else is checked, so a
  broker outage does not get the coordinator restarted by its supervisor);
- ``/readyz``: 200 once the coordinator has set up the fleet and is connected to the bus, with its
  role (leader or standby); 503 and the reason otherwise (readiness: route operators elsewhere);
- the routes other modules add through ``add_routes(app, coordinator)``: ``/metrics``
  (``coordinator.http.metrics``) and the dashboard (``coordinator.web``).

Why aiohttp: the dashboard needs server-sent events, static files and form posts beside the
metrics; aiohttp serves all of them on the loop the coordinator already runs, without a thread.

Limits, since anyone who reaches the address can open connections, and all of them are served on
the leader's loop: a connection that has not sent a complete request head ``HEAD_TIMEOUT`` s after
it opened (or after its last answer) is closed, so idle or trickling sockets cannot pile up; past
``MAX_CONNECTIONS`` open at once, a new one is answered 503 and closed.

DNS rebinding: a hostile page whose name is made to resolve to this host could read ``/api/`` and
``/metrics`` from an operator's browser. A browser always sends the name it resolved as ``Host``,
so a request is answered 421 unless that name (port aside) is an IP address, ``localhost``, the
``--http`` host, or one listed in ``FLEETWAVE_HTTP_HOSTS`` (comma-separated; the name a proxy in
front forwards). ``/healthz`` and ``/readyz`` answer whatever the Host, for load balancers and
supervisors, and reveal nothing a page could use.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from coordinator import web as dashboard
from coordinator.errors import UsageError
from coordinator.http import metrics

if TYPE_CHECKING:
    from coordinator.auth.web_tokens import TokenFile
    from coordinator.runtime.daemon import Coordinator

log = logging.getLogger("fleetwave.coordinator.http")

COORDINATOR: web.AppKey[Coordinator] = web.AppKey("coordinator")
SHUTDOWN_TIMEOUT = 2.0  # open dashboard streams are cut after this at stop
# aiohttp's keep-alive timer: armed when a connection opens (aiohttp 3.14) and after each answer,
# it closes one still waiting for a complete request head (idle, or sending it byte by byte).
HEAD_TIMEOUT = 10.0
MAX_CONNECTIONS = 256  # well under LimitNOFILE; the dashboard's streams are capped lower still
HOSTS_ENV = "FLEETWAVE_HTTP_HOSTS"
ANY_HOST = frozenset({"/healthz", "/readyz"})
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s")


def coordinator_of(request: web.Request) -> Coordinator:
    return request.app[COORDINATOR]


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def readyz(request: web.Request) -> web.Response:
    coord = coordinator_of(request)
    role = "leader" if coord.runner is not None else "standby"
    body: dict[str, object] = {"fleet": coord.fleet_name, "id": coord.id, "role": role}
    if not coord.ready.is_set():
        return web.json_response({**body, "ready": False,
                                  "reason": "not set up yet (waiting for the bus)"}, status=503)
    if coord.bus is None or not coord.bus.connected:
        return web.json_response({**body, "ready": False,
                                  "reason": "disconnected from the bus"}, status=503)
    return web.json_response({**body, "ready": True})


def hostname(host: str) -> str:
    """The name of a Host header, port aside: ``[::1]:9090`` is ``::1``, ``A.b.:80`` ``a.b``."""
    h = host.strip().lower()
    if h.startswith("["):
        return h[1:].partition("]")[0]
    return (h.rpartition(":")[0] if h.count(":") == 1 else h).rstrip(".")


def host_allowed(host: str, names: frozenset[str]) -> bool:
    """Whether a request naming ``host`` can come from a page of this coordinator (see the
    module docstring): an IP address, localhost, or one of ``names``; no Host at all too (no
    browser omits it)."""
    name = hostname(host)
    if not name or name == "localhost" or name in names:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_check(names: Iterable[str]) -> Middleware:
    allowed = frozenset(hostname(n) for n in names)

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get(hdrs.HOST, "")
        if request.path in ANY_HOST or host_allowed(host, allowed):
            return await handler(request)
        return web.json_response({"ok": False, "error": (
            f"this coordinator does not answer for {hostname(host)!r}: open it by IP address "
            f"or localhost, or list that name in {HOSTS_ENV} where it runs")}, status=421)

    return check


def build_app(coordinator: Coordinator, *, tokens: TokenFile | None = None,
              hosts: Iterable[str] = ()) -> web.Application:
    """The surface's application; ``hosts``: the names besides IP addresses and localhost that
    a request may give as its Host."""
    app = web.Application(middlewares=[host_check(hosts)])
    app[COORDINATOR] = coordinator
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    dashboard.add_routes(app, coordinator, tokens)
    metrics.add_routes(app, coordinator)
    return app


class HttpSurface:
    """The bound site; ``start`` before the coordinator runs, ``stop`` after it returns."""

    def __init__(self, coordinator: Coordinator, host: str, port: int, *,
                 tokens: TokenFile | None = None) -> None:
        self.host, self.port = host, port
        hosts = [host, *os.environ.get(HOSTS_ENV, "").replace(",", " ").split()]
        self._runner = web.AppRunner(build_app(coordinator, tokens=tokens, hosts=hosts),
                                     access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT,
                                     keepalive_timeout=HEAD_TIMEOUT)
        self._listener: asyncio.Server | None = None

    async def start(self) -> None:
        await self._runner.setup()
        try:
            # Not web.TCPSite: its protocol factory is aiohttp's own, and this one counts first.
            self._listener = await asyncio.get_running_loop().create_server(
                self._accept, self.host, self.port, reuse_address=True)
        except OSError as exc:
            await self._runner.cleanup()
            why = ("address already in use" if exc.errno == errno.EADDRINUSE
                   else exc.strerror or str(exc))
            raise UsageError(
                f"--http {self.host}:{self.port}: cannot listen ({why}); choose another "
                "address or stop what holds it") from None
        self.port = self._listener.sockets[0].getsockname()[1]  # the one bound, for port 0
        log.info("http: /healthz, /readyz%s on http://%s:%d/", self.extra(), self.host, self.port)

    def extra(self) -> str:
        paths = sorted({r.resource.canonical for r in self._runner.app.router.routes()
                        if r.resource is not None} - {"/healthz", "/readyz"})
        return "".join(f", {p}" for p in paths)

    def _accept(self) -> asyncio.BaseProtocol:
        """aiohttp's protocol for a new connection, or ``_Busy`` past ``MAX_CONNECTIONS``."""
        server = self._runner.server
        assert server is not None  # set up before the listener opens
        if len(server.connections) >= MAX_CONNECTIONS:
            return _Busy()
        return server()

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()  # no new connections; the runner ends the open ones
        await self._runner.cleanup()


class _Busy(asyncio.Protocol):
    """A connection past ``MAX_CONNECTIONS``: a 503 saying so, then closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        why = (f"too many connections to this coordinator's HTTP surface (at most "
               f"{MAX_CONNECTIONS}); try again later\n").encode()
        transport.write(BUSY % (len(why), why))
        transport.close()
