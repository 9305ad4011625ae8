"""The benchmark scripts as an operator runs them (real processes on 127.0.59.x): bench_router's
relay survives its open-loop run."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

SUBNET = "127.0.59"
PERF = Path(__file__).resolve().parents[1] / "perf"
ENV = {**os.environ, "FLEETWAVE_PERF_SUBNET": SUBNET}


async def run(*argv: str, timeout: float = 240) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv, env=ENV,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_bench_router_relay_survives_the_open_loop_run() -> None:
    """--relay with the example upstream completes its open-loop run: no TimeoutError out of a
    TaskGroup, and no request waits out a dropped SYN (a second or more) in the relay."""
    code, out, err = await run(
        str(PERF / "bench_router.py"), "--relay", "--duration", "1", "--concurrency", "1",
        "--no-wrk", "--upstream", "example", "--host", f"{SUBNET}.2", "--json")
    assert code == 0, err[-3000:]
    rows = json.loads(out)["results"]
    relayed = [r["relay"] for r in rows if r["load"].endswith("/s")]
    assert relayed and all(r["requests"] > 0 and r["p99_ms"] < 900 for r in relayed), relayed
