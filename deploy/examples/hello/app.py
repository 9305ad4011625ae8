"""hello: the example fleetwave service (stdlib only; identical in every version directory).

GET /         {"service", "version", "node", "slot", "greeting"} as JSON
GET /healthz  200 "ok" (503 with HEALTH_FAIL=1, on the node HEALTH_FAIL_ON_NODE names, or
              after HEALTH_FAIL_AFTER_S)
POST /echo    the request body back, to exercise request bodies through the router

Environment: PORT (required, set by the agent), BIND_HOST (default 127.0.0.1),
FLEETWAVE_VERSION / FLEETWAVE_NODE / FLEETWAVE_SLOT (set by the agent), GREETING, and the knobs
that let tests misbehave on purpose:

ERROR_RATE        fraction 0-1 of GET / answered 500; deterministic (error n is due when
                  floor(n * rate) grows), so 0.5 is exactly every other request
EXTRA_LATENCY_MS  added before answering GET / and POST /echo (not /healthz)
HEALTH_FAIL=1     /healthz never passes
HEALTH_FAIL_ON_NODE=ID  /healthz never passes where FLEETWAVE_NODE is ID (one bad node of many:
                  every node gets the same release, so the knob must pick the node itself)
CRASH_AFTER_S     exit with status 3 after that many seconds
HEALTH_FAIL_AFTER_S  /healthz answers 503 once the process has run that many seconds, while
                  GET / keeps answering (a hung dependency: unhealthy but running)

``python3 app.py --smoke`` is a validate hook: one GET / to 127.0.0.1:PORT that must answer 200
with this FLEETWAVE_VERSION (exit 0, else 1 with the reason).

SIGTERM (or SIGINT): stop accepting, finish the requests in flight, close idle keep-alive
connections, exit 0.

Every version directory carries this same file (a bundle must be self-contained and symlinks out
of a bundle are refused); a unit test checks that the copies are identical.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Knobs:
    def __init__(self, env: dict[str, str]) -> None:
        self.version = env.get("FLEETWAVE_VERSION", "dev")
        self.node = env.get("FLEETWAVE_NODE", "")
        self.slot = env.get("FLEETWAVE_SLOT", "")
        self.greeting = env.get("GREETING", "hello")
        self.error_rate = min(1.0, max(0.0, float(env.get("ERROR_RATE", "0") or 0)))
        self.extra_latency = float(env.get("EXTRA_LATENCY_MS", "0") or 0) / 1000.0
        fail_on = env.get("HEALTH_FAIL_ON_NODE", "")
        self.health_fail = env.get("HEALTH_FAIL", "") == "1" or bool(
            fail_on and fail_on == self.node
        )
        crash = env.get("CRASH_AFTER_S", "")
        self.crash_after = float(crash) if crash else None
        fail_after = env.get("HEALTH_FAIL_AFTER_S", "")
        self.health_fail_at = time.monotonic() + float(fail_after) if fail_after else None

    def health_failing(self) -> bool:
        return self.health_fail or (
            self.health_fail_at is not None and time.monotonic() >= self.health_fail_at
        )


class Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins request threads: in-flight requests finish
    block_on_close = True

    def __init__(self, addr: tuple[str, int], knobs: Knobs) -> None:
        self.knobs = knobs
        self.stopping = False
        self.lock = threading.Lock()
        self.requests = 0
        self.idle: dict[socket.socket, bool] = {}  # open connection -> waiting for a request
        super().__init__(addr, Handler)

    def should_fail(self) -> bool:
        with self.lock:
            n = self.requests
            self.requests += 1
        rate = self.knobs.error_rate
        return math.floor((n + 1) * rate) > math.floor(n * rate)

    def set_idle(self, conn: socket.socket, idle: bool) -> None:
        with self.lock:
            if conn in self.idle:
                self.idle[conn] = idle
            if idle and self.stopping:
                _hangup(conn)

    def close_idle(self) -> None:
        with self.lock:
            self.stopping = True
            for conn, idle in self.idle.items():
                if idle:
                    _hangup(conn)


def _hangup(conn: socket.socket) -> None:
    """End an idle keep-alive connection, unless a request already waits in its buffer.

    Only its reading side is shut: the handler waiting for a request reads end-of-file and
    closes the connection. A handler that has just read a request (it is in its own buffer, not
    the socket's, and the connection not yet marked busy) can still write the answer: shutting
    both sides lost that answer when SIGTERM came at that moment."""
    with contextlib.suppress(OSError, ValueError):  # already closed by the peer
        readable, _, _ = select.select([conn], [], [], 0)
        if not readable:  # a waiting request is served, then closed ("Connection: close")
            conn.shutdown(socket.SHUT_RD)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; without TCP_NODELAY, Nagle holds the body back until
    # the peer's delayed ACK (40 ms) arrives, and every answer takes 40 ms longer than it should.
    disable_nagle_algorithm = True
    server_version = "hello"
    timeout = 60  # an idle keep-alive connection is closed after this
    server: Server

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.idle[self.connection] = True

    def finish(self) -> None:
        with self.server.lock:
            self.server.idle.pop(self.connection, None)
        super().finish()

    def parse_request(self) -> bool:
        self.server.set_idle(self.connection, False)
        return super().parse_request()

    def handle_one_request(self) -> None:
        super().handle_one_request()
        if not self.close_connection:
            # Idle again. Stopping, the connection is hung up (``_hangup``) unless the next
            # request already waits: a keep-alive client may have sent it before it read this
            # answer, which did not say "Connection: close"; it is answered (with that header),
            # not dropped. Closing at once here lost it when SIGTERM came between the answer
            # and this line.
            self.server.set_idle(self.connection, True)

    def log_message(self, format: str, *args: object) -> None:
        return  # one line per request would drown the agent's logs

    def do_GET(self) -> None:
        k = self.server.knobs
        if self.path == "/healthz":
            if k.health_failing():
                self._send(503, b"unhealthy (HEALTH_FAIL or HEALTH_FAIL_AFTER_S knob)\n",
                           "text/plain")
            else:
                self._send(200, b"ok\n", "text/plain")
            return
        if self.path.split("?")[0] != "/":
            self._json(404, {"error": "not found", "path": self.path})
            return
        if k.extra_latency:
            time.sleep(k.extra_latency)
        if self.server.should_fail():
            self._json(500, {"error": "injected failure (ERROR_RATE)", "version": k.version})
            return
        self._json(200, {
            "service": "hello", "version": k.version, "node": k.node, "slot": k.slot,
            "greeting": k.greeting, "forwarded_for": self.headers.get("X-Forwarded-For"),
        })

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        if self.path != "/echo":
            self._json(404, {"error": "not found", "path": self.path})
            return
        if self.server.knobs.extra_latency:
            time.sleep(self.server.knobs.extra_latency)
        self._send(200, body, self.headers.get("Content-Type") or "application/octet-stream")

    def _json(self, status: int, doc: dict[str, object]) -> None:
        self._send(status, json.dumps(doc, sort_keys=True).encode() + b"\n", "application/json")

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if self.server.stopping:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def smoke() -> int:
    """The validate hook: this slot answers GET / with 200 and its own version."""
    import urllib.request

    try:
        port = int(os.environ["PORT"])
        want = os.environ.get("FLEETWAVE_VERSION", "dev")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
            doc = json.loads(resp.read())
    except (KeyError, ValueError, OSError) as exc:
        print(f"smoke: GET / failed: {exc}", file=sys.stderr)
        return 1
    if doc.get("version") != want:
        print(f"smoke: GET / named version {doc.get('version')!r}, expected {want!r}",
              file=sys.stderr)
        return 1
    print(f"smoke ok: {want} on port {port}")
    return 0


def main() -> int:
    if sys.argv[1:] == ["--smoke"]:
        return smoke()
    try:
        port = int(os.environ["PORT"])
        knobs = Knobs(dict(os.environ))
    except (KeyError, ValueError) as exc:
        print(f"hello: bad environment ({exc}); PORT must be set to a number", file=sys.stderr)
        return 2
    host = os.environ.get("BIND_HOST", "127.0.0.1")
    try:
        server = Server((host, port), knobs)
    except OSError as exc:
        print(f"hello: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if knobs.crash_after is not None:
        timer = threading.Timer(knobs.crash_after, os._exit, args=(3,))
        timer.daemon = True
        timer.start()
    loop = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    loop.start()
    print(f"hello {knobs.version} listening on {host}:{port}", file=sys.stderr, flush=True)
    while not stop.wait(1.0):
        pass
    server.close_idle()  # from now on every answer says "Connection: close"
    server.shutdown()  # stop accepting; returns once serve_forever has left its loop
    loop.join()
    server.close_idle()  # connections accepted while shutting down
    server.server_close()  # joins the request threads: in-flight requests are finished
    print(f"hello {knobs.version} stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
