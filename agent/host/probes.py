"""Health probes of a slot: http (GET path, 2xx/3xx), tcp (connect) or exec (argv, exit 0).

Two parts. ``Thresholds`` is pure: it turns a stream of probe results into health, with the
manifest's healthy/unhealthy thresholds (a slot becomes healthy after ``healthy_threshold``
successes in a row, and unhealthy after ``unhealthy_threshold`` failures in a row once it was
healthy). ``probe_once`` is the IO: one attempt, bounded by ``timeout``, that never raises; it
returns whether it passed and a short reason. ``Prober.run`` probes every ``interval`` (on the
grid of ``agent.cadence``) and reports each change of health; the start timeout is the
reconciler's business (time injected there).

Probes go to 127.0.0.1 on the slot's private port, never through the router.

A new slot is found ready as soon as it listens, not at the next probe: until it is first
healthy, a probe refused because nothing listens on the port yet is followed by a connect
attempt every few milliseconds (5 ms, growing to ``LISTEN_POLL_MAX``) up to the next probe's
turn, and the probe runs at once when one is accepted (on that connection). A refused connect
on loopback costs one syscall; a process that takes 0.3 s to start is found within ~10 ms of
its listen instead of up to a whole ``start_interval`` later (and every rolling wave waits for
its slowest start: the 0.1-0.2 s of a probe grid came on top of each wave). Each attempt is
first one non-blocking connect (``connect_now``): on loopback the kernel has refused or accepted
it by the time the call returns, so a refusal costs no event loop work at all (the asyncio
connect it replaced cost ten times the CPU, 75 against 7 us, about 40 attempts a start: on a
host staging ten slots at once that CPU was taken from the starting services; issue 17), and an
accepted connection is the one the probe then uses. Every probe
after that early one, until the slot is first healthy, comes a whole period after the last (the
passes ``healthy_threshold`` counts are a period apart, a 503 among them or not), then the grid.
Only refusals poll fast; a slot that answers, even 503, without an early probe before, is
probed on the grid. A slot healthy before its prober (adopted after the agent's restart) is
probed as a healthy one: on the grid, where failures turn it unhealthy.

Cost: an interval of 200 ms is five probes a second per slot for the agent's whole life, so
``Prober`` keeps its http connection open between probes (``HttpProbeConnection``, HTTP/1.1
keep-alive) instead of connecting, writing, reading and closing five times a second. The
connection is dropped and reopened whenever it cannot be reused: the server said
``Connection: close``, the body has no Content-Length (chunked, or read-until-close), an answer
was malformed or late. A reused connection the server closed while idle is retried once on a fresh
one within the same probe, so a keep-alive timeout never counts as a failed probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
import socket
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.cadence import next_tick, sleep_to_tick
from agent.errors import AnswerClosed, AnswerMalformed
from agent.host.identity import RunAs, spawn_kwargs
from agent.host.processes import end_leftovers
from protocol.loop import bounded
from protocol.manifest import HealthConfig

PROBE_HOST = "127.0.0.1"
_MAX_STATUS_LINE = 1024
# A status or header line past asyncio's StreamReader limit (readline raises ValueError): a
# failed probe, not an error of the agent (it took the slot's supervisor, and the slot, down).
_TOO_LONG = "a line longer than 65536 bytes"
_MAX_HEADERS = 100
_MAX_KEEPALIVE_BODY = 64 * 1024  # a bigger health body is read by closing, not kept alive for
LISTEN_POLL_FIRST = 0.005  # after a refused probe of a starting slot, first connect attempt
LISTEN_POLL_MAX = 0.02  # ...then each wait x1.5 up to this: ~50 refused connects a second


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    reason: str = ""
    refused: bool = False  # the connection was refused: nothing listens on the port (yet)


@dataclass
class Thresholds:
    """Consecutive-result counting; ``feed`` returns the new health when it changes, else None."""

    healthy_threshold: int
    unhealthy_threshold: int
    healthy: bool = False
    ok_run: int = 0
    fail_run: int = 0

    def feed(self, ok: bool) -> bool | None:
        if ok:
            self.ok_run += 1
            self.fail_run = 0
            if not self.healthy and self.ok_run >= self.healthy_threshold:
                self.healthy = True
                return True
        else:
            self.fail_run += 1
            self.ok_run = 0
            if self.healthy and self.fail_run >= self.unhealthy_threshold:
                self.healthy = False
                return False
        return None


async def http_probe(port: int, path: str, timeout: float, host: str = PROBE_HOST) -> ProbeResult:
    """GET ``path``; 2xx and 3xx pass. The connection is closed after the status line."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: fleetwave-probe\r\n"
                "Connection: close\r\n\r\n".encode("latin-1")
            )
            await writer.drain()
            line = await reader.readline()
    except TimeoutError:
        return ProbeResult(False, f"http {path}: no answer within {timeout:g}s")
    except OSError as exc:
        return ProbeResult(False, f"http {path}: {_os_reason(exc)}")
    except ValueError:  # StreamReader.readline: a line past its limit
        return ProbeResult(False, f"http {path}: not an HTTP answer: {_TOO_LONG}")
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await bounded(writer.wait_closed(), 1.0)
    parts = line[:_MAX_STATUS_LINE].decode("latin-1", "replace").split()
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return ProbeResult(False, f"http {path}: not an HTTP answer: {line[:80]!r}")
    status = int(parts[1])
    if 200 <= status < 400:
        return ProbeResult(True)
    return ProbeResult(False, f"http {path}: status {status}")


