"""The live web dashboard at ``/`` of ``fleetwave coordinator --http HOST:PORT``.

- ``feed``      the recent events of the fleet, followed on the coordinator's connection;
- ``handlers``  the JSON endpoints under ``/api/``, the server-sent event stream and the actions;
- ``static/``   the page: plain HTML, CSS and JavaScript shipped in the package (no build step,
                no third-party code); the chart is inline SVG drawn by ``app.js``.

The page opens an ``EventSource`` on ``/api/stream`` and redraws from each snapshot, so it
follows a rollout without reloading. It is read-only unless the person enters an operator token
(``fleetwave auth add-web-token``; the coordinator's ``--http-tokens FILE``), which the script
sends as ``Authorization: Bearer`` on each action.

Served with a Content-Security-Policy that allows scripts, styles and requests of this origin
only, and no framing; everything a node wrote (ids, labels, reasons, event messages) is put
into the page as text, never as markup.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from coordinator.auth.web_tokens import TokenFile
from coordinator.web.feed import Feed, feed_context
from coordinator.web.handlers import Dashboard

if TYPE_CHECKING:
    from coordinator.runtime.daemon import Coordinator

STATIC = Path(__file__).parent / "static"
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


async def _page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers=HEADERS)


def add_routes(app: web.Application, coordinator: Coordinator,
               tokens: TokenFile | None = None) -> None:
    """Serve the dashboard on ``app`` (see the module docstring); ``tokens`` None: read-only."""
    feed = Feed(coordinator)
    app.cleanup_ctx.append(partial(feed_context, feed=feed))
    d = Dashboard(coordinator, feed, tokens)
    app.on_shutdown.append(d.close)
    app.router.add_get("/", _page)
    app.router.add_static("/static/", STATIC, append_version=False)
    app.router.add_get("/api/fleet", d.fleet)
    app.router.add_get("/api/rollouts", d.rollouts)
    app.router.add_get("/api/rollouts/{id}", d.rollout)
    app.router.add_get("/api/rollouts/{id}/events", d.events)
    app.router.add_get("/api/stream", d.stream)
    app.router.add_get("/api/whoami", d.whoami)
    app.router.add_post("/api/rollouts/{id}/{verb}", d.act)
    app.router.add_post("/api/services/{service}/rollback", d.rollback)
