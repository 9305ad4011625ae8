"""webapp: the example of a real app on fleetwave, with dependencies from the package index.

A Starlette app served by uvicorn. The manifest starts it with
``python3 -m uvicorn app:app --port ${PORT}`` (the agent fills ``${PORT}`` with the slot's
private port: no wrapper script), and ``PYTHONPATH=lib`` finds Starlette and uvicorn in the
bundle's own ``lib/`` (build.py puts them there; see README.md for why that way).

GET /         {"service", "version", "node", "slot", "framework"} as JSON
GET /healthz  200 "ok"

FLEETWAVE_VERSION, FLEETWAVE_NODE and FLEETWAVE_SLOT come from the agent's environment.
SIGTERM: uvicorn stops accepting, finishes the requests in flight, and exits.
"""

from __future__ import annotations

import os

import starlette
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

IDENTITY = {
    "service": "webapp",
    "version": os.environ.get("FLEETWAVE_VERSION", "dev"),
    "node": os.environ.get("FLEETWAVE_NODE", ""),
    "slot": os.environ.get("FLEETWAVE_SLOT", ""),
    "framework": f"starlette {starlette.__version__}",
}


async def index(request: Request) -> JSONResponse:
    return JSONResponse(IDENTITY)


async def healthz(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


app = Starlette(routes=[Route("/", index), Route("/healthz", healthz)])
