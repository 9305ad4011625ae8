"""End to end, a real app (issue 19 part 5): the ``webapp`` example (Starlette served by uvicorn,
its dependencies downloaded from the package index into the bundle's ``lib/`` by its
``build.py``) on a dev fleet of 3 real agents (subnet 127.0.64), with real traffic through every
node's router, every answer checked.

- ``build.py`` makes the 1.0.0 and 2.0.0 bundles once per session (the second from the first's
  wheelhouse with ``--no-index``: a build with no index access); a wheel that cannot be fetched
  fails the test saying so. The bundle holds no compiled code and no console scripts.
- ``${PORT}`` in the manifest's command is the only way uvicorn learns its port: each uvicorn
  (found with psutil) listens on the number its argv holds, and the routers reach it. A
  manifest naming an unknown ``${X}`` is refused by ``release push`` (exit 2, one line).
- One fleet runs every strategy's basic path under load, with 0 failed requests: rolling
  1.0.0 → 2.0.0, canary back to 1.0.0 (gated on the routers' figures), blue-green to 2.0.0, and a
  shadow of 1.0.0 that passes its gates and is retired while users only ever see 2.0.0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest

from coordinator.dev.devfleet import DevFleet
from coordinator.dev.traffic import Traffic
from protocol.manifest import load_manifest
from tests.integration.e2e_support import (
    DEPLOY_TIMEOUT,
    PORT,
    loaded,
    serving,
    settle,
    status,
)
from tests.integration.procs import fleetwave, wait_until

SUBNET = "127.0.64"
EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "webapp"
VERSIONS = ("1.0.0", "2.0.0")
BUILD_TIMEOUT = 600.0


def build(version: str, out: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(EXAMPLE / "build.py"), version, str(out), *flags],
                          capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False)


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The webapp bundles of VERSIONS, built once per session; the wheels are fetched once."""
    root = tmp_path_factory.mktemp("webapp")
    wheels = root / "wheels"
    built: dict[str, Path] = {}
    for n, version in enumerate(VERSIONS):
        offline = ("--no-index",) if n else ()
        proc = build(version, root / version, "--wheels", str(wheels), *offline)
        if proc.returncode != 0:
            pytest.fail(f"building the webapp {version} bundle failed (exit {proc.returncode}): "
                        f"{proc.stderr.strip()} -- this test needs pip to reach the package "
                        "index (or its wheels in pip's find-links)", pytrace=False)
        built[version] = root / version
    return built


def test_the_bundle_is_pure_python_and_says_port(bundles: dict[str, Path]) -> None:
    """A built bundle holds the app, its pinned dependencies as pure-Python packages (no
    compiled file, no console script naming the build machine's interpreter) with hash-checked
    bytecode, and a manifest of its version whose command passes ``--port ${PORT}``."""
    for version, path in bundles.items():
        m = load_manifest(path / "fleetwave.toml")
        assert (m.name, m.version, m.port) == ("webapp", version, 8080)
        assert m.command[m.command.index("--port") + 1] == "${PORT}", m.command
        lib = path / "lib"
        assert {"starlette", "uvicorn", "anyio", "h11", "click"} <= {p.name for p in
                                                                     lib.iterdir()}
        assert not (lib / "bin").exists()
        compiled = [p for p in path.rglob("*") if p.suffix in (".so", ".pyd", ".dylib")]
        assert compiled == [], compiled
        # Bytecode is checked by the source's hash (flags 0b11), as unpacking may not keep mtimes.
        pycs = list(path.rglob("*.pyc"))
        assert len(pycs) > 100 and path / "__pycache__" in {p.parent for p in pycs}
        assert {int.from_bytes(p.read_bytes()[4:8], "little") for p in pycs} == {3}


def test_build_without_wheels_or_index_fails_in_one_line(tmp_path: Path) -> None:
    """With --no-index and an empty wheelhouse, build.py exits 1 with one line naming the
    requirement it could not find and what to do, and leaves no bundle; bad usage exits 2."""
    out = tmp_path / "out"
    proc = build("1.0.0", out, "--wheels", str(tmp_path / "empty"), "--no-index")
    assert proc.returncode == 1, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("build.py: cannot install ") and "starlette" in lines[0], lines
    assert "run without --no-index" in lines[0], lines
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["empty"]
    proc = build("1/0", out)
    assert proc.returncode == 2 and "VERSION '1/0' is not allowed" in proc.stderr, proc
    proc = build("1.0.0", out, "--no-index")
    assert proc.returncode == 2 and "--no-index needs --wheels DIR" in proc.stderr, proc


def _uvicorns(root: str) -> list[tuple[list[str], set[int]]]:
    """The uvicorn processes under ``root``: (argv, the TCP ports they listen on)."""
    found = []
    for proc in psutil.process_iter(["cwd", "cmdline"]):
        argv = proc.info.get("cmdline") or []
        if not (proc.info.get("cwd") or "").startswith(root) or "uvicorn" not in argv:
            continue
        with contextlib.suppress(psutil.Error):
            ports = {c.laddr.port for c in proc.net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN}
            found.append((argv, ports))
    return found


def _get(host: str, path: str = "/") -> dict[str, str]:
    with urllib.request.urlopen(f"http://{host}:{PORT}{path}", timeout=5) as answer:
        doc: dict[str, str] = json.loads(answer.read())
        return doc


