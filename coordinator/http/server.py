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
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING

from aiohttp import web

from coordinator import web as dashboard
from coordinator.errors import UsageError
from coordinator.http import metrics

if TYPE_CHECKING:
    from coordinator.auth.web_tokens import TokenFile
    from coordinator.runtime.daemon import Coordinator

log = logging.getLogger("fleetwave.coordinator.http")

COORDINATOR: web.AppKey[Coordinator] = web.AppKey("coordinator")
SHUTDOWN_TIMEOUT = 2.0  # open dashboard streams are cut after this at stop


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


def build_app(coordinator: Coordinator, *, tokens: TokenFile | None = None) -> web.Application:
    app = web.Application()
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
        self._runner = web.AppRunner(build_app(coordinator, tokens=tokens), access_log=None,
                                     shutdown_timeout=SHUTDOWN_TIMEOUT)

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            why = ("address already in use" if exc.errno == errno.EADDRINUSE
                   else exc.strerror or str(exc))
            raise UsageError(
                f"--http {self.host}:{self.port}: cannot listen ({why}); choose another "
                "address or stop what holds it") from None
        log.info("http: /healthz, /readyz%s on http://%s:%d/", self.extra(), self.host, self.port)

    def extra(self) -> str:
        paths = sorted({r.resource.canonical for r in self._runner.app.router.routes()
                        if r.resource is not None} - {"/healthz", "/readyz"})
        return "".join(f", {p}" for p in paths)

    async def stop(self) -> None:
        await self._runner.cleanup()
