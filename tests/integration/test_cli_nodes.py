"""`fleetwave nodes`, `fleetwave-agent` and `fleetwave dev up` as a user runs them: subprocesses."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import psutil
import pytest

from coordinator.auth.enroll import AuthDir
from coordinator.dev.broker import Broker, find_nats_server, free_port
from coordinator.dev.devfleet import Child, python_module
from tests.integration.procs import (
    DEPLOY_NATS,
    fleetwave,
    read_text,
    wait_until,
    with_auth_dir,
)

# `dev up` puts its agents on the dev fleet's default subnet (they serve nothing here).
pytestmark = pytest.mark.holds("subnet 127.0.1")


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    return lines[0]


async def test_nodes_without_nats_says_so_in_one_line() -> None:
    """No NATS at the URL: one line naming the URL and how to start a broker, exit 1."""
    url = f"nats://127.0.0.1:{free_port()}"
    code, out, err = await fleetwave("nodes", nats_url=url)
    line = one_line(err)
    assert code == 1 and out == ""
    assert url in line and "fleetwave broker" in line and "fleetwave dev up" in line


async def test_nodes_never_prints_the_password_of_its_url() -> None:
    """A URL with credentials (one server or several) is shown with its secrets as ***."""
    a, b = free_port(), free_port()
    url = f"nats://operator:s3cret@127.0.0.1:{a},nats://t0ken@127.0.0.1:{b}"
    code, _, err = await fleetwave("nodes", nats_url=url)
    line = one_line(err)
    assert code == 1 and "s3cret" not in line and "t0ken" not in line
    assert f"nats://operator:***@127.0.0.1:{a}" in line and f"nats://***@127.0.0.1:{b}" in line


async def test_nodes_without_coordinator_says_so_in_one_line(broker: Broker) -> None:
    """NATS up but no coordinator: one line saying none answers and how to start one, exit 1."""
    code, out, err = await fleetwave("nodes", "-o", "json", nats_url=broker.url)
    line = one_line(err)
    assert code == 1 and out == ""
    assert "no coordinator answers" in line and "fleetwave coordinator" in line


@pytest.mark.parametrize("bad", ["zone", "zone=a b", "=a", "zone=a,zone=b"])
async def test_nodes_with_a_bad_selector_is_a_usage_error(bad: str) -> None:
    """A malformed --selector is refused before any connection, in one line, exit 2."""
    code, out, err = await fleetwave("nodes", "--selector", bad, nats_url="nats://127.0.0.1:1")
    line = one_line(err)
    assert code == 2 and out == ""
    assert "--selector" in line


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--node-id", "bad id"], "node name"),
        (["--node-id", "n1", "--label", "zone"], "not key=value"),
        (["--node-id", "n1", "--bind-host", "localhost"], "not an IP address"),
        (["--node-id", "n1", "--fleet", "a.b"], "fleet name"),
        (["--node-id", "n1", "--heartbeat-interval", "0"], "out of range"),
        (["--label", "zone=a"], "--node-id"),
    ],
)
async def test_agent_flag_errors_are_one_line(args: list[str], needle: str) -> None:
    """Bad agent flags exit 2 with one line naming the problem, before connecting anywhere."""
    proc = await asyncio.create_subprocess_exec(
        *python_module("agent.main", *args), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    line = one_line(err.decode())
    assert proc.returncode == 2 and out == b""
    assert needle in line and line.startswith("fleetwave-agent:")


async def test_agent_stops_cleanly_while_waiting_for_nats(tmp_path: Path) -> None:
    """An agent with no broker keeps waiting, and SIGTERM still stops it with exit 0."""
    agent = Child(
        "lonely",
        python_module("agent.main", "--node-id", "lonely", "--data-dir", str(tmp_path / "d"),
                      "--nats", f"nats://127.0.0.1:{free_port()}"),
        tmp_path / "lonely.log",
    )
    await agent.start()
    try:
        with pytest.raises(TimeoutError):
            await agent.wait(1.5)  # still running: it does not give up on NATS
        agent.signal(signal.SIGTERM)
        assert await agent.wait(10) == 0
    finally:
        await agent.stop()


async def test_dev_up_runs_a_fleet_and_stops_it_on_sigint(tmp_path: Path) -> None:
    """`dev up` starts broker, coordinator and agents, says how to use them; SIGINT reaps all."""
    port = free_port()
    out_path = tmp_path / "dev-up.out"
    dev = Child(
        "dev-up",
        [sys.executable, "-c", "from coordinator.console import run; run()",
         "dev", "up", "--agents", "2", "--dir", str(tmp_path / "fleet"), "--port", str(port),
         "--heartbeat-interval", "0.3"],
        out_path,
    )
    await dev.start()
    try:
        text = await wait_until(lambda: read_text(out_path), lambda t: "Ctrl-C stops" in t,
                                timeout=30, what="dev up to report the fleet")
        assert f"export FLEETWAVE_NATS=nats://127.0.0.1:{port}" in text
        assert "127.0.1.2" in text
        # The example bundles, assembled and ready to push, and the line that says so.
        bundles = tmp_path / "fleet" / "examples" / "hello"
        assert f"release push {bundles / '1.0.0'}" in text
        assert {p.name for p in bundles.iterdir()} >= {"1.0.0", "2.0.0", "2.1.0"}
        assert (bundles / "2.0.0" / "app.py").is_file()
        assert (bundles / "2.0.0" / "fleetwave.toml").is_file()
        code, out, err = await fleetwave("nodes", "-o", "json",
                                         nats_url=f"nats://127.0.0.1:{port}")
        assert code == 0, err
        rows = json.loads(out)
        assert [(r["id"], r["online"], r["labels"]) for r in rows] == [
            ("node-1", True, {"role": "web", "zone": "a"}),
            ("node-2", True, {"role": "web", "zone": "b"}),
        ]
        assert dev.pid is not None
        children = psutil.Process(dev.pid).children(recursive=True)
        assert len(children) == 4  # nats-server, coordinator, two agents
        dev.signal(signal.SIGINT)
        assert await dev.wait(30) == 0
        _gone, alive = psutil.wait_procs(children, timeout=5)
        assert alive == [], f"left running: {alive}"
    finally:
        await dev.stop()
    assert "dev fleet stopped" in await read_text(out_path)


async def test_dev_up_on_a_busy_port_fails_in_one_line(broker: Broker, tmp_path: Path) -> None:
    """A port already taken is reported in one line, exit 1, with nothing left running."""
    code, _out, err = await fleetwave(
        "dev", "up", "--agents", "1", "--dir", str(tmp_path / "f"), "--port", str(broker.port)
    )
    assert code == 1
    assert "already in use" in err.strip().splitlines()[-1]
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "name", ["single.conf", "cluster-1.conf", "cluster-2.conf", "cluster-3.conf", "auth.conf"]
)
async def test_shipped_nats_configs_are_valid(name: str, tmp_path: Path) -> None:
    """Every config in deploy/nats passes the real nats-server's own check (-t); those with TLS
    and users, with the trust root `fleetwave auth init` makes (its paths put in)."""
    conf = DEPLOY_NATS / name
    text = conf.read_text()
    if "include" in text:
        AuthDir(tmp_path / "auth").init("default", (), "admin")
        conf = tmp_path / "etc" / name
        conf.parent.mkdir()
        conf.write_text(with_auth_dir(text, tmp_path / "auth", conf.parent))
    proc = await asyncio.create_subprocess_exec(
        find_nats_server(), "-c", str(conf), "-t", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, out.decode()
    assert b"is valid" in out