async def deploy(url: str, version: str, *flags: str) -> str:
    """A followed ``fleetwave deploy webapp VERSION FLAGS`` that must succeed; its output."""
    code, out, err = await fleetwave("deploy", "webapp", version, *flags, nats_url=url,
                                     timeout=DEPLOY_TIMEOUT)
    assert code == 0, f"deploy webapp {version} {' '.join(flags)} failed ({code}): {out}{err}"
    return out


async def all_serve(fleet: DevFleet, version: str) -> None:
    await wait_until(lambda: serving(fleet), lambda v: set(v.values()) == {version},
                     timeout=30, what=f"every node serving webapp {version}")


def no_failures(traffic: Traffic, step: str) -> None:
    now = traffic.snapshot()
    assert now.failed == 0, f"{step}: {now.failed} of {now.requests} failed: {now.failures}"


async def test_every_strategy_deploys_the_webapp_under_load(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    """Rolling, canary, blue-green and shadow each move the real app under steady load with no
    failed request; the shadow passes its gates on the same answers (version and slot ignored)
    and users never get one of its answers."""
    async with DevFleet(tmp_path / "fleet", agents=3, heartbeat_interval=0.5,
                        subnet=SUBNET) as fleet:
        url = fleet.nats_url
        # A manifest naming a variable the agent does not set is refused before anything is
        # stored: one line naming the argument.
        bad = tmp_path / "bad"
        shutil.copytree(bundles["1.0.0"], bad)
        manifest = bad / "fleetwave.toml"
        manifest.write_text(manifest.read_text().replace("${PORT}", "${PROT}"))
        code, out, err = await fleetwave("release", "push", str(bad), nats_url=url)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, (code, out, err)
        assert "command[7] '${PROT}': ${PROT} is not a variable fleetwave sets" in err, err

        for version in VERSIONS:
            code, out, err = await fleetwave("release", "push", str(bundles[version]),
                                             nats_url=url)
            assert code == 0 and f"pushed webapp {version}" in out, (code, out, err)
        code, out, err = await fleetwave("release", "list", "webapp", nats_url=url)
        assert code == 0 and "${PROT}" not in out and out.count("webapp") == 2, (out, err)

        await deploy(url, "1.0.0", "--batch", "100%", "--max-unavailable", "100%")
        await all_serve(fleet, "1.0.0")
        # uvicorn learns its port from its argv alone: each listens where ${PORT} said, and the
        # router reaches it there.
        slots = await asyncio.to_thread(_uvicorns, str(fleet.dir))
        assert len(slots) == 3, slots
        for argv, ports in slots:
            port = argv[argv.index("--port") + 1]
            assert port.isdigit() and ports == {int(port)}, (argv, ports)
        answer = await asyncio.to_thread(_get, fleet.host(2))
        assert answer["framework"].startswith("starlette ") and answer["node"] == "node-2", answer

        async with loaded(fleet, rate=10.0) as traffic:
            await settle(traffic, "1.0.0")
            no_failures(traffic, "1.0.0 installed")

            await deploy(url, "2.0.0", "--strategy", "rolling", "--batch", "1")
            await all_serve(fleet, "2.0.0")
            await settle(traffic, "2.0.0")
            no_failures(traffic, "rolling to 2.0.0")

            await deploy(url, "1.0.0", "--strategy", "canary", "--steps", "1,100%", "--bake",
                         "2s", "--max-error-rate", "1%", "--min-requests", "10")
            await all_serve(fleet, "1.0.0")
            await settle(traffic, "1.0.0")
            no_failures(traffic, "canary to 1.0.0")
            canary = await status(url)
            assert canary["strategy"] == "canary" and canary["state"] == "succeeded", canary

            out = await deploy(url, "2.0.0", "--strategy", "blue-green", "--scale-down-delay",
                               "1s", "--wait", "done")
            assert "switched 3 nodes at once" in out, out
            await all_serve(fleet, "2.0.0")
            await settle(traffic, "2.0.0")
            no_failures(traffic, "blue-green to 2.0.0")

            before = traffic.snapshot().versions["1.0.0"]
            out = await deploy(url, "1.0.0", "--strategy", "shadow", "--mirror", "50%",
                               "--bake", "3s", "--min-requests", "20", "--max-mismatch-rate",
                               "1%", "--max-error-rate", "1%", "--ignore-json-field",
                               "version,slot")
            assert "shadow report: pass" in out, out
            await settle(traffic, "2.0.0")
            no_failures(traffic, "shadow of 1.0.0")
            assert traffic.snapshot().versions["1.0.0"] == before, "a user got a shadow answer"
            report = await traffic.stop()

        shadow = await status(url)
        sh = shadow["report"]["shadow"]
        assert shadow["state"] == "succeeded" and sh["outcome"] == "pass", sh
        assert sh["compared"] >= 20 and sh["mismatched"] == 0, sh
        assert set((await serving(fleet)).values()) == {"2.0.0"}
    assert report.failed == 0, report.failures
    print(f"\nwebapp (starlette + uvicorn) on 3 agents, rolling, canary, blue-green and shadow: "
          f"{report.requests} requests, 0 failed, p99 {report.p(0.99):.1f} ms; shadow "
          f"compared {sh['compared']} pairs, 0 mismatched")
