"""The dashboard's script in a real headless chromium: where its actions go, how it keeps its
live stream, what its notice and its node rows show.

Two ways to serve the page:

- a real dev fleet (2 agents on 127.0.79.1-2, the coordinator's ``--http`` on 127.0.79.100 with
  an operator token), for what a real rollout must show: a rollout that starts between the two
  clicks of Abort is not aborted;
- a stand-in (``StandIn``, on 127.0.79.200): the real page and script from the package, served
  with the coordinator's headers, and an ``/api/stream`` that sends the snapshots the test shows
  and answers the HTTP errors it asks for, and keeps the actions the page posts. The moments
  that matter (a snapshot that arrives between a press and its click, an error status on the
  stream) then happen when the test says, not when a fleet's timers do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from coordinator.dev.broker import free_port
from coordinator.dev.devfleet import DevFleet
from coordinator.dev.examples import bundle
from coordinator.web import HEADERS, STATIC
from tests.integration.browser import Browser, chromium
from tests.integration.e2e_support import deploy_detached, install, push, status
from tests.integration.procs import fleetwave
from tests.integration.test_dashboard_browser import add_token

SUBNET = "127.0.79"
HTTP_HOST = "127.0.79.100"
STAND_IN_HOST = "127.0.79.200"
ABORT = '#actions button[data-verb="abort"]'
PAUSE = '#actions button[data-verb="pause"]'
PROMOTE = '#actions button[data-verb="promote"]'
ROLLBACK = '#actions button[data-verb="rollback"]'


# -- the stand-in coordinator ------------------------------------------------------------------


def node_row(state: str, *, online: bool = True, wave: int = 0) -> dict[str, Any]:
    return {"version": "2.0.0" if state == "done" else "1.0.0", "state": state,
            "healthy": state == "done", "online": online, "wave": wave, "generation": 2,
            "slot": "b", "reason": "unhealthy" if state == "failed" else "", "staged": ""}


def rollout(rid: str, service: str = "hello",
            nodes: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """A running rollout's status as ``fleetwave status -o json`` prints it (the fields the
    page reads)."""
    nodes = nodes if nodes is not None else {"node-1": node_row("updating")}
    states: dict[str, int] = {}
    for n in nodes.values():
        states[n["state"]] = states.get(n["state"], 0) + 1
    return {
        "id": rid, "service": service, "version": "2.0.0", "from_version": "1.0.0",
        "strategy": "rolling", "state": "running", "reason": "", "phase": "bake",
        "created": 1.0, "updated": 2.0, "finished": None, "current_wave": 0, "report": {},
        "bake": 300.0, "gates": {}, "on_failure": "rollback", "on_node_lost": "wait",
        "started_by": "alice", "paused_by": "", "aborted_by": "", "rollback_by": "",
        "prestage": 0, "cohort": None,
        "waves": [{"index": 0, "nodes": list(nodes)[:3], "node_count": len(nodes),
                   "weight": 100, "state": "baking", "started": 1.0, "finished": None,
                   "gates": {}, "share": None}],
        "nodes": nodes, "node_count": len(nodes), "node_states": states,
    }


def snapshot(shown: dict[str, Any] | None, *listed: dict[str, Any],
             error: str = "") -> dict[str, Any]:
    """What ``/api/stream`` sends: ``shown`` in full, ``listed`` (newest first) as rows."""
    rows = [{"id": r["id"], "service": r["service"], "version": r["version"],
             "from_version": r["from_version"], "strategy": r["strategy"], "state": r["state"],
             "current_wave": 0, "waves": 1, "nodes": r["node_count"], "started_by": "alice",
             "created": r["created"]} for r in listed]
    return {"fleet": "default", "coordinator": "stand-in", "role": "leader", "ready": True,
            "writable": True, "nodes": [], "node_count": 0, "nodes_online": 0,
            "nodes_unheard": 0, "services": sorted({r["service"] for r in listed}),
            "rollouts": rows, "error": error, "rollout": shown, "events": []}


class StandIn:
    """The coordinator's HTTP surface as the page uses it, played by the test.

    ``show(snap)`` sends a snapshot on every open stream (and first on every new one);
    ``cut(*statuses)`` ends the open streams and makes the next stream requests answer those
    statuses, in order (then streams are served again); ``asked`` holds when each stream
    request came; ``actions`` every path the page posted to, in order."""

    def __init__(self) -> None:
        self.snap: dict[str, Any] | None = None
        self.serial = 0
        self.epoch = 0
        self.refuse: list[int] = []
        self.asked: list[float] = []
        self.actions: list[str] = []
        self.closing = False
        self.gateway = False  # actions answered by a proxy's 502 page (``act``)
        self.changed = asyncio.Condition()

    async def show(self, snap: dict[str, Any]) -> None:
        self.snap, self.serial = snap, self.serial + 1
        async with self.changed:
            self.changed.notify_all()

    async def cut(self, *statuses: int) -> None:
        self.refuse += statuses
        self.epoch += 1
        async with self.changed:
            self.changed.notify_all()

    async def page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html", headers=HEADERS)

    async def stream(self, request: web.Request) -> web.StreamResponse:
        self.asked.append(time.monotonic())
        if self.refuse:
            code = self.refuse.pop(0)
            return web.json_response({"ok": False, "error": f"the stand-in's {code}"},
                                     status=code)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-store"})
        await resp.prepare(request)
        epoch, sent = self.epoch, -1
        # EventSource's own reconnection, after a stream that ends, in 0.2 s (not 3 s).
        await self._send(resp, "retry: 200\n\n")
        while epoch == self.epoch and not self.closing:
            if self.snap is not None and sent != self.serial:
                sent = self.serial
                # Its dicts in the order the test built them (no sort_keys).
                await self._send(resp, f"event: snapshot\ndata: {json.dumps(self.snap)}\n\n")
            async with self.changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), 0.5)
        return resp

    @staticmethod
    async def _send(resp: web.StreamResponse, text: str) -> None:
        async with asyncio.timeout(5.0):
            await resp.write(text.encode())

    async def act(self, request: web.Request) -> web.Response:
        self.actions.append(request.path)
        if self.gateway:  # a proxy in front, its coordinator gone: its own page, not JSON
            return web.Response(status=502, text="<html><body>502 Bad Gateway</body></html>",
                                content_type="text/html")
        return web.json_response({"ok": True, "who": "alice", "data": {}})


@contextlib.asynccontextmanager
async def stand_in() -> AsyncIterator[tuple[StandIn, str]]:
    """A ``StandIn`` served on a free port of ``STAND_IN_HOST``; yields it and its base URL."""
    s = StandIn()
    app = web.Application()
    app.router.add_get("/", s.page)
    app.router.add_static("/static/", STATIC, append_version=False)
    app.router.add_get("/api/stream", s.stream)
    app.router.add_post("/api/rollouts/{id}/{verb}", s.act)
    app.router.add_post("/api/services/{service}/rollback", s.act)
    runner = web.AppRunner(app, shutdown_timeout=2.0)
    await runner.setup()
    port = free_port(STAND_IN_HOST)
    await web.TCPSite(runner, STAND_IN_HOST, port).start()
    try:
        yield s, f"http://{STAND_IN_HOST}:{port}"
    finally:
        s.closing = True
        async with s.changed:
            s.changed.notify_all()
        await runner.cleanup()


async def shown(page: Browser, rid: str) -> None:
    await page.wait_for(lambda: page.text("#rollout-id"), lambda t: t == rid, timeout=10,
                        what=f"rollout {rid} shown")


async def notice(page: Browser) -> str:
    """The notice's text, "" while it is hidden."""
    return str(await page.js("const n = document.querySelector('#notice');"
                             "return n.hidden ? '' : n.textContent;"))


