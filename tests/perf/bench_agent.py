"""Agent benchmark: RSS and CPU of one REAL agent idle, during a rollout, and over a soak.

Usage: python tests/perf/bench_agent.py [--idle 60] [--soak-minutes 10] [--probe-interval DUR]
       [--json] [--secure | --compare] [--metrics | --compare-metrics]

A dev fleet (``coordinator.dev.devfleet.DevFleet``: broker, coordinator, one real agent bound to
<SUBNET>.1, see perf_support, heartbeats every 2 s) runs the example hello service. Measured on
the agent process alone (its service processes and router are separate processes, by design):

- idle: after hello 1.0.0 is installed, ``--idle`` seconds with nothing to do: RSS at the end and
  CPU as a percentage of one core over the window (psutil CPU times); also USS at the end (the
  memory only this process holds: RSS less the shared libraries' pages, which every Python
  process on the host shares) and wakeups a second (voluntary context switches: each one is a
  trip round the event loop, which is what idle CPU is made of);
- rollout: CPU percentage and peak RSS (VmHWM) while 1.0.0 -> 2.0.0 rolls;
- soak: ``--soak-minutes`` of heartbeats with one rollout a minute (alternating 2.0.0 and 1.0.0);
  RSS growth = RSS at the end minus RSS after the first soak rollout (warm-up excluded).

The example's health probe runs every 200 ms while a slot starts and every 1 s once it is healthy
(deploy/examples/hello/*/fleetwave.toml: ``start_interval``, ``interval``), which is most of an
idle agent's wakeups. ``--probe-interval 200ms`` (or any) runs the same bundles with that interval
written into a copy of their manifests (the examples themselves are untouched), to show the
agent's cost at another interval.

``--secure`` runs the fleet over TLS with per-process credentials (``dev up --secure``: the agent
with its node's, this script as the operator); ``--compare`` runs it plain, then secure, and
prints both with secure ÷ plain (OpenSSL is then mapped into the agent: part of the cost).

``--metrics`` runs the agent with ``--metrics <SUBNET>.1:9464`` and scrapes it every
``SCRAPE_EVERY`` seconds (Prometheus's default interval) through the idle window, so the idle
figures include serving the scrapes; ``--compare-metrics`` runs it without, then with, and prints
both with on ÷ off. The scrapes' own figures (time to answer, size) are printed too.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perf_support import (
    SUBNET,
    add_secure_flags,
    cpu_seconds,
    emit,
    peak_rss_mb,
    ratio_rows,
    rss_mb,
    run_dir,
    run_main,
)

from coordinator.dev.devfleet import DevFleet
from coordinator.dev.examples import assembled
from coordinator.releases import push_release
from protocol import subjects
from protocol.bus import Bus
from protocol.codec import decode, encode
from protocol.messages import TERMINAL_STATES, ApiReply, DeployRequest, RolloutRequest, RolloutSpec

SCRAPE_EVERY = 15.0
METRICS_PORT = 9464


async def scrape(host: str) -> tuple[float, int]:
    """(seconds to the whole answer, bytes) of one GET /metrics."""
    started = time.monotonic()
    async with asyncio.timeout(10.0):
        reader, writer = await asyncio.open_connection(host, METRICS_PORT)
        try:
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
            data = await reader.read()
        finally:
            writer.close()
    if not data.startswith(b"HTTP/1.1 200 "):
        raise RuntimeError(f"scrape answered {data[:40]!r}")
    return time.monotonic() - started, len(data.partition(b"\r\n\r\n")[2])


async def scraped_idle(host: str | None, idle: float) -> list[tuple[float, int]]:
    """Wait ``idle`` seconds, scraping ``host`` every SCRAPE_EVERY seconds if given."""
    if host is None:
        await asyncio.sleep(idle)  # the measurement window itself, not a race
        return []
    out = []
    end = time.monotonic() + idle
    while end - time.monotonic() > 0:
        out.append(await scrape(host))
        await asyncio.sleep(min(SCRAPE_EVERY, max(0.0, end - time.monotonic())))
    return out


async def deploy(bus: Bus, version: str, caller: str) -> float:
    """Roll hello to ``version`` and wait until it succeeds; return the seconds it took.
    ``caller``: who the API subjects name (on a secure fleet, the operator whose credentials the
    bus uses: the server lets it name no one else)."""
    started = time.monotonic()
    spec = RolloutSpec(service="hello", version=version, progress_deadline=60.0)
    reply = decode(ApiReply, await bus.request(subjects.api(bus.fleet, caller, "deploy"),
                                               encode(DeployRequest(spec=spec)), timeout=30))
    if not reply.ok:
        raise RuntimeError(f"deploy {version} refused: {reply.error}")
    rid = reply.data["id"]
    deadline = time.monotonic() + 90
    while True:
        raw = await bus.request(subjects.api(bus.fleet, caller, "status"),
                                encode(RolloutRequest(id=rid)), timeout=10)
        state = decode(ApiReply, raw).data["state"]
        if state in TERMINAL_STATES:
            if state != "succeeded":
                raise RuntimeError(f"rollout {rid} to {version} ended {state}")
            return time.monotonic() - started
        if time.monotonic() > deadline:
            raise RuntimeError(f"rollout {rid} to {version} still {state} after 90 s")
        await asyncio.sleep(0.2)


def bundles(tmp: Path, probe_interval: str | None) -> Path:
    """The example bundles, or copies with ``[health] interval`` set to ``probe_interval``."""
    if probe_interval is None:
        return assembled("1.0.0").parent
    out = tmp / "bundles"
    for v in ("1.0.0", "2.0.0"):
        shutil.copytree(assembled(v), out / v)
        manifest = out / v / "fleetwave.toml"
        text, n = re.subn(r'(?m)^interval = "[^"]*"$', f'interval = "{probe_interval}"',
                          manifest.read_text())
        if n != 1:
            raise RuntimeError(f"{manifest}: expected one health interval, found {n}")
        manifest.write_text(text)
    return out


def openssl_mapped(pid: int) -> bool:
    """Whether OpenSSL (libcrypto) is mapped into the process."""
    return "libcrypto" in Path(f"/proc/{pid}/maps").read_text()


def cpu_percent(pid: int, cpu0: float, t0: float) -> float:
    return 100.0 * (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)


async def measure(idle: float, soak_minutes: float, probe_interval: str | None,
                  secure: bool = False, metrics: bool = False) -> dict[str, Any]:
    with run_dir("fw-perf-agent-") as tmp:
        source = bundles(Path(tmp), probe_interval)
        fleet = DevFleet(Path(tmp) / "fleet", agents=1, subnet=SUBNET, fleet="perfagent",
                         heartbeat_interval=2.0, secure=secure)
        metrics_host = fleet.host(1) if metrics else None
        if metrics_host is not None:
            fleet.agent(1).argv += ["--metrics", f"{metrics_host}:{METRICS_PORT}"]
        async with fleet:
            bus = await Bus.connect(fleet.nats_url, fleet.fleet, name="perf-agent",
                                    **fleet.access())
            try:
                for v in ("1.0.0", "2.0.0"):
                    await push_release(bus, source / v)
                pid = fleet.agent(1).pid
                assert pid is not None
                await deploy(bus, "1.0.0", fleet.caller)

                proc = psutil.Process(pid)
                cpu0, t0 = cpu_seconds(pid), time.monotonic()
                switches0 = proc.num_ctx_switches().voluntary
                scrapes = await scraped_idle(metrics_host, idle)
                idle_cpu, idle_rss = cpu_percent(pid, cpu0, t0), rss_mb(pid)
                wakeups = (proc.num_ctx_switches().voluntary - switches0) / (time.monotonic() - t0)
                idle_uss = float(proc.memory_full_info().uss) / 2**20
                openssl = openssl_mapped(pid)

                cpu0, t0 = cpu_seconds(pid), time.monotonic()
                roll_s = await deploy(bus, "2.0.0", fleet.caller)
                roll_cpu, roll_peak = cpu_percent(pid, cpu0, t0), peak_rss_mb(pid)

                soak_start = time.monotonic()
                versions = ["1.0.0", "2.0.0"]
                rollouts, rss_warm = 0, 0.0
                samples: list[float] = []
                cpu0 = cpu_seconds(pid)
                while time.monotonic() - soak_start < soak_minutes * 60:
                    minute = time.monotonic()
                    await deploy(bus, versions[rollouts % 2], fleet.caller)
                    rollouts += 1
                    if rollouts == 1:
                        rss_warm = rss_mb(pid)
                    samples.append(rss_mb(pid))
                    left = 60 - (time.monotonic() - minute)
                    left = min(left, soak_minutes * 60 - (time.monotonic() - soak_start))
                    if left > 0:
                        await asyncio.sleep(left)  # the soak's pace: one rollout a minute
                # no soak (0 minutes): no figures, rather than growth from 0.0 (issue 19)
                soak_cpu = cpu_percent(pid, cpu0, soak_start) if rollouts else None
                rss_end = rss_mb(pid) if rollouts else None
            finally:
                await bus.close()
    return {
        "secure": secure, "metrics": metrics, "idle_scrapes": len(scrapes),
        "scrape_ms_max": round(max(t for t, _ in scrapes) * 1000, 1) if scrapes else None,
        "scrape_bytes": scrapes[-1][1] if scrapes else None,
        "probe_interval": probe_interval or "example's (1s; 200ms while starting)",
        "openssl_mapped": openssl,
        "idle_window_s": idle, "idle_rss_mb": round(idle_rss, 1),
        "idle_cpu_percent": round(idle_cpu, 3), "idle_uss_mb": round(idle_uss, 1),
        "idle_wakeups_per_s": round(wakeups, 1),
        "rollout_s": round(roll_s, 2), "rollout_cpu_percent": round(roll_cpu, 1),
        "peak_rss_mb": round(roll_peak, 1),
        "soak_minutes": soak_minutes, "soak_rollouts": rollouts,
        "soak_cpu_percent": None if soak_cpu is None else round(soak_cpu, 2),
        "soak_rss_after_first_mb": None if rss_end is None else round(rss_warm, 1),
        "soak_rss_end_mb": None if rss_end is None else round(rss_end, 1),
        "soak_rss_growth_mb": None if rss_end is None else round(rss_end - rss_warm, 2),
        "soak_rss_samples_mb": [round(s, 1) for s in samples],
    }


COMPARED = [("idle RSS", "idle_rss_mb", " MiB"), ("idle USS", "idle_uss_mb", " MiB"),
            ("idle CPU", "idle_cpu_percent", " %"),
            ("idle wakeups/s", "idle_wakeups_per_s", ""),
            ("rollout 1.0.0 -> 2.0.0", "rollout_s", " s"),
            ("rollout CPU", "rollout_cpu_percent", " %"),
            ("peak RSS", "peak_rss_mb", " MiB"), ("soak CPU", "soak_cpu_percent", " %"),
            ("soak RSS at the end", "soak_rss_end_mb", " MiB")]  # (a growth near 0: no ratio)


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("probe interval", str(r["probe_interval"])),
        ("idle RSS", f"{r['idle_rss_mb']:.1f} MiB after {r['idle_window_s']:g} s"),
        ("idle CPU", f"{r['idle_cpu_percent']:.3f} % of a core, {r['idle_wakeups_per_s']:.1f} "
                     "wakeups/s"),
        ("idle USS", f"{r['idle_uss_mb']:.1f} MiB (private: RSS less shared libraries)"),
        ("OpenSSL mapped", "yes" if r["openssl_mapped"] else "no"),
        ("--metrics", f"on: {r['idle_scrapes']} scrapes in the idle window, every "
                      f"{SCRAPE_EVERY:g} s, slowest {r['scrape_ms_max']} ms, "
                      f"{r['scrape_bytes']} bytes" if r["metrics"] else "off"),
        ("rollout 1.0.0 -> 2.0.0", f"{r['rollout_s']:.2f} s, CPU {r['rollout_cpu_percent']:.1f} %"
                                   f" of a core, peak RSS {r['peak_rss_mb']:.1f} MiB"),
        *soak_rows(r),
    ]


def soak_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    if r["soak_rss_growth_mb"] is None:
        return [("soak", f"none ({r['soak_minutes']:g} min: no rollout, no figures)")]
    return [
        ("soak", f"{r['soak_minutes']:g} min, {r['soak_rollouts']} rollouts, CPU "
                 f"{r['soak_cpu_percent']:.2f} %"),
        ("soak RSS growth", f"{r['soak_rss_growth_mb']:+.2f} MiB ({r['soak_rss_after_first_mb']}"
                            f" -> {r['soak_rss_end_mb']} MiB)"),
    ]


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--idle", type=float, default=60.0, help="idle window in seconds")
    ap.add_argument("--soak-minutes", type=float, default=10.0)
    ap.add_argument("--probe-interval", metavar="DUR", default=None,
                    help="health probe interval written into copies of the example manifests "
                         "(default: the examples' own: 1s, 200ms while starting)")
    ap.add_argument("--json", action="store_true")
    add_secure_flags(ap, "TLS and per-process credentials (dev up --secure)",
                     "plain, then with TLS and auth; print both and the ratios")
    on = ap.add_mutually_exclusive_group()
    on.add_argument("--metrics", action="store_true",
                    help=f"the agent with --metrics, scraped every {SCRAPE_EVERY:g} s when idle")
    on.add_argument("--compare-metrics", action="store_true",
                    help="without, then with --metrics; print both and the ratios")
    args = ap.parse_args()
    if args.compare and args.compare_metrics:
        ap.error("--compare and --compare-metrics compare one thing at a time")
    results = []
    runs = ([(False, False), (True, False)] if args.compare else
            [(args.secure, False), (args.secure, True)] if args.compare_metrics else
            [(args.secure, args.metrics)])
    for secure, metrics in runs:
        r = await measure(args.idle, args.soak_minutes, args.probe_interval, secure, metrics)
        results.append(r)
        if not args.json:
            how_ = ("TLS + auth" if secure else "plain") + (", --metrics" if metrics else "")
            emit(False, f"one real agent (the agent process only), {how_}", r, rows(r))
    if args.json:
        emit(True, "", results[0] if len(results) == 1 else {"agent": results}, [])
    elif args.compare:
        emit(False, "one real agent: the cost of TLS + auth (secure / plain)", {},
             ratio_rows(results[0], results[1], COMPARED))
    elif args.compare_metrics:
        emit(False, "one real agent: the cost of --metrics (on / off)", {},
             ratio_rows(results[0], results[1], COMPARED, ("off", "on")))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main()))
