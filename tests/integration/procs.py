"""Helpers for integration tests that run real fleetwave processes.

- ``spawn_agent`` / ``spawn_coordinator`` start ``python -m agent.main`` / ``python -m
  coordinator.daemon`` as children (``coordinator.dev.devfleet.Child``: SIGTERM, then SIGKILL,
  always reaped); ``reaping(...)`` guarantees it even when a test fails half-way.
- ``fleetwave(...)`` runs the CLI in a subprocess and returns (exit code, stdout, stderr).
- ``wait_until(...)`` polls a condition until a deadline; it never sleeps to hide a race, and on
  timeout says what it last saw.
- ``shipped_auth_conf(...)`` is deploy/nats/auth.conf with a test's ports and paths,
  ``shipped_cluster_conf(...)`` cluster-N.conf with a test's routes too; ``with_auth_dir``
  points any shipped config's TLS and users at a test's auth directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psutil

from coordinator.auth.enroll import CA, META, SERVER, SERVER_KEY, USERS, AuthDir
from coordinator.dev.cluster import ClusterSpec
from coordinator.dev.devfleet import OPERATOR, Child, python_module
from coordinator.dev.examples import assembled
from protocol import subjects
from protocol.bus import Bus, Entry

T = TypeVar("T")

DEPLOY_NATS = Path(__file__).resolve().parents[2] / "deploy" / "nats"
hello_bundle = assembled  # the hello example's bundle of a version, assembled once a process
HEARTBEAT = 0.3  # seconds; short so that offline detection takes about a second
CLI_TIMEOUT = 20.0


def spawn_agent(
    nats_url: str,
    node: str,
    base: Path,
    *,
    labels: dict[str, str] | None = None,
    fleet: str = "default",
    interval: float = HEARTBEAT,
    extra: list[str] | None = None,
    python: str = sys.executable,
) -> Child:
    """An agent child for ``node`` with its data dir and log under ``base`` (not started)."""
    args = [
        "--node-id", node, "--nats", nats_url, "--fleet", fleet,
        "--data-dir", str(base / node), "--heartbeat-interval", str(interval),
    ]
    for k, v in (labels or {}).items():
        args += ["--label", f"{k}={v}"]
    return Child(node, [python, *python_module("agent.main", *args, *(extra or []))[1:]],
                 base / "logs" / f"{node}.log")


def spawn_coordinator(nats_url: str, base: Path, *, fleet: str = "default",
                      extra: list[str] | None = None) -> Child:
    """A coordinator child with its log under ``base`` (not started); ``extra``: more global
    options (``--creds``, ``--tls-ca``)."""
    return Child(
        "coordinator",
        python_module("coordinator.daemon", "--nats", nats_url, "--fleet", fleet,
                      *(extra or [])),
        base / "logs" / "coordinator.log",
    )


@contextlib.asynccontextmanager
async def reaping(*children: Child) -> AsyncIterator[tuple[Child, ...]]:
    """Start ``children``; on exit stop and reap every one of them, whatever happened."""
    try:
        for c in children:
            await c.start()
        yield children
    finally:
        await asyncio.gather(*(c.stop(timeout=5.0) for c in children), return_exceptions=True)


async def fleetwave(
    *args: str, nats_url: str | None = None, timeout: float = CLI_TIMEOUT
) -> tuple[int, str, str]:
    """Run ``fleetwave ARGS`` in a subprocess; return (exit code, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETWAVE_")}
    if nats_url is not None:
        env["FLEETWAVE_NATS"] = nats_url
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from coordinator.console import run; run()",
        *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def run_output(*argv: str, timeout: float = 30.0) -> tuple[int, str]:
    """Run ``argv`` (any program) to its end; return (exit code, stdout and stderr merged)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def nodes_json(
    nats_url: str, *args: str, client: Sequence[str] = (),
) -> dict[str, dict[str, Any]]:
    """``fleetwave nodes -o json`` as {node id: row} (``client``: global options such as
    ``--creds``); fails the test on a CLI error."""
    code, out, err = await fleetwave(*client, "nodes", "-o", "json", *args, nats_url=nats_url)
    assert code == 0, f"fleetwave nodes failed ({code}): {err}"
    return {row["id"]: row for row in json.loads(out)}


async def wait_until(
    probe: Callable[[], Awaitable[T]],
    ok: Callable[[T], bool],
    *,
    timeout: float,
    what: str,
    interval: float = 0.1,
) -> T:
    """Call ``probe`` until ``ok(result)``; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = "nothing yet"
    while True:
        try:
            last = await probe()
            if ok(last):
                return last
        except (AssertionError, OSError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last: {last}")
        await asyncio.sleep(interval)


def ended(proc: subprocess.Popen[bytes]) -> None:
    """A test's child process killed if it still runs, reaped, its stdout pipe closed."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


async def execed(pid: int) -> None:
    """Wait until process ``pid`` is done with its exec. Popen (and asyncio's subprocess) return
    once the exec has begun, and until the kernel has laid out the new program's arguments and
    environment, /proc reads them empty: a test that looks at them at once (adoption, the orphan
    search, a router's command line) flaked on it. The environment is laid out last (after the
    arguments), so it is what is waited for: the process must have one."""

    async def environment() -> dict[str, str]:
        return dict(psutil.Process(pid).environ())

    await wait_until(environment, bool, timeout=10, what=f"pid {pid}'s exec", interval=0.001)


def online(rows: dict[str, dict[str, Any]], ids: list[str], state: bool = True) -> bool:
    return all(i in rows and rows[i]["online"] is state for i in ids)


def shipped_auth_conf(*, host: str, port: int, monitor_port: int, store_dir: Path,
                      server_name: str, cluster: ClusterSpec | None = None,
                      auth: Path | None = None, max_payload: str = "8MB",
                      sync_always: bool = True, max_memory: str = "1GB") -> str:
    """deploy/nats/auth.conf as shipped, with only a test's addresses and paths put in: the text
    of a config file to be written into ``store_dir`` (its ``include`` of ``auth``'s users.conf
    is relative to it). The signature of ``coordinator.dev.broker.render_config``, for which a
    test may substitute it (``monkeypatch``) to run a dev fleet's broker on the shipped file."""
    assert auth is not None and cluster is None
    assert sync_always, "the shipped configs fsync every write (sync_interval: always)"
    text = _put_in(DEPLOY_NATS / "auth.conf", [
        *_addresses(host, port, monitor_port, store_dir, max_payload, max_memory),
        ('server_name: "fleetwave-1"', f'server_name: "{server_name}"')])
    return with_auth_dir(text, auth, store_dir)


def shipped_cluster_conf(*, host: str, port: int, monitor_port: int, store_dir: Path,
                         server_name: str, cluster: ClusterSpec | None = None,
                         auth: Path | None = None, max_payload: str = "8MB",
                         sync_always: bool = True, max_memory: str = "1GB") -> str:
    """deploy/nats/cluster-N.conf as shipped for server ``fleetwave-N`` of a 3-server cluster
    (``coordinator.dev.cluster.BrokerCluster`` names them so), with only a test's addresses,
    paths and its three routes put in; as ``shipped_auth_conf``, a stand-in for
    ``render_config``."""
    assert auth is not None and cluster is not None and len(cluster.routes) == 3, cluster
    assert sync_always, "the shipped configs fsync every write (sync_interval: always)"
    n = server_name.removeprefix("fleetwave-")
    assert n in ("1", "2", "3") and cluster.cluster_name == "fleetwave", (server_name, cluster)
    text = _put_in(DEPLOY_NATS / f"cluster-{n}.conf", [
        *_addresses(host, port, monitor_port, store_dir, max_payload, max_memory),
        ('listen: "0.0.0.0:6222"', f'listen: "{cluster.listen}"'),
        *((f'"nats-route://nats-{j}.fleet.internal:6222"', f'"{route}"')
          for j, route in enumerate(cluster.routes, 1))])
    return with_auth_dir(text, auth, store_dir)


def _addresses(host: str, port: int, monitor_port: int, store_dir: Path,
               max_payload: str, max_memory: str) -> list[tuple[str, str]]:
    """What a shipped server config's client, monitoring, JetStream, payload and memory lines
    become (the dev broker's ``max_payload`` and ``max_memory`` are the shipped 8MB and 1GB
    unless a test asks for others)."""
    return [('host: "0.0.0.0"', f'host: "{host}"'), ("port: 4222", f"port: {port}"),
            ("max_payload: 8MB", f"max_payload: {max_payload}"),
            ("max_memory_store: 1GB", f"max_memory_store: {max_memory}"),
            ('http: "127.0.0.1:8222"', f'http: "127.0.0.1:{monitor_port}"'),
            ('store_dir: "/var/lib/fleetwave/jetstream"', f'store_dir: "{store_dir}"')]


def _put_in(conf: Path, changes: list[tuple[str, str]]) -> str:
    """``conf``'s text with each (old, new) replaced; each old must be there exactly once, so
    that a test never runs a file that has drifted from what it means to check."""
    text = conf.read_text()
    for old, new in changes:
        assert text.count(old) == 1, f"{conf.name} no longer has {old!r} once"
        text = text.replace(old, new)
    return text


def with_auth_dir(text: str, auth: Path, conf_dir: Path) -> str:
    """A shipped config's TLS files (the server's certificate and key, and the CA where routes
    check their peers) and users include (``/etc/fleetwave/auth``) pointed at the auth
    directory ``auth``, for a config file written into ``conf_dir``."""
    includes = re.findall(r'^include "([^"]+)"$', text, re.M)
    assert len(includes) == 1 and includes[0].endswith(f"auth/{USERS}"), includes
    users = os.path.relpath(auth.absolute() / USERS, conf_dir.absolute())
    text = text.replace(f'include "{includes[0]}"', f'include "{users}"')
    files = set(re.findall(r'"/etc/fleetwave/auth/([^"]+)"', text))
    assert {SERVER, SERVER_KEY} <= files <= {SERVER, SERVER_KEY, CA}, files
    assert text.count("/etc/fleetwave/auth/") == text.count('"/etc/fleetwave/auth/'), \
        "a shipped conf names /etc/fleetwave/auth only as its TLS files"
    return text.replace("/etc/fleetwave/auth/", f"{auth.absolute()}/")


async def read_text(path: Path) -> str:
    """A log file's text so far ("" before it exists), read off the event loop."""
    def read() -> str:
        try:
            return path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    return await asyncio.to_thread(read)



async def desired_states(bus: Bus, fleet: str) -> list[Entry]:
    """The fleet's desired states, without fleetwave's own keys: the leader's fence marker is
    rewritten whenever a coordinator (re)takes its lease, which a loaded machine may make it do
    mid-test, and that changes no node's state."""
    entries = await bus.kv_entries(subjects.desired_bucket(fleet))
    return [e for e in entries if not e.key.startswith("_")]


def unmigrated_auth(fleet_dir: Path, fleet: str = "default") -> Path:
    """The auth directory a --secure DevFleet in ``fleet_dir`` takes, made as releases before
    session 23 made it: one account for the whole fleet (no "layout" in auth.json), its
    users.conf so (``fleetwave auth migrate`` moves such a fleet to its own accounts)."""
    d = AuthDir(fleet_dir / "auth")
    d.init(fleet, (), OPERATOR)
    meta = d.path / META
    data = json.loads(meta.read_text())
    del data["layout"]
    meta.write_text(json.dumps(data, indent=2) + "\n")
    d.prune()
    assert "authorization {" in (d.path / USERS).read_text()
    return d.path