def not_sent(verb: str, meant: str, now: str) -> str:
    """What the page says of an action it did not send."""
    return f"{verb} of {meant} was not sent: the page now shows {now}"


async def no_action(s: StandIn, page: Browser) -> None:
    """A moment for a request the page might still send; then none was."""
    await page.js("return 1;")  # the click's handlers have run (one more round trip)
    await asyncio.sleep(0.5)
    assert s.actions == [], s.actions


# -- 1: an action goes to the rollout shown when the operator pressed -------------------------


async def test_a_rollout_that_starts_between_the_two_clicks_of_abort_is_not_aborted(
    tmp_path: Path,
) -> None:
    """On a real fleet, with the page following the newest rollout: Abort clicked once on A,
    then B starts and is shown; the button is disarmed (the page says A's abort was not sent),
    and the next click only asks to confirm the abort of B; both rollouts run on."""
    token, tokens_file = await add_token(tmp_path / "web", "alice")
    port = free_port(HTTP_HOST)
    base = f"http://{HTTP_HOST}:{port}"
    fleet = DevFleet(tmp_path / "fleet", agents=2, subnet=SUBNET, heartbeat_interval=0.5)
    fleet.coordinator.argv += ["--http", f"{HTTP_HOST}:{port}", "--http-tokens", str(tokens_file)]
    hello2 = bundle("2.0.0", tmp_path / "bundles")  # a second service: hello's app on 8081
    manifest = hello2 / "fleetwave.toml"
    manifest.write_text(manifest.read_text().replace('name = "hello"', 'name = "hello2"')
                        .replace("port = 8080", "port = 8081"))
    async with fleet:
        url = fleet.nats_url
        await push(url, "1.0.0", "2.0.0")
        code, _, err = await fleetwave("release", "push", str(hello2), nats_url=url)
        assert code == 0, err
        await install(fleet, "1.0.0")
        a = await deploy_detached(url, "2.0.0", "--batch", "1", "--bake", "300s")
        async with chromium(tmp_path / "profile") as page:
            await page.get(f"{base}/")
            await shown(page, a)
            await page.type("#token", token)
            await page.click("#token-save")
            await page.wait_for(lambda: page.text("#who"), lambda t: t == "operator: alice",
                                timeout=10, what="signed in as alice")

            # Abort clicked once on A; then B starts (shown ~1 s later: within the 5 s the
            # first click waits for a second).
            await page.click(ABORT)
            assert (await page.text(ABORT), await page.text("#rollout-id")) == (
                "Really abort?", a)
            code, out, err = await fleetwave("deploy", "hello2", "2.0.0", "--batch", "1",
                                             "--bake", "300s", "--detach", nats_url=url)
            assert code == 0, err
            b = out.strip()
            await shown(page, b)
            # Disarmed when B came, saying so.
            said = await notice(page)
            assert said == not_sent("abort", a, b), said
            assert await page.text(ABORT) == "Abort"

            await page.click(ABORT)
            assert await page.text(ABORT) == "Really abort?"  # of B, asked first
            await asyncio.sleep(1.0)
            assert (await status(url, b))["state"] == "running"
            assert (await status(url, a))["state"] == "running"
            assert await notice(page) == said

            # 3, on the real coordinator: a rollout pinned that is not there is an error of
            # the snapshots; choosing one that is clears it.
            await page.js("location.hash = 'rollout=hello-20261206-000000-dead';")
            await page.wait_for(lambda: notice(page), lambda t: "dead" in t, timeout=10,
                                what="the unknown rollout's error")
            await page.click(f'#rollouts tbody tr[data-rollout="{a}"]')
            await shown(page, a)
            await page.wait_for(lambda: notice(page), lambda t: t == "", timeout=10,
                                what="the error gone with the rollout that has none")


