"""``fleetwave demo``: a scripted tour on a throwaway fleet; exit 0 when all of it worked.

What it shows, with real processes on this machine (broker, coordinator, three agents bound to
127.0.1.1-3, the example ``hello`` service behind each node's router on port 8080):

1. push the example bundles ``hello`` 1.0.0, 2.0.0 and the broken 2.1.0;
2. install 1.0.0 on every node;
3. start steady traffic (keep-alive and fresh connections) to every node's router;
4. roll to 2.0.0 in waves of one node, gated on the error rate: expect success, zero failed
   requests;
5. try 2.1.0, whose health check never passes: expect the rollout to roll back by itself
   (exit 3), every node to serve 2.0.0 again, and still zero failed requests;
6. print what happened with the figures (time, requests, failed requests).

The deploys run the real ``fleetwave deploy`` command, so what scrolls by is what an operator sees.
Everything lives in a temp dir and is stopped and removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click

from coordinator.dev import examples
from coordinator.dev.devfleet import DevFleet
from coordinator.dev.traffic import Traffic, TrafficReport, probe_version
from coordinator.errors import UsageError
from coordinator.releases import push_release
from protocol.bus import Bus
from protocol.loop import bounded

AGENTS = 3
PORT = 8080


@dataclass
class Step:
    name: str
    expected: str
    outcome: str
    ok: bool
    seconds: float
    requests: int = 0
    failed: int = 0


def examples_dir(given: Path | None) -> Path:
    """The hello example's folder (its app and a manifest per version): ``given`` or the one
    shipped with fleetwave (FleetwaveError with what to do when it is not there); ``given`` may
    also be the folder that holds ``hello``. UsageError, naming ``given``, if it holds neither."""
    if given is None:
        return examples.examples_root() / "hello"
    given = given.absolute()  # "." has no name, and the name is the service's
    for folder in (given, given / "hello"):
        if any(folder.glob("*/fleetwave.toml")):
            return folder
    raise UsageError(
        f"--examples {given} holds no <version>/fleetwave.toml (nor hello/<version>/"
        "fleetwave.toml); pass the hello example's folder (its app.py and a fleetwave.toml per "
        "version: deploy/examples/hello in a clone), or leave --examples out")


async def run_demo(examples_of: Path, *, keep_dir: bool = False, secure: bool = False,
                   subnet: str = "127.0.1") -> int:
    """Run the tour; return 0 when every step did what it should. ``secure``: over TLS, each
    process with its own credentials (``DevFleet(secure=True)``)."""
    base = Path(tempfile.mkdtemp(prefix="fleetwave-demo-"))
    made = examples.bundles(base / "bundles", examples_of.name, examples_of.parent)
    say(f"Starting a throwaway fleet in {base}: broker, coordinator, {AGENTS} agents ...")
    steps: list[Step] = []
    async with DevFleet(base / "fleet", agents=AGENTS, heartbeat_interval=1.0, secure=secure,
                        subnet=subnet) as fleet:
        nodes = await fleet.nodes()
        say(f"  {len(nodes)} nodes online: " + ", ".join(
            f"{n.id} ({fleet.host(i + 1)})" for i, n in enumerate(nodes)))
        bus = await Bus.connect(fleet.nats_url, fleet.fleet, name="fleetwave-demo",
                                **fleet.access())
        try:
            for version in ("1.0.0", "2.0.0", "2.1.0"):
                res = await push_release(bus, made[version])
                say(f"  release hello {version}: {res.status} ({res.info.digest[:19]}...)")
        finally:
            await bus.close()
        cli = _Cli(fleet.client_args())
        targets = [(fleet.host(i), PORT) for i in range(1, AGENTS + 1)]

        say("\n== Install hello 1.0.0 on every node")
        t0 = time.monotonic()
        rc = await cli.deploy("hello", "1.0.0", "--batch", "100%", "--max-unavailable", "100%")
        serving = await _versions(targets)
        ok = rc == 0 and serving == {"1.0.0"}
        steps.append(Step("install 1.0.0", "exit 0, all serve 1.0.0",
                          f"exit {rc}, serving {sorted(serving)}", ok, time.monotonic() - t0))
        if not ok:
            return _summary(steps, base, keep_dir)

        traffic = Traffic(targets, workers_per_target=2, rate=40)
        traffic.start()
        try:
            say("\n== Roll to hello 2.0.0 under steady traffic, one node per wave")
            before = traffic.snapshot()
            t0 = time.monotonic()
            rc = await cli.deploy(
                "hello", "2.0.0", "--batch", "1", "--bake", "2s", "--max-error-rate", "0.01",
                "--min-requests", "10",
            )
            took = time.monotonic() - t0
            d = _diff(traffic.snapshot(), before)
            serving = await _versions(targets)
            steps.append(Step(
                "rolling 1.0.0 → 2.0.0", "exit 0, 0 failed, all serve 2.0.0",
                f"exit {rc}, {d.failed} failed, serving {sorted(serving)}",
                rc == 0 and d.failed == 0 and serving == {"2.0.0"}, took, d.requests, d.failed,
            ))

            say("\n== Try the broken hello 2.1.0 (its health check never passes)")
            before = traffic.snapshot()
            t0 = time.monotonic()
            rc = await cli.deploy(
                "hello", "2.1.0", "--batch", "1", "--bake", "2s", "--progress-deadline", "20s",
            )
            took = time.monotonic() - t0
            d = _diff(traffic.snapshot(), before)
            serving = await _versions(targets)
            steps.append(Step(
                "broken 2.1.0 rolled back", "exit 3, 0 failed, all serve 2.0.0",
                f"exit {rc}, {d.failed} failed, serving {sorted(serving)}",
                rc == 3 and d.failed == 0 and serving == {"2.0.0"}, took, d.requests, d.failed,
            ))
        finally:
            report = await traffic.stop()
        say(f"\nTraffic overall: {report.requests} requests, {report.failed} failed, "
            f"p50 {report.p(0.5):.1f} ms, p99 {report.p(0.99):.1f} ms")
        for reason in report.failures[:5]:
            say(f"  failure: {reason}")
        say("Stopping the fleet ...")
    return _summary(steps, base, keep_dir)


class _Cli:
    """Runs the real ``fleetwave`` CLI against the demo fleet; its output goes to the terminal."""

    def __init__(self, global_args: list[str]) -> None:
        self.prefix = [sys.executable, "-c", "from coordinator.console import run; run()",
                       *global_args]

    async def deploy(self, *args: str) -> int:
        say("$ fleetwave deploy " + " ".join(args))
        proc = await asyncio.create_subprocess_exec(
            *self.prefix, "deploy", *args, stdin=asyncio.subprocess.DEVNULL
        )
        try:
            return await bounded(proc.wait(), 300)
        except (TimeoutError, asyncio.CancelledError):
            proc.kill()
            await proc.wait()
            raise


async def _versions(targets: list[tuple[str, int]]) -> set[str]:
    """What each node's router serves now: three requests each on fresh connections."""
    answers = await asyncio.gather(*(probe_version(h, p) for h, p in targets for _ in range(3)))
    return set(answers)


def _diff(now: TrafficReport, before: TrafficReport) -> TrafficReport:
    return TrafficReport(now.requests - before.requests, now.failed - before.failed)


def _summary(steps: list[Step], base: Path, keep_dir: bool) -> int:
    say("\nfleetwave demo: what happened")
    width = max(len(s.name) for s in steps) if steps else 10
    for s in steps:
        mark = "ok  " if s.ok else "FAIL"
        traffic = f"{s.requests} requests, {s.failed} failed" if s.requests else ""
        say(f"  [{mark}] {s.name:<{width}}  {s.seconds:6.1f}s  {traffic}")
        if not s.ok:
            say(f"         expected {s.expected}; got {s.outcome}")
    all_ok = bool(steps) and all(s.ok for s in steps) and len(steps) == 3
    if keep_dir or not all_ok:
        say(f"Logs are kept in {base}/fleet/logs")
    else:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    say("demo passed" if all_ok else "demo FAILED")
    return 0 if all_ok else 1


def say(line: str) -> None:
    click.echo(line)