class HttpProbeConnection:
    """A keep-alive HTTP/1.1 connection for repeated GETs of one health path; owned by a Prober."""

    def __init__(self, port: int, path: str, host: str = PROBE_HOST) -> None:
        self.port = port
        self.path = path
        self.host = host
        self.connects = 0  # how many TCP connections were opened (tests watch reuse with it)
        self._request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: fleetwave-probe\r\n\r\n"
        ).encode("latin-1")
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def probe(self, timeout: float) -> ProbeResult:
        """GET the path (2xx and 3xx pass), reusing the open connection when there is one."""
        reused = self._writer is not None
        try:
            async with asyncio.timeout(timeout):
                try:
                    return await self._exchange()
                except (OSError, asyncio.IncompleteReadError, AnswerClosed):
                    if not reused:
                        raise
                    await self.close()  # the server closed the idle connection: once more
                    return await self._exchange()
        except TimeoutError:
            await self.close()
            return ProbeResult(False, f"http {self.path}: no answer within {timeout:g}s")
        except OSError as exc:
            await self.close()
            return ProbeResult(False, f"http {self.path}: {_os_reason(exc)}",
                               refused=isinstance(exc, ConnectionRefusedError))
        except (asyncio.IncompleteReadError, AnswerClosed):
            await self.close()
            return ProbeResult(False, f"http {self.path}: connection closed before an answer")
        except AnswerMalformed as exc:
            await self.close()
            return ProbeResult(False, f"http {self.path}: not an HTTP answer: {exc}")
        except ValueError:  # StreamReader.readline: a line past its limit (not our error)
            await self.close()
            return ProbeResult(False, f"http {self.path}: not an HTTP answer: {_TOO_LONG}")
        except BaseException:
            await self.close()  # cancelled mid-answer: the connection is out of step
            raise

    async def open(self, timeout: float, sock: socket.socket | None = None) -> bool:
        """Open the connection the next probe will use, if none is open (on ``sock``, a
        connected socket, when given: it is then this connection's or closed); False if it
        cannot be (refused, no answer within ``timeout``). Never raises."""
        if self._writer is None:
            try:
                async with asyncio.timeout(timeout):
                    await self._connect(sock)
            except (OSError, TimeoutError):
                return False
        elif sock is not None:
            sock.close()
        return True

    async def _connect(self, sock: socket.socket | None = None) -> None:
        if sock is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        else:
            try:
                self._reader, self._writer = await asyncio.open_connection(sock=sock)
            except BaseException:
                sock.close()
                raise
        self.connects += 1

    async def _exchange(self) -> ProbeResult:
        if self._writer is None:
            await self._connect()
        reader, writer = self._reader, self._writer
        assert reader is not None and writer is not None
        writer.write(self._request)
        await writer.drain()
        line = await reader.readline()
        if not line:
            raise AnswerClosed
        parts = line[:_MAX_STATUS_LINE].decode("latin-1", "replace").split()
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise AnswerMalformed(repr(line[:80]))
        status = int(parts[1])
        keep = parts[0] == "HTTP/1.1"
        length: int | None = None
        for _ in range(_MAX_HEADERS):
            header = await reader.readline()
            if header in (b"\r\n", b"\n"):
                break
            if not header:
                raise AnswerClosed
            name, _, value = header.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "content-length" and value.isdigit():
                length = int(value)
            elif name == "connection" and "close" in value:
                keep = False
            elif name == "transfer-encoding":
                keep = False  # chunked bodies are not worth parsing for a status code
        else:
            raise AnswerMalformed(f"more than {_MAX_HEADERS} header lines")
        if keep and length is not None and length <= _MAX_KEEPALIVE_BODY:
            await reader.readexactly(length)  # leave the connection at the next answer's start
        else:
            await self.close()
        if 200 <= status < 400:
            return ProbeResult(True)
        return ProbeResult(False, f"http {self.path}: status {status}")

    async def close(self) -> None:
        """Close the connection (the next probe opens a new one); never raises."""
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await bounded(writer.wait_closed(), 1.0)