async def test_an_action_goes_to_the_rollout_shown_at_the_press_or_is_not_sent(
    tmp_path: Path,
) -> None:
    """A snapshot that replaces the rollout shown between a press (mouse or keyboard) and its
    click, or between the two clicks of Abort or Roll back, stops the action (one line says so);
    an action on the rollout still shown goes to it, a rollback to its service."""
    a, b = rollout("hello-20261206-100000-aaaa"), rollout("hello2-20261206-100001-bbbb", "hello2")
    async with stand_in() as (s, base), chromium(tmp_path / "profile") as page:
        await s.show(snapshot(a, a))
        await page.get(f"{base}/")
        await shown(page, a["id"])

        # Abort: armed on A, B comes; the next click asks again, for B, and sends nothing.
        await page.click(ABORT)
        assert await page.text(ABORT) == "Really abort?"
        await s.show(snapshot(b, b, a))
        await shown(page, b["id"])
        assert await page.text(ABORT) == "Abort"
        assert await notice(page) == not_sent("abort", a["id"], b["id"])
        await page.click(ABORT)
        assert await page.text(ABORT) == "Really abort?"
        await no_action(s, page)

        # Roll back: armed on B (hello2), A comes back; the next click sends nothing.
        await page.click(ROLLBACK)  # disarms Abort, arms Roll back
        assert (await page.text(ABORT), await page.text(ROLLBACK)) == ("Abort", "Really roll back?")
        await s.show(snapshot(a, b, a))
        await shown(page, a["id"])
        await page.click(ROLLBACK)
        assert await page.text(ROLLBACK) == "Really roll back?"
        await no_action(s, page)

        # Pause pressed with the mouse on A, released once B is shown: not sent.
        button = await page.run(lambda: page.driver.find_element(By.CSS_SELECTOR, PAUSE))
        await page.run(lambda: ActionChains(page.driver).click_and_hold(button).perform())
        await s.show(snapshot(b, b, a))
        await shown(page, b["id"])
        await page.run(lambda: ActionChains(page.driver).release().perform())
        await page.wait_for(lambda: notice(page), lambda t: t.startswith("pause of"), timeout=5,
                            what="the pause's click")
        assert await notice(page) == not_sent("pause", a["id"], b["id"])
        await no_action(s, page)

        # Promote pressed with the space bar on B, released once A is shown: not sent.
        await page.js("document.querySelector(arguments[0]).focus();", PROMOTE)
        await page.run(lambda: ActionChains(page.driver).key_down(Keys.SPACE).perform())
        await s.show(snapshot(a, b, a))
        await shown(page, a["id"])
        await page.run(lambda: ActionChains(page.driver).key_up(Keys.SPACE).perform())
        await page.wait_for(lambda: notice(page), lambda t: t.startswith("promote of"),
                            timeout=5, what="the promote's click")
        assert await notice(page) == not_sent("promote", b["id"], a["id"])
        await no_action(s, page)

        # On the rollout still shown, they go: to its id, a rollback to its service, though
        # a snapshot of the same rollout came between the two clicks.
        await page.click(PAUSE)
        await page.wait_for(lambda: notice(page), lambda t: "done by alice" in t, timeout=5,
                            what="the pause done")
        await s.show(snapshot(b, b, a))
        await shown(page, b["id"])
        await page.click(ROLLBACK)
        await s.show(snapshot(dict(b, phase="updating"), b, a))
        await page.wait_for(lambda: page.text("#rollout-head"), lambda t: "phase updating" in t,
                            timeout=5, what="B's next snapshot")
        await page.click(ROLLBACK)
        await page.wait_for(lambda: notice(page), lambda t: "rollback of" in t and "done" in t,
                            timeout=5, what="the rollback done")
        assert s.actions == [f"/api/rollouts/{a['id']}/pause", "/api/services/hello2/rollback"]


