"""``/metrics`` over HTTP on the agent's own event loop: no thread, no web framework.

Theory of operation: ``bind(host, port)`` takes the address when the flags are checked, before
anything else is done (a taken address is one line and exit 2, and the agent changed nothing);
``MetricsServer.serve`` then answers on that socket until cancelled. Each connection gets one
answer and is closed (Prometheus opens one per scrape anyway): the request head must arrive within
``HEAD_TIMEOUT`` and fit in ``MAX_HEAD`` bytes, the answer must be taken within ``WRITE_TIMEOUT``,
and at most ``MAX_CLIENTS`` connections are served at once (more are closed at once), so no client
can hold the agent's memory or its loop. ``GET /metrics`` renders the registry in the OpenMetrics
1.0 text format with ``prometheus_client``'s encoder, whatever the ``Accept`` header: Prometheus
(and every scraper that reads its format) parses it by its content type, and the encoder of the
older Prometheus text format lives in the module ``agent.lean.import_prometheus`` leaves out.
Rendering reads only what the agent holds in memory (``agent.metrics``): a scrape never waits on
the bus or a router.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.errors import FlagError

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

log = logging.getLogger("fleetwave.agent.metrics")

HEAD_TIMEOUT = 5.0
WRITE_TIMEOUT = 10.0
MAX_HEAD = 8192
MAX_CLIENTS = 8

Render = Callable[[], tuple[bytes, str]]  # -> (body, content type)


def parse_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9464`` for IPv6) as (host, port); ValueError says what is wrong."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r} is not HOST:PORT, e.g. 127.0.0.1:9464")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address, e.g. 127.0.0.1:9464") from None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{port_text!r} is not a port (1-65535)")
    return host, int(port_text)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or FlagError in one line (in use, not this host's)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(16)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        where = f"{host}:{port}" if family == socket.AF_INET else f"[{host}]:{port}"
        if exc.errno == errno.EADDRINUSE:
            why = "the address is already in use; stop what holds it or pick another port"
        elif exc.errno == errno.EADDRNOTAVAIL:
            why = "no interface of this host has that address; pick one it has"
        else:
            why = f"{exc.strerror or exc}"
        raise FlagError(f"Invalid value for '--metrics': cannot listen on {where}: {why}") from None
    return sock


class MetricsServer:
    """Answers ``GET /metrics`` on a bound socket; see the module docstring."""

    def __init__(self, sock: socket.socket, render: Render) -> None:
        self.sock = sock
        self.render = render
        self.scrapes = 0
        # Connections being served, closed by ``serve``'s end (their handlers then end on their
        # own: a cancelled stream handler is logged by asyncio as an error).
        self._clients: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"

    async def serve(self) -> None:
        """Serve until cancelled; then close the socket and every connection still open."""
        server = await asyncio.start_server(self._client, sock=self.sock, limit=MAX_HEAD)
        log.info("serving metrics on http://%s/metrics", self.address)
        try:
            await asyncio.Future()  # until cancelled
        finally:
            server.close()
            for writer in self._clients.values():
                writer.transport.abort()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await asyncio.gather(*self._clients, return_exceptions=True)
                    await server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._clients) >= MAX_CLIENTS:
            writer.transport.abort()  # unanswered: the scraper retries at its next interval
            return
        self._clients[task] = writer
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            answer = self.answer(head)
            writer.write(answer)
            async with asyncio.timeout(WRITE_TIMEOUT):
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # slow, truncated, oversized or gone: the connection just closes
        finally:
            self._clients.pop(task, None)
            writer.close()

    def answer(self, head: bytes) -> bytes:
        """The whole HTTP answer to one request head."""
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return _response(400, "text/plain", b"bad request\n")
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            return _response(405, "text/plain", b"only GET and HEAD\n",
                             extra="Allow: GET, HEAD\r\n")
        path = target.split("?", 1)[0]
        if path == "/":
            body = b"fleetwave-agent: Prometheus metrics at /metrics\n"
            return _response(200, "text/plain; charset=utf-8", body, head_only=method == "HEAD")
        if path != "/metrics":
            return _response(404, "text/plain", b"not found: try /metrics\n")
        try:
            body, content_type = self.render()
        except Exception:  # a bug in a collector must cost one scrape, never the agent
            log.exception("rendering the metrics failed")
            return _response(500, "text/plain", b"rendering the metrics failed; see the log\n")
        self.scrapes += 1
        return _response(200, content_type, body, head_only=method == "HEAD")


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            500: "Internal Server Error"}


def _response(status: int, content_type: str, body: bytes, *, extra: str = "",
              head_only: bool = False) -> bytes:
    head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n")
    return head.encode("latin-1") + (b"" if head_only else body)


def registry_renderer(collector: Collector) -> Render:
    """``render`` over a registry holding ``collector`` alone (no process or GC collectors: the
    agent names its own figures), in OpenMetrics text."""
    from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST, generate_latest
    from prometheus_client.registry import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)

    def render() -> tuple[bytes, str]:
        body: bytes = generate_latest(registry)  # type: ignore[no-untyped-call]  # untyped def
        return body, CONTENT_TYPE_LATEST

    return render
