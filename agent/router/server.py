"""The router process: its control socket, its listening socket, and its orderly exit.

Theory of operation: the process starts unconfigured, listening only on its control socket. A
``configure`` is validated (``build_routing``), then, if the listen address changed, the new
address is bound *before* the old one is closed; a bind failure refuses the config and leaves the
old one in force. The same address keeps the same listening socket, so no connection is dropped by
a reconfigure. On SIGTERM, SIGINT or a ``shutdown`` request the router stops accepting (new SYNs
are dropped, then the connections the kernel already took are accepted and served before the
listener closes: ``agent.router.listener``), closes idle keep-alive connections, lets in-flight
requests finish for up to ``drain_timeout``, then cancels what is left and exits 0.

At start the process raises its soft open-file limit to the hard one: each client connection may
hold two descriptors (its own and an upstream's), so the config's ``max_connections`` is honoured
only up to what that limit allows (the log says so when it clamps), and past the cap a client
gets a 503 instead of the listener failing to accept.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import resource
import signal
import socket
import time
from pathlib import Path
from typing import Any

import msgspec

from agent.router.control import (
    MAX_LINE,
    REQUEST_DECODER,
    Configure,
    GetStats,
    Ping,
    Reply,
    RouterConfig,
    Shutdown,
    encode_reply,
)
from agent.router.errors import RouterConfigError
from agent.router.listener import close_gracefully
from agent.router.proxy import Proxy
from agent.router.routing import build_routing
from agent.router.stats import router_stats
from protocol.messages import DrainPhase, RouterStats

log = logging.getLogger(__name__)

CONTROL_IDLE = 30.0  # a control connection silent for this long is closed
BACKLOG = 1024
RESERVED_FDS = 64  # descriptors kept for the listener, control, mirror, logs
ACCEPT_QUEUE_WAIT = 1.0  # at most this long to accept what the kernel took before a close


def client_fd_budget() -> int:
    """Raise the soft open-file limit to the hard one; the client connections it allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # keep the soft limit we have
    return max(1, (soft - RESERVED_FDS) // 2)


def keep_socket(loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
    """``cleanup_socket=False`` where ``loop`` takes it (asyncio from Python 3.13, uvloop):
    the control socket is the agent's, in a directory the router's user cannot look into, and
    a server that cleans its socket up stats its path when it starts: PermissionError there,
    and the router would not start (asyncio catches only FileNotFoundError)."""
    try:
        params = inspect.signature(loop.create_unix_server).parameters
    except (TypeError, ValueError):
        return {}
    return {"cleanup_socket": False} if "cleanup_socket" in params else {}


class RouterServer:
    """One router process; ``run`` returns when it has drained and stopped."""

    def __init__(self, socket_path: Path, control: socket.socket | None = None) -> None:
        self.socket_path = socket_path
        self._control_socket = control  # listening at ``socket_path`` already (the agent's)
        self.proxy = Proxy()
        self.epoch = time.time()
        self.pid = os.getpid()
        self.config: RouterConfig | None = None
        self.listener: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None  # (host, bound port)
        self.stopping = asyncio.Event()
        self._configuring = asyncio.Lock()
        self._control_tasks: set[asyncio.Task[None]] = set()
        self._maintenance: asyncio.Task[None] | None = None  # a drain's grace, then its close

    async def run(self) -> None:
        """Serve until asked to stop, then drain and return."""
        loop = asyncio.get_running_loop()
        if self._control_socket is not None:  # made by the agent, 0600 in its own directory
            control = await asyncio.start_unix_server(
                self._control, sock=self._control_socket, limit=MAX_LINE, **keep_socket(loop)
            )
        else:
            control = await asyncio.start_unix_server(
                self._control, path=str(self.socket_path), limit=MAX_LINE
            )
            self.socket_path.chmod(0o600)  # only the agent's user may reconfigure the router
        self.proxy.fd_budget = client_fd_budget()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        self.proxy.mirror.start()
        self.proxy.start()
        log.info("router %d ready on %s", self.pid, self.socket_path)
        try:
            await self.stopping.wait()
        finally:
            control.close()
            # The agent's socket is in its own directory: it removes the file as stale.
            with contextlib.suppress(FileNotFoundError, PermissionError):
                self.socket_path.unlink()
            await self._stop_maintenance()
            await self._drain()
            for task in list(self._control_tasks):
                task.cancel()
            await asyncio.gather(*self._control_tasks, return_exceptions=True)
            await self.proxy.mirror.close()
            for pool in self.proxy.pools.values():
                pool.close()
            log.info("router %d stopped", self.pid)

    async def _drain(self) -> None:
        """Stop accepting, close idle clients, give in-flight requests ``drain_timeout``."""
        await self._close_clients()
        await self.proxy.close()

    async def _close_clients(self) -> None:
        """Stop accepting, close idle clients, give in-flight requests ``drain_timeout``, then
        drop what is left."""
        self.proxy.closing = True
        timeout = self.config.drain_timeout if self.config is not None else 0.0
        deadline = time.monotonic() + timeout
        if self.listener is not None:
            listener, self.listener = self.listener, None
            await close_gracefully(listener, within=max(0.0, min(timeout, ACCEPT_QUEUE_WAIT)))
        while self.proxy.clients:
            self.proxy.close_idle()
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.01)  # polling in-flight requests, bounded by the deadline
        await self.proxy.drop_clients()

    # -- maintenance (``fleetwave drain``) --------------------------------------------------------

    async def _out_of_service(self, grace: float) -> None:
        """A drain: the readiness path already says 503 (``proxy.drained``); serve as usual for
        ``grace`` (the load balancer notices and stops sending), then stop accepting and drain.
        Nothing is cut before the grace is over: that is the order a drain promises."""
        await asyncio.sleep(grace)  # the load balancer's time to notice, not a wait for a state
        log.info("drained: grace of %gs over; no longer accepting, draining %d connections",
                 grace, len(self.proxy.clients))
        await self._close_clients()
        log.info("drained: every connection closed")

    async def _stop_maintenance(self) -> None:
        task, self._maintenance = self._maintenance, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- configuration ----------------------------------------------------------------------------

    def stats(self) -> RouterStats:
        return router_stats(
            epoch=self.epoch,
            pid=self.pid,
            port=self.address[1] if self.address else None,
            weights=self.proxy.routing.weights if self.proxy.routing else {},
            slots=self.proxy.slots,
            mirror=self.proxy.mirror_counters if self.config and self.config.mirror else None,
            cohort=self.proxy.cohort_counters,
            drain=self._drain_phase(),
            connections=len(self.proxy.clients),
        )

    def _drain_phase(self) -> DrainPhase:
        """Out of service: "draining" while the listener is open or a client connection is,
        "drained" once neither (``fleetwave drain --wait`` waits for that)."""
        if not self.proxy.drained:
            return ""
        return "draining" if self.listener is not None or self.proxy.clients else "drained"

    async def configure(self, cfg: RouterConfig) -> RouterStats:
        """Apply ``cfg`` as a whole or not at all; raises RouterConfigError with the reason."""
        async with self._configuring:
            if self.stopping.is_set():
                raise RouterConfigError("the router is shutting down")
            routing = build_routing(cfg)
            same = self.address is not None and self.address[0] == cfg.listen_host and (
                cfg.listen_port in (0, self.address[1])
            )
            if cfg.drained:
                # Out of service: bind nothing (a router started while the node is drained
                # stays closed), and start the drain unless one is under way or done.
                self.proxy.drained = True
                if self.address is None:
                    self.address = (cfg.listen_host, cfg.listen_port)
                if self._maintenance is None and self.listener is not None:
                    log.info("drained: the readiness path answers 503; closing in %gs",
                             cfg.drain_grace)
                    self._maintenance = asyncio.create_task(
                        self._out_of_service(cfg.drain_grace), name="router-drain")
            elif self.proxy.drained:
                await self._stop_maintenance()  # an undrain within the grace: nothing was cut
                self.proxy.drained = self.proxy.closing = False
                log.info("undrained: serving again")
            if not cfg.drained and (not same or self.listener is None):
                try:
                    listener = await asyncio.get_running_loop().create_server(
                        self.proxy.protocol,
                        cfg.listen_host,
                        cfg.listen_port,
                        backlog=BACKLOG,
                        reuse_address=True,
                    )
                except OSError as exc:
                    raise RouterConfigError(
                        f"cannot listen on {cfg.listen_host}:{cfg.listen_port}: "
                        f"{exc.strerror or exc}; free the port or pick another"
                    ) from None
                old, self.listener = self.listener, listener
                port = listener.sockets[0].getsockname()[1]
                self.address = (cfg.listen_host, port)
                if old is not None:  # stops accepting; connections it took carry on
                    await close_gracefully(old, within=ACCEPT_QUEUE_WAIT)
            self.proxy.apply(routing)
            changed = self.config is None or self.config.max_connections != cfg.max_connections
            self.config = cfg
            if changed and self.proxy.max_connections < cfg.max_connections:
                log.warning(
                    "max_connections %d lowered to %d: the open-file limit allows no more",
                    cfg.max_connections, self.proxy.max_connections,
                )
            log.info(
                "configured %s on %s:%s weights=%s mirror=%s%s",
                cfg.service, *(self.address or ("?", "?")), routing.weights,
                cfg.mirror.slot if cfg.mirror else None, " (drained)" if cfg.drained else "",
            )
            return self.stats()

    # -- the control socket -----------------------------------------------------------------------

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._control_tasks.add(task)
        try:
            while True:
                try:
                    async with asyncio.timeout(CONTROL_IDLE):
                        line = await reader.readline()
                except (TimeoutError, ValueError, OSError):
                    return  # idle, a line over the limit, or gone
                if not line:
                    return
                reply, stop = await self._answer(line)
                writer.write(encode_reply(reply))
                async with asyncio.timeout(CONTROL_IDLE):
                    await writer.drain()
                if stop:
                    self.stopping.set()
        except (OSError, TimeoutError):
            pass
        except asyncio.CancelledError:
            pass  # shutdown cancelled an idle control connection
        finally:
            self._control_tasks.discard(task)
            writer.close()

    async def _answer(self, line: bytes) -> tuple[Reply, bool]:
        """The reply to one control line, and whether to stop after sending it."""
        try:
            request = REQUEST_DECODER.decode(line)
        except msgspec.DecodeError as exc:
            return Reply(ok=False, error=f"bad control message: {exc}"), False
        match request:
            case Ping():
                return Reply(ok=True, pid=self.pid), False
            case GetStats():
                return Reply(ok=True, pid=self.pid, stats=self.stats()), False
            case Configure(config=cfg):
                try:
                    stats = await self.configure(cfg)
                except RouterConfigError as exc:
                    return Reply(ok=False, pid=self.pid, error=f"config refused: {exc}"), False
                return Reply(ok=True, pid=self.pid, stats=stats), False
            case Shutdown():
                return Reply(ok=True, pid=self.pid), True
        return Reply(ok=False, error="unknown request"), False  # unreachable: the union is closed