# -- 2: an HTTP error on the stream ------------------------------------------------------------


async def test_an_http_error_on_the_stream_is_retried_with_backoff_until_a_snapshot_comes(
    tmp_path: Path,
) -> None:
    """Streams answered 503 (the coordinator at its cap) are asked again after 1, 2, 4 s while
    the badge counts down "disconnected, retrying in Ns"; a snapshot makes it live and resets
    the wait, so a later 502 (a proxy while the coordinator restarts) is retried after 1 s."""
    a = rollout("hello-20261206-100000-aaaa")
    async with stand_in() as (s, base), chromium(tmp_path / "profile") as page:
        await s.show(snapshot(a, a))
        s.refuse = [503, 503, 503]
        await page.get(f"{base}/")
        # Every text the badge takes from now on.
        await page.js("window.__badge = [];"
                      "new MutationObserver(() => __badge.push(document.querySelector('#live')"
                      ".textContent)).observe(document.querySelector('#live'),"
                      " {childList: true, characterData: true, subtree: true});")
        await page.wait_for(lambda: page.text("#live"), lambda t: t == "live", timeout=15,
                            what="the stream live after three 503s")
        await shown(page, a["id"])
        gaps = [round(t1 - t0, 1) for t0, t1 in zip(s.asked, s.asked[1:], strict=False)]
        assert len(s.asked) == 4, gaps
        for gap, wait in zip(gaps, (1, 2, 4), strict=True):
            assert wait - 0.1 <= gap <= wait + 1.0, gaps
        badge = await page.js("return window.__badge;")
        for left in (4, 3, 2, 1):  # the last wait, counted down
            assert f"disconnected, retrying in {left}s" in badge, badge

        # The stream ends (the coordinator stops); EventSource asks again by itself and gets a
        # proxy's 502: asked once more after 1 s, the wait having been reset by the snapshot.
        await s.cut(502)
        await page.wait_for(lambda: page.text("#live"), lambda t: t.startswith("disconnected"),
                            timeout=5, what="the 502 seen")
        await page.wait_for(lambda: page.text("#live"), lambda t: t == "live", timeout=5,
                            what="the stream live again")
        assert len(s.asked) == 6, s.asked
        assert 0.9 <= s.asked[-1] - s.asked[-2] <= 2.0, s.asked