def connect_now(port: int, host: str = PROBE_HOST) -> socket.socket | bool:
    """One connect attempt to a loopback ``port`` that does not wait: False if it was refused
    (nothing listens), the connected socket (non-blocking) if it was accepted, True if the
    kernel has not answered yet (its loopback handshake deferred on a busy host) or failed
    otherwise: ask the usual way, which waits and names the error."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        err = sock.connect_ex((host, port))
        if err == errno.EINPROGRESS:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err == 0 and not _writable(sock):
                err = errno.EINPROGRESS  # not answered yet
        if err == 0:
            return sock
    except OSError:
        err = -1
    sock.close()
    return err != errno.ECONNREFUSED


def _writable(sock: socket.socket) -> bool:
    """Whether ``sock``'s connect is done, without waiting (poll: any fd number)."""
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    return bool(poller.poll(0))


async def tcp_probe(port: int, timeout: float, host: str = PROBE_HOST) -> ProbeResult:
    """A TCP connect that succeeds within ``timeout`` passes."""
    try:
        async with asyncio.timeout(timeout):
            _reader, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return ProbeResult(False, f"tcp {port}: no connection within {timeout:g}s")
    except OSError as exc:
        return ProbeResult(False, f"tcp {port}: {_os_reason(exc)}",
                           refused=isinstance(exc, ConnectionRefusedError))
    writer.close()
    with contextlib.suppress(Exception):
        await bounded(writer.wait_closed(), 1.0)
    return ProbeResult(True)


async def exec_probe(
    argv: list[str], cwd: Path, env: Mapping[str, str], timeout: float,
    run_as: RunAs | None = None,
) -> ProbeResult:
    """Run ``argv`` in the release dir (as ``run_as``, like the service); exit 0 passes; killed
    (and reaped) at ``timeout``. Whatever it left running in its process group is ended when it
    exits (``processes.end_leftovers``)."""
    try:
        proc = await spawn_owned(
            argv, cwd=cwd, env=dict(env), stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, **spawn_kwargs(run_as),
        )
    except OSError as exc:
        return ProbeResult(False, f"exec {argv[0]}: {_os_reason(exc)}")
    try:
        async with asyncio.timeout(timeout):
            code = await proc.wait()
    except TimeoutError:
        await kill_and_reap(proc)
        return ProbeResult(False, f"exec {argv[0]}: no exit within {timeout:g}s")
    except asyncio.CancelledError:
        await kill_and_reap(proc)
        raise
    await end_leftovers(proc.pid)  # what it started in the background (``cmd &``) ends with it
    return ProbeResult(code == 0, "" if code == 0 else f"exec {argv[0]}: exit status {code}")


async def spawn_owned(argv: list[str], **kw: Any) -> asyncio.subprocess.Process:
    """Start a short-lived child in its own session; if cancelled meanwhile, kill and reap it.

    (A cancel that lands while asyncio is still creating the process would otherwise leave a
    child nobody waits for.)
    """
    creating = asyncio.ensure_future(
        asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, start_new_session=True, **kw
        )
    )
    try:
        return await asyncio.shield(creating)
    except asyncio.CancelledError:
        _keep(asyncio.ensure_future(_reap_when_created(creating)))
        raise


async def _reap_when_created(creating: asyncio.Future[asyncio.subprocess.Process]) -> None:
    proc = await bounded(creating, 5.0)
    await kill_and_reap(proc)


def _keep(fut: asyncio.Future[Any]) -> None:
    """Hold a cleanup future until it is done (the loop keeps only weak references to tasks)."""
    _reaping.add(fut)
    fut.add_done_callback(_reaping.discard)
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())


_reaping: set[asyncio.Future[Any]] = set()


class Reapable(Protocol):
    """A child the agent waits for: asyncio's ``Process`` or a slot's ``child.Child``."""

    pid: int

    async def wait(self) -> int: ...


