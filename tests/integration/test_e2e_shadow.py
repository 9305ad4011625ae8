"""End to end: the shadow strategy on a dev fleet of 3 real agents (subnet 127.0.11), with the
real CLI and real traffic through every node's router, every answer checked.

- a release whose answers differ (2.0.0 names another version and greeting than 1.0.0) fails the
  mismatch gate: the rollout ends rolled back, the shadow is retired, and the report (printed by
  ``deploy`` and kept in ``status -o json``) names the request path and the JSON field that
  differed;
- the same release with ``--ignore-json-field version,greeting,slot`` compares equal, passes, and
  with ``--then blue-green`` is promoted: every router switches to it;
- a shadow that hangs (2.9.0: healthy, but ``GET /`` answers after 10 minutes) is judged by the
  shadow error gate, and its copies are dropped, not waited for.
- with ``--then rolling`` a passing shadow is rolled out node by node (``--batch 1``).

Throughout, users get only the live version's answers (never the shadow's) and no request fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from coordinator.dev.devfleet import DevFleet
from coordinator.dev.traffic import REQUEST_TIMEOUT
from tests.integration.e2e_support import (
    DEPLOY_TIMEOUT,
    PORT,
    events_of,
    push,
    service_pids,
    serving,
    status,
)
from tests.integration.procs import fleetwave, wait_until

SUBNET = "127.0.11"
NODES = 3
SHADOW = ("--strategy", "shadow", "--mirror", "50%", "--bake", "3s", "--min-requests", "30")
SAME = ("--ignore-json-field", "version,greeting", "--ignore-json-field", "slot",
        "--ignore-header", "X-Trace-Id")


class Answer(NamedTuple):
    sent: float  # wall time the request was written
    at: float  # wall time its answer was read
    node: str
    version: str


@dataclass
class Answers:
    """Steady GETs through every node's router; each answer kept with when it was asked and
    answered.

    Half the workers keep their connection alive, half open one per request (the two ways a
    weight switch can go wrong). A failure is a connection error, a timeout or a status >= 500,
    kept with its reason; a 2xx answer that is not the service's JSON is a failure too.
    """

    seen: list[Answer] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def versions(self) -> set[str]:
        return {a.version for a in self.seen}

    def went_back(self, node: str, old: str, new: str) -> list[Answer]:
        """``node``'s answers from ``old`` to requests sent after it first answered from ``new``.

        Answers are compared by when they were asked, not in the order they came back: two
        workers share a node, so an old request that is slow to answer may finish after a new
        one without anything having gone back.
        """
        first_new = min((a.at for a in self.seen if a.node == node and a.version == new),
                        default=float("inf"))
        return [a for a in self.seen if a.node == node and a.version == old and a.sent > first_new]

    async def worker(self, node: str, host: str, keep_alive: bool) -> None:
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                try:
                    sent = time.time()
                    async with asyncio.timeout(REQUEST_TIMEOUT):
                        if conn is None:
                            conn = await asyncio.open_connection(host, PORT)
                        status, body, closes = await _get(conn, host, keep_alive)
                except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                    self.failures.append(f"{node}: {type(exc).__name__} {exc}")
                    conn = _close(conn)
                    await asyncio.sleep(0.02)
                    continue
                if closes or not keep_alive:
                    conn = _close(conn)
                try:
                    version = str(json.loads(body)["version"])
                except (ValueError, KeyError, TypeError):
                    version = ""
                if status >= 500 or not version:
                    self.failures.append(f"{node}: HTTP {status} {body[:80]!r}")
                else:
                    self.seen.append(Answer(sent, time.time(), node, version))
                await asyncio.sleep(0.01)
        finally:
            _close(conn)


async def _get(
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], host: str, keep_alive: bool
) -> tuple[int, bytes, bool]:
    reader, writer = conn
    mode = "keep-alive" if keep_alive else "close"
    writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: {mode}\r\n\r\n".encode())
    await writer.drain()
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
    status = int(head.split(" ", 2)[1])
    length = next(int(line.split(":", 1)[1]) for line in head.split("\r\n")
                  if line.startswith("content-length:"))
    return status, await reader.readexactly(length), "connection: close" in head


def _close(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None) -> None:
    if conn is not None:
        conn[1].close()


@contextlib.asynccontextmanager
async def answers(fleet: DevFleet) -> AsyncIterator[Answers]:
    load = Answers()
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(load.worker(f"node-{i}", fleet.host(i), keep_alive))
                 for i in range(1, NODES + 1) for keep_alive in (True, False)]
        try:
            yield load
        finally:
            for t in tasks:
                t.cancel()


async def deploy(url: str, *args: str) -> tuple[int, str, str]:
    return await fleetwave("deploy", "hello", *args, nats_url=url, timeout=DEPLOY_TIMEOUT)


async def shadow_slots(fleet: DevFleet, version: str) -> int:
    """How many service processes of ``version`` run in the fleet now (psutil, not the agents)."""
    return sum(v == version for _, _, v in (await service_pids(fleet)).values())


def report(st: dict[str, Any]) -> dict[str, Any]:
    sh: dict[str, Any] = st["report"]["shadow"]
    return sh


async def test_shadow_mismatch_identical_promotion_and_hang(tmp_path: Path) -> None:
    """Differing answers fail the mismatch gate with the difference named; ignoring the fields
    that name the release makes them pass, and --then blue-green or rolling promotes; a hanging
    shadow fails the error gate; users only ever see the live version, and no request fails."""
    async with DevFleet(tmp_path / "fleet", agents=NODES, subnet=SUBNET,
                        heartbeat_interval=0.5) as fleet:
        url = fleet.nats_url
        await push(url, "1.0.0", "2.0.0", "2.9.0")
        code, out, err = await deploy(url, "1.0.0", "--batch", "100%")
        assert code == 0, f"install of 1.0.0 failed ({code}): {out}{err}"
        await wait_until(lambda: serving(fleet), lambda v: set(v.values()) == {"1.0.0"},
                         timeout=30, what="every node serving 1.0.0")

        # 1. 2.0.0 answers with another version and greeting: the mismatch gate fails.
        async with answers(fleet) as load:
            code, out, err = await deploy(url, "2.0.0", *SHADOW, "--max-mismatch-rate", "1%")
        assert code == 3, f"a differing shadow must be rolled back ({code}): {out}{err}"
        assert load.failures == [], load.failures[:5]
        assert load.versions() == {"1.0.0"} and len(load.seen) > 100
        st = await status(url)
        assert st["state"] == "rolled_back" and "mismatch rate" in st["reason"], st["reason"]
        sh = report(st)
        assert sh["outcome"] == "fail" and sh["compared"] >= 30, sh
        assert sh["mismatched"] == sh["compared"] and sh["mismatch_rate"] == 1.0, sh
        sample = sh["samples"][0]
        assert (sample["method"], sample["path"]) == ("GET", "/"), sample
        assert sample["what"] == "json field $.greeting", sample  # the first differing key
        # Answers are described by status, size and digest: no body bytes in stored reports.
        assert sample["live"].startswith("200, ") and "sha256:" in sample["shadow"], sample
        assert "version" not in sample["live"] + sample["shadow"], sample
        assert "mismatch on node-" in out and "GET /: json field $.greeting" in out, out
        await wait_until(lambda: shadow_slots(fleet, "2.0.0"), lambda n: n == 0, timeout=30,
                         what="the shadow slots to be stopped")
        assert set((await serving(fleet)).values()) == {"1.0.0"}

        # 2. The same release, with the fields that name it ignored: it passes and is promoted.
        async with answers(fleet) as load:
            code, out, err = await deploy(url, "2.0.0", *SHADOW, *SAME, "--max-mismatch-rate",
                                          "1%", "--max-error-rate", "1%", "--then", "blue-green",
                                          "--scale-down-delay", "1s")
            await wait_until(lambda: serving(fleet), lambda v: set(v.values()) == {"2.0.0"},
                             timeout=10, what="every node serving 2.0.0")
        assert code == 0, f"an equal shadow must pass and be promoted ({code}): {out}{err}"
        assert load.failures == [], load.failures[:5]
        assert load.versions() == {"1.0.0", "2.0.0"}, load.versions()
        st = await status(url)
        sh = report(st)
        assert st["state"] == "succeeded" and sh["outcome"] == "pass", sh
        assert sh["compared"] >= 30 and sh["mismatched"] == 0 and sh["samples"] == [], sh
        assert sh["ignore_json_fields"] == ["version", "greeting", "slot"], sh
        assert sh["ignore_headers"] == ["x-trace-id"] and sh["methods"] == ["GET", "HEAD"], sh
        assert "shadow report: pass" in out and "mismatched 0 (0.00%)" in out, out
        # Users saw 2.0.0 only once the routers switched, never while it was the shadow.
        evs = await events_of(url, st["id"])
        switch = min(float(e["time"]) for e in evs
                     if e["kind"] == "wave.started" and e["data"].get("wave") == 1)
        early = [(a.at, a.node) for a in load.seen if a.version == "2.0.0" and a.at < switch]
        assert early == [], f"the shadow answered users before the switch: {early[:5]}"
        for i in range(1, NODES + 1):  # per node: 1.0.0 until the switch, 2.0.0 after
            back = load.went_back(f"node-{i}", "1.0.0", "2.0.0")
            assert back == [], f"node-{i} went back to 1.0.0 after the switch: {back[:3]}"

        # 3. A shadow that never answers in time: copies time out or are dropped; users are
        # untouched, and the error gate fails it.
        async with answers(fleet) as load:
            code, out, err = await deploy(url, "2.9.0", "--strategy", "shadow", "--mirror",
                                          "100%", "--bake", "8s", "--min-requests", "4",
                                          "--max-error-rate", "10%")
        assert code == 3, f"a hanging shadow must be rolled back ({code}): {out}{err}"
        assert load.failures == [], load.failures[:5]
        assert load.versions() == {"2.0.0"}
        sh = report(await status(url))
        assert sh["outcome"] == "fail" and sh["shadow_errors"] >= 4, sh
        assert sh["dropped"] > 0, sh  # the queue filled while the workers waited
        await wait_until(lambda: shadow_slots(fleet, "2.9.0"), lambda n: n == 0, timeout=30,
                         what="the hanging shadow slots to be stopped")

        # 4. --then rolling: an equal shadow of 1.0.0 passes and is rolled out node by node.
        async with answers(fleet) as load:
            code, out, err = await deploy(url, "1.0.0", *SHADOW, *SAME, "--max-mismatch-rate",
                                          "1%", "--then", "rolling", "--batch", "1")
            await wait_until(lambda: serving(fleet), lambda v: set(v.values()) == {"1.0.0"},
                             timeout=10, what="every node serving 1.0.0")
        assert code == 0, f"an equal shadow must pass and roll out ({code}): {out}{err}"
        assert load.failures == [], load.failures[:5]
        assert load.versions() == {"1.0.0", "2.0.0"}, load.versions()
        st = await status(url)
        assert st["state"] == "succeeded" and report(st)["outcome"] == "pass"
        assert len(st["waves"]) == 1 + NODES  # the shadow, then one rolling wave per node
        for i in range(1, NODES + 1):  # per node: 2.0.0 until its wave, 1.0.0 after
            back = load.went_back(f"node-{i}", "2.0.0", "1.0.0")
            assert back == [], f"node-{i} went back to 2.0.0 after its wave: {back[:3]}"