# -- 3: a snapshot's error notice ----------------------------------------------------------------


async def test_a_snapshot_error_goes_with_the_error_and_an_action_answer_stays(
    tmp_path: Path,
) -> None:
    """A snapshot's error is shown until a snapshot comes without one; an action's answer stays
    through later snapshots, and a snapshot's error replaces it."""
    a = rollout("hello-20261206-100000-aaaa")
    async with stand_in() as (s, base), chromium(tmp_path / "profile") as page:
        await s.show(snapshot(a, a, error="the fleet's nodes cannot be read: timed out"))
        await page.get(f"{base}/")
        await page.wait_for(lambda: notice(page), lambda t: "cannot be read" in t, timeout=10,
                            what="the snapshot's error")
        await s.show(snapshot(a, a))
        await page.wait_for(lambda: notice(page), lambda t: t == "", timeout=5,
                            what="the error gone")

        await page.click(PAUSE)
        await page.wait_for(lambda: notice(page), lambda t: "done by alice" in t, timeout=5,
                            what="the pause's answer")
        await s.show(snapshot(dict(a, phase="updating"), a))
        await page.wait_for(lambda: page.text("#rollout-head"), lambda t: "phase updating" in t,
                            timeout=5, what="the next snapshot")
        assert await notice(page) == f"pause of {a['id']}: done by alice"
        await s.show(snapshot(a, a, error="no leader"))
        await page.wait_for(lambda: notice(page), lambda t: t == "no leader", timeout=5,
                            what="a new error")


async def test_an_action_answered_by_a_proxys_page_says_it_may_or_may_not_be_done(
    tmp_path: Path,
) -> None:
    """An answer that is not the coordinator's JSON (a proxy's 502 page) said "was not sent ...
    may be restarting", though the request went out: it says it may or may not be carried out."""
    a = rollout("hello-20261206-100000-aaaa")
    async with stand_in() as (s, base), chromium(tmp_path / "profile") as page:
        await s.show(snapshot(a, a))
        await page.get(f"{base}/")
        await shown(page, a["id"])
        s.gateway = True
        await page.click(PAUSE)
        said = await page.wait_for(lambda: notice(page), lambda t: "HTTP 502" in t, timeout=5,
                                   what="the proxy's answer said")
        assert said.startswith(f"pause of {a['id']}: no answer from the coordinator (HTTP 502")
        assert "may or may not be carried out" in said and "was not sent" not in said
        assert s.actions == [f"/api/rollouts/{a['id']}/pause"]


# -- 4: the nodes of a rollout, in the server's order ----------------------------------------------


async def test_rollout_nodes_keep_the_servers_order(tmp_path: Path) -> None:
    """The node rows of a rollout come in the order the snapshot lists them (the server puts
    those in motion first), not sorted by id."""
    nodes = {"node-4711": node_row("failed"), "node-12": node_row("rolling_back"),
             "node-3": node_row("updating", online=False), "node-1": node_row("done"),
             "node-2": node_row("done")}
    a = rollout("hello-20261206-100000-aaaa", nodes=nodes)
    async with stand_in() as (s, base), chromium(tmp_path / "profile") as page:
        await s.show(snapshot(a, a))
        await page.get(f"{base}/")
        await shown(page, a["id"])
        rows = await page.js("return [...document.querySelectorAll('#rollout-nodes tbody tr')]"
                             ".map((r) => r.dataset.node);")
        assert rows == list(nodes), rows