async def kill_and_reap(proc: Reapable, timeout: float = 5.0) -> None:
    """SIGKILL a child's session and wait for it; a second cancel does not stop the reaping.

    The wait runs shielded and is kept referenced until done, so the child is always reaped even
    if our caller is cancelled again meanwhile (as happens when a shutdown cancels a cleanup).
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, 9)
    waiting = asyncio.ensure_future(bounded(proc.wait(), timeout))
    _keep(waiting)
    await asyncio.shield(waiting)


async def probe_once(
    health: HealthConfig, port: int | None, cwd: Path, env: Mapping[str, str],
    run_as: RunAs | None = None,
) -> ProbeResult:
    """One probe as the manifest says; a manifest without probe passes once the process runs."""
    if health.http is not None and port is not None:
        return await http_probe(port, health.http, health.timeout)
    if health.tcp and port is not None:
        return await tcp_probe(port, health.timeout)
    if health.exec is not None:
        return await exec_probe(health.exec, cwd, env, health.timeout, run_as)
    return ProbeResult(True)


class Prober:
    """Probes one slot every ``interval`` (``start_interval`` until it is first healthy, and
    as soon as its port accepts a connection: see the module's docstring) and calls
    ``on_change(healthy, reason)`` on changes."""

    def __init__(
        self, health: HealthConfig, port: int | None, cwd: Path, env: Mapping[str, str],
        on_change: Callable[[bool, str], Awaitable[None]], *, run_as: RunAs | None = None,
        healthy: bool = False,
    ) -> None:
        self.health = health
        self.port = port
        self.cwd = cwd
        self.env = env
        self.run_as = run_as
        self.on_change = on_change
        # ``healthy``: the slot was healthy before this prober (an adopted slot, after the
        # agent's restart): it turns unhealthy after ``unhealthy_threshold`` failures, probed
        # every ``interval``, as if this prober had seen it pass.
        self.thresholds = Thresholds(health.healthy_threshold, health.unhealthy_threshold,
                                     healthy=healthy)
        self.last = ProbeResult(False, "not probed yet")
        self._stopped = False

    def stop(self) -> None:
        """End ``run`` at its next turn, whether or not a cancel reaches it: on Python 3.11 a
        cancel that lands as a probe's own timeout expires becomes that TimeoutError
        (``asyncio.timeout``, fixed in 3.12), the probe reports "no answer" and the loop would
        go on for ever, holding the slot's supervisor in its TaskGroup."""
        self._stopped = True

    async def run(self) -> None:
        """Probe until stopped or cancelled (an http probe's connection is closed then)."""
        http = (
            HttpProbeConnection(self.port, self.health.http)
            if self.health.http is not None and self.port is not None else None
        )
        starting = self.health.start_interval or self.health.interval
        started = self.thresholds.healthy  # healthy once: from then on every ``interval``
        early = False  # a probe ran as the port began to listen, off the grid, since the start
        try:
            while not self._stopped:
                if http is not None:
                    self.last = await http.probe(self.health.timeout)
                else:
                    self.last = await probe_once(self.health, self.port, self.cwd, self.env,
                                                 self.run_as)
                changed = self.thresholds.feed(self.last.ok)
                if changed:
                    started = True
                if changed is not None:
                    await self.on_change(changed, self.last.reason)
                if self.last.refused and not started:
                    early = await self._until_listening(http, starting)
                    continue
                period = self.health.interval if started else starting
                if early and not started:
                    # Off the grid since an early probe, until first healthy: each probe a whole
                    # period after the last, never the grid's next point (which may be a few ms
                    # away): the passes the threshold counts come a period apart (a review found
                    # a 503, a pass a period later and one 16 ms after that taken as healthy).
                    await sleep_for(period)
                else:
                    early = False
                    # On the shared grid (agent.cadence): probes of every slot and the agent's
                    # other timers fall due together instead of each waking the agent alone.
                    await sleep_to_tick(period)
        finally:
            if http is not None:
                await http.close()

    async def _until_listening(self, http: HttpProbeConnection | None, period: float) -> bool:
        """Return True once the port accepts a connection (kept open for the http probe), or
        False at the next multiple of ``period``, whichever comes first."""
        loop = asyncio.get_running_loop()
        turn = next_tick(loop.time(), period)
        polls = listen_polls()
        while not self._stopped and (left := turn - loop.time()) > 0:
            await asyncio.sleep(min(next(polls), left))
            if loop.time() < turn and await self._listening(http, turn - loop.time()):
                return True
        return False

    async def _listening(self, http: HttpProbeConnection | None, left: float) -> bool:
        assert self.port is not None  # only a port's probe is refused
        now = connect_now(self.port)
        if now is False:
            return False
        timeout = max(0.001, min(self.health.timeout, left))
        if http is not None:
            return await http.open(timeout, now if isinstance(now, socket.socket) else None)
        if isinstance(now, socket.socket):
            now.close()  # accepted: the tcp probe's pass
            return True
        return (await tcp_probe(self.port, timeout)).ok


async def sleep_for(seconds: float) -> None:
    """``asyncio.sleep``, named for the prober's one wait off the grid (tests replace it)."""
    await asyncio.sleep(seconds)


def listen_polls() -> Iterator[float]:
    """The waits between connect attempts to a starting slot's port: 5 ms, then x1.5 each time
    up to ``LISTEN_POLL_MAX``."""
    wait = LISTEN_POLL_FIRST
    while True:
        yield wait
        wait = min(wait * 1.5, LISTEN_POLL_MAX)


def _os_reason(exc: OSError) -> str:
    """The OS's words for the error (asyncio wraps refused connects in its own text)."""
    return os.strerror(exc.errno) if exc.errno else (str(exc) or type(exc).__name__)
