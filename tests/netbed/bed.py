"""A test bed of hosts on a real (virtual) network: one Linux network namespace per host.

Theory of operation: ``NetBed(hosts=[...])`` is a context manager. Entering creates, for each
host, a network namespace ``fwbed-<tag>-<host>`` with a veth pair whose inner end is ``eth0`` and
whose outer end is enslaved to one bridge in the root namespace; host ``i`` (0-based, in the
order given) gets the address ``<subnet>.<i+1>/24`` on its ``eth0``. Leaving (also on an
exception or KeyboardInterrupt) kills every process left in each namespace, reaps the ones this
bed started, and deletes the veths, the namespaces and the bridge; it then checks, by bounded
polling, that none of them is left.

Only 127.0.0.0/8 addresses are ever used (the workplace flags traffic to other ranges). Loopback
addresses are not routed between namespaces by default, so each namespace sets
``route_localnet`` and drops the kernel's ``local 127.0.0.0/8`` route (``127.0.0.1`` stays
local): then ``127.77.0.2`` is reached over ``eth0`` and the bridge like any address. The root
namespace is never changed: there all of 127/8 is still local, so the root cannot reach the hosts
directly. The test process reaches them with sockets *made inside* a host's namespace
(``open_connection``/``connector``: a thread that entered the namespace with ``setns`` makes the
socket; the event loop uses it), and ``Portal`` forwards a local root port into a host, for
clients that connect by URL (nats-py, the CLI in a subprocess).

Faults are netfilter rules in the hosts' namespaces (this kernel has no ``sch_netem`` and no tc
classifiers, see the issue 13 brief):

- ``partition(a, b)`` drops everything between ``a`` and ``b`` (``b`` omitted: between ``a``
  and every host); ``heal(a, b)`` removes exactly those rules. Drops are made where a packet
  arrives (a packet dropped on its way out makes the sender's syscall fail with EPERM, which no
  real network does), so connections hang and time out as across a cut cable.
- ``impair(host, delay=, loss=, peer=)`` delays (NFQUEUE and ``tests/netbed/delayer.py``, a pure
  Python userspace delay line run in the host) and drops at random (``-m statistic``) each packet
  that leaves or enters the host (to or from ``peer`` only, if given): the added round trip is
  ``2 * delay``, and a packet is lost with probability ``loss`` in each direction.
- processes: ``popen``/``argv`` run a command in a host (``ip netns exec`` execs it, so the pid
  is the command's own and SIGSTOP/SIGCONT/SIGKILL reach it directly); ``pids(host)`` lists every
  process in a host, started by us or not (slots and routers an agent started).

Names: ``<tag>`` is ``<pid hex>x<seq hex>``, unique per bed in a run, so that two test runs on one
machine never share a name, and a bed can tell its own leftovers from a previous, killed run (a
tag whose pid is dead, or this process's tag that no live bed holds): those are swept at start.
Interface names fit Linux's 15 characters: bridge ``fwb<tag>``, outer veth ``fwv<tag>h<i hex>``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import psutil

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Connector = Callable[[str, int], Awaitable[Connection]]

NETNS_PREFIX = "fwbed-"
DELAYER = Path(__file__).with_name("delayer.py")
CLONE_NEWNET = 0x40000000
NFQUEUE_NUM = 0
TEARDOWN_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
_HOST_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
_TAG = re.compile(r"^([0-9a-f]+)x([0-9a-f]+)$")


class NetBedError(RuntimeError):
    """The bed could not be built or torn down (the message says which command and why)."""


def _which(name: str) -> str:
    """``name`` on PATH, or in /usr/sbin or /sbin (where ip and iptables live, and which a
    non-login root shell's PATH may lack)."""
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin",
                                                    "/sbin"])) or name


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 15.0) -> str:
    """Run a setup command; its stdout, or NetBedError naming it and its stderr."""
    done = subprocess.run([_which(argv[0]), *argv[1:]], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    if check and done.returncode != 0:
        raise NetBedError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _setns(path: str) -> None:
    """Move the calling *thread* into the network namespace at ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if hasattr(os, "setns"):  # Python 3.12+
            os.setns(fd, CLONE_NEWNET)
            return
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def _stale(tag: str, live: set[str]) -> bool:
    m = _TAG.match(tag)
    if m is None:
        return False
    pid = int(m.group(1), 16)
    if pid == os.getpid():
        return tag not in live
    return not _alive(pid)


@dataclass(frozen=True)
class Impairment:
    """What ``NetBed.impair`` set on a host: seconds of delay and share of packets lost, each
    way, on the traffic with ``peer`` (None: with every host)."""

    delay: float = 0.0
    loss: float = 0.0
    peer: str | None = None


class NetBed:
    """Hosts in network namespaces on one bridge; see the module docstring."""

    _seq = itertools.count(1)
    _live: set[str] = set()  # tags of the beds of this process that are up
    _lock = threading.Lock()

    def __init__(self, hosts: Sequence[str], *, subnet: str = "127.77.0") -> None:
        if not hosts or len(set(hosts)) != len(hosts) or len(hosts) > 250:
            raise ValueError(f"hosts must be 1 to 250 distinct names: {list(hosts)}")
        for h in hosts:
            if not _HOST_NAME.match(h):
                raise ValueError(f"host name {h!r}: use lower-case letters, digits and '-'")
        if not re.fullmatch(r"127\.\d{1,3}\.\d{1,3}", subnet):
            raise ValueError(f"subnet {subnet!r}: only 127.x.y (a /24 of 127/8) is allowed")
        self.hosts = list(hosts)
        self.subnet = subnet
        self.tag = f"{os.getpid():x}x{next(self._seq) % 256:02x}"
        self.bridge = f"fwb{self.tag}"
        self._iptables = "iptables"
        self._procs: list[subprocess.Popen[bytes]] = []
        self._executors: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
        self._rules: dict[tuple[str, ...], list[tuple[str, list[str]]]] = {}
        self._impairments: dict[str, Impairment] = {}
        self._delayers: dict[str, subprocess.Popen[bytes] | None] = {}
        self._up = False

    # -- names ------------------------------------------------------------------------------------

    def ns(self, host: str) -> str:
        """The network namespace of ``host`` (for ``ip netns exec``)."""
        self._check(host)
        return f"{NETNS_PREFIX}{self.tag}-{host}"

    def addr(self, host: str) -> str:
        """The address of ``host`` on the bed's network."""
        self._check(host)
        return f"{self.subnet}.{self.hosts.index(host) + 1}"

    def _veth(self, host: str) -> str:
        return f"fwv{self.tag}h{self.hosts.index(host):02x}"

    def _check(self, host: str) -> None:
        if host not in self.hosts:
            raise KeyError(f"no host {host!r} in this bed: {self.hosts}")

    # -- lifecycle --------------------------------------------------------------------------------

    def __enter__(self) -> NetBed:
        try:
            self.setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown()

    def setup(self) -> None:
        """Sweep stale beds of this prefix, then build the bridge and every host."""
        with self._lock:
            self._live.add(self.tag)
        self._up = True
        sweep()
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        _no_ipv6(self.bridge)
        _run(["ip", "link", "set", self.bridge, "up"])
        for host in self.hosts:
            self._add_host(host)
        self._iptables = self._pick_iptables(self.hosts[0])
        for host in self.hosts:
            self._add_chains(host)

    def _add_host(self, host: str) -> None:
        ns, veth = self.ns(host), self._veth(host)
        _run(["ip", "netns", "add", ns])
        # No IPv6 at all: an interface would otherwise get a link-local fe80:: address and talk
        # (router solicitations, DAD); the bed uses 127/8 addresses only.
        sysctl = ["ip", "netns", "exec", ns, _which("sysctl"), "-qw"]
        _run([*sysctl, "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"])
        _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
        _no_ipv6(veth)
        _run(["ip", "link", "set", veth, "master", self.bridge, "up"])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        _run([*sysctl, "net.ipv4.conf.all.route_localnet=1", "net.ipv4.conf.eth0.route_localnet=1"])
        # Without this, all of 127/8 is local in the namespace and never leaves by eth0.
        _run(["ip", "-n", ns, "route", "del", "local", "127.0.0.0/8", "dev", "lo", "table",
              "local"])
        _run(["ip", "-n", ns, "addr", "add", f"{self.addr(host)}/24", "dev", "eth0"])

    def _pick_iptables(self, host: str) -> str:
        """``iptables`` (nft backend) where it works here, else ``iptables-legacy``."""
        tried = []
        for binary in map(_which, ("iptables", "iptables-legacy")):
            try:
                _run(["ip", "netns", "exec", self.ns(host), binary, "-w", "-S"])
                return binary
            except (NetBedError, FileNotFoundError) as exc:
                tried.append(f"{binary}: {exc}")
        raise NetBedError("no working iptables in a network namespace ("
                          + "; ".join(tried) + "); install it: apt-get install -y iptables "
                          "(.ci/run does)")

    def _ipt(self, host: str, *args: str, check: bool = True) -> str:
        return _run(["ip", "netns", "exec", self.ns(host), self._iptables, "-w", *args],
                    check=check)

    def _add_chains(self, host: str) -> None:
        for chain, hook, dev in (("FWPART", "INPUT", "-i"), ("FWIMP", "INPUT", "-i"),
                                 ("FWDELAYIN", "INPUT", "-i"), ("FWDELAYOUT", "OUTPUT", "-o")):
            self._ipt(host, "-N", chain)
            self._ipt(host, "-A", hook, dev, "eth0", "-j", chain)

    def teardown(self) -> None:
        """Kill every process in the hosts, reap ours, delete everything; check nothing is left."""
        if not self._up:
            return
        errors: list[str] = []
        try:
            self._kill_all()
        except Exception as exc:  # teardown goes on whatever failed; reported at the end
            errors.append(f"killing processes: {exc}")
        for ex in self._executors.values():
            ex.shutdown(wait=True, cancel_futures=True)
        self._executors.clear()
        for host in self.hosts:
            _run(["ip", "link", "del", self._veth(host)], check=False)
            _run(["ip", "netns", "del", self.ns(host)], check=False)
        _run(["ip", "link", "del", self.bridge], check=False)
        left = _wait_gone(self._names)
        with self._lock:
            self._live.discard(self.tag)
        self._up = False
        if left:
            errors.append(f"still there after {TEARDOWN_TIMEOUT:g}s: {left}")
        if errors:
            raise NetBedError("; ".join(errors))

    def _names(self) -> list[str]:
        """What of this bed still exists: namespaces and links."""
        mine = f"{NETNS_PREFIX}{self.tag}-"
        found = [n for n in _netns_names() if n.startswith(mine)]
        found += [n for n in _link_names() if n == self.bridge or n.startswith(f"fwv{self.tag}h")]
        return found

    def _kill_all(self) -> None:
        for host in self.hosts:
            self.signal_all(host, signal.SIGKILL)
        for p in self._procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
        for p in self._procs:
            p.wait(timeout=TEARDOWN_TIMEOUT)
            for pipe in (p.stdout, p.stderr):
                if pipe is not None:
                    pipe.close()
        self._procs.clear()
        self._delayers.clear()
        for host in self.hosts:
            deadline = time.monotonic() + TEARDOWN_TIMEOUT
            while (left := self.pids(host)) and time.monotonic() < deadline:
                self.signal_all(host, signal.SIGKILL)
                time.sleep(0.05)
            if left:
                raise NetBedError(f"processes {left} in host {host} survived SIGKILL")

    # -- processes --------------------------------------------------------------------------------

    def argv(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run in ``host`` (``ip netns exec`` execs it: same pid, signals reach it)."""
        return [_which("ip"), "netns", "exec", self.ns(host), *argv]

    def popen(self, host: str, argv: Sequence[str], *, stdout: int | None = None,
              stderr: int | None = None, env: dict[str, str] | None = None,
              cwd: Path | str | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` in ``host``; it is killed and reaped at teardown if still running."""
        proc = subprocess.Popen(self.argv(host, argv), stdin=subprocess.DEVNULL, stdout=stdout,
                                stderr=stderr, env=env, cwd=cwd)
        self._procs.append(proc)
        return proc

    def run(self, host: str, argv: Sequence[str], *, check: bool = True) -> str:
        """Run a short command in ``host``; its stdout."""
        return _run(self.argv(host, argv), check=check)

    def pids(self, host: str) -> list[int]:
        """Every live process in ``host``'s namespace, ours or not (never this process)."""
        out = _run(["ip", "netns", "pids", self.ns(host)], check=False)
        me = os.getpid()
        return [int(p) for p in out.split() if p.isdigit() and int(p) != me
                and _alive(int(p))]

    def signal_all(self, host: str, signum: int) -> None:
        for pid in self.pids(host):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    # -- faults -----------------------------------------------------------------------------------

    # Drops are made where a packet *arrives* (INPUT of the receiving host): a packet dropped on
    # its way out (OUTPUT) makes the sender's syscall fail with EPERM, which no real network
    # does. Delay is made on both sides of the impaired host (NFQUEUE returns no error).

    def _apply(self, key: tuple[str, ...], rules: list[tuple[str, list[str]]]) -> None:
        self._rules[key] = rules
        for host, rule in rules:
            self._ipt(host, "-A", *rule)

    def _remove(self, key: tuple[str, ...]) -> None:
        for host, rule in self._rules.pop(key, []):
            self._ipt(host, "-D", *rule)

    def _arrivals(self, src: str, dst: str | None) -> list[str]:
        """The hosts where packets from ``src`` arrive (to ``dst`` only, if given)."""
        return [dst] if dst is not None else [h for h in self.hosts if h != src]

    def partition(self, a: str, b: str | None = None) -> None:
        """Drop every packet between ``a`` and ``b`` (``b`` None: between ``a`` and anyone)."""
        self._check(a)
        key = ("partition", a, b or "*")
        if key in self._rules:
            return
        rules = [(a, ["FWPART", *([] if b is None else ["-s", self.addr(b)]), "-j", "DROP"])]
        rules += [(h, ["FWPART", "-s", self.addr(a), "-j", "DROP"]) for h in self._arrivals(a, b)]
        self._apply(key, rules)

    def heal(self, a: str, b: str | None = None) -> None:
        """Undo ``partition(a, b)``."""
        key = ("partition", a, b or "*")
        if key not in self._rules:
            raise KeyError(f"no partition {a}|{b or '*'} to heal; there are "
                           f"{sorted(k[1:] for k in self._rules if k[0] == 'partition')}")
        self._remove(key)

    def impair(self, host: str, *, delay: float = 0.0, loss: float = 0.0,
               peer: str | None = None) -> None:
        """Delay by ``delay`` s and drop with probability ``loss`` every packet leaving or
        entering ``host`` (to or from ``peer`` only, if given). Replaces an earlier impairment."""
        if not (0.0 <= loss < 1.0 and 0.0 <= delay <= 10.0):
            raise ValueError(f"impair: loss must be in [0, 1) and delay in [0, 10] s; "
                             f"got loss={loss}, delay={delay}")
        self.unimpair(host)
        if peer is not None:
            self._check(peer)
        delayer = None
        if delay > 0:
            delayer = self.popen(host, [sys.executable, str(DELAYER), "--queue",
                                        str(NFQUEUE_NUM), "--delay", str(delay)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            assert delayer.stdout is not None
            line = delayer.stdout.readline().decode().strip()  # "ready" once bound
            if line != "ready":
                delayer.kill()
                delayer.wait()
                raise NetBedError(f"the delayer in {host} did not start: {line!r}")
        self._delayers[host] = delayer
        self._impairments[host] = Impairment(delay, loss, peer)
        rules: list[tuple[str, list[str]]] = []
        lose = ["-m", "statistic", "--mode", "random", "--probability", f"{loss:.6f}", "-j",
                "DROP"]
        if loss > 0:
            rules.append((host, ["FWIMP", *([] if peer is None else ["-s", self.addr(peer)]),
                                 *lose]))
            rules += [(h, ["FWIMP", "-s", self.addr(host), *lose])
                      for h in self._arrivals(host, peer)]
        if delay > 0:
            for direction in ("-s", "-d"):
                match = [] if peer is None else [direction, self.addr(peer)]
                chain = "FWDELAYIN" if direction == "-s" else "FWDELAYOUT"
                rules.append((host, [chain, *match, "-j", "NFQUEUE", "--queue-num",
                                     str(NFQUEUE_NUM), "--queue-bypass"]))
        self._apply(("impair", host), rules)

    def unimpair(self, host: str) -> None:
        """Remove ``host``'s delay and loss (its queued packets are let go at once)."""
        self._check(host)
        self._remove(("impair", host))
        self._impairments.pop(host, None)
        delayer = self._delayers.pop(host, None)
        if delayer is not None:
            delayer.terminate()
            try:
                delayer.wait(timeout=5)
            except subprocess.TimeoutExpired:
                delayer.kill()
                delayer.wait()
            if delayer.stdout is not None:
                delayer.stdout.close()

    def impairment(self, host: str) -> Impairment | None:
        """What ``impair`` set on ``host`` (None: nothing)."""
        return self._impairments.get(host)

    # -- reaching hosts from this process ---------------------------------------------------------

    def _executor(self, host: str) -> concurrent.futures.ThreadPoolExecutor:
        ex = self._executors.get(host)
        if ex is None:
            path = f"/var/run/netns/{self.ns(host)}"
            ex = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"netns-{host}", initializer=_setns,
                initargs=(path,))
            self._executors[host] = ex
        return ex

    def socket(self, host: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A new IPv4 socket that lives in ``host``'s namespace (blocking call)."""
        return self._executor(host).submit(socket.socket, socket.AF_INET, kind).result()

    async def open_connection(self, host: str, addr: str, port: int,
                              timeout: float = CONNECT_TIMEOUT) -> Connection:
        """A TCP connection from ``host`` to ``addr:port`` (through the bed's network)."""
        loop = asyncio.get_running_loop()
        made = loop.run_in_executor(self._executor(host), socket.socket, socket.AF_INET,
                                    socket.SOCK_STREAM)
        try:
            sock = await asyncio.shield(made)
        except asyncio.CancelledError:
            made.add_done_callback(_close_made)  # the thread still makes it: close it then
            raise
        try:
            sock.setblocking(False)
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, (addr, port))
            return await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise

    def connector(self, host: str) -> Connector:
        """``open_connection`` from ``host``, as ``coordinator.dev.traffic`` takes it."""
        async def connect(addr: str, port: int) -> Connection:
            return await self.open_connection(host, addr, port)

        return connect


def _no_ipv6(link: str) -> None:
    """Disable IPv6 on a root-namespace link (before it is up: no fe80:: address, no traffic)."""
    path = Path("/proc/sys/net/ipv6/conf") / link / "disable_ipv6"
    if path.exists():  # absent when the kernel has no IPv6
        path.write_text("1\n")


def _close_made(made: asyncio.Future[socket.socket]) -> None:
    if not made.cancelled() and made.exception() is None:
        made.result().close()


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not: it only waits to be reaped)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _netns_names() -> list[str]:
    return [line.split()[0] for line in _run(["ip", "netns", "list"], check=False).splitlines()
            if line.strip()]


def _link_names() -> list[str]:
    out = _run(["ip", "-o", "link", "show"], check=False)
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def _wait_gone(names: Callable[[], list[str]]) -> list[str]:
    """Poll until ``names()`` is empty (namespaces die asynchronously); what is left."""
    deadline = time.monotonic() + TEARDOWN_TIMEOUT
    while (left := names()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def sweep() -> list[str]:
    """Delete what dead beds left: namespaces, veths and bridges whose tag belongs to a process
    that is gone (or to this process, when no live bed of it holds the tag). Their processes
    are killed first. Returns the names removed."""
    with NetBed._lock:
        live = set(NetBed._live)
    removed = []
    for name in _netns_names():
        m = re.match(rf"^{NETNS_PREFIX}([0-9a-fx]+)-", name)
        if m and _stale(m.group(1), live):
            for pid in _run(["ip", "netns", "pids", name], check=False).split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _run(["ip", "netns", "del", name], check=False)
            removed.append(name)
    for name in _link_names():
        m = re.match(r"^fw[bv]([0-9a-f]+x[0-9a-f]{2})", name)
        if m and _stale(m.group(1), live):
            _run(["ip", "link", "del", name], check=False)
            removed.append(name)
    return removed


@contextlib.contextmanager
def netbed(hosts: Sequence[str], **kwargs: str) -> Iterator[NetBed]:
    """``with netbed([...]) as bed:`` — a NetBed, torn down whatever happens."""
    bed = NetBed(hosts, **kwargs)
    with bed:
        yield bed
