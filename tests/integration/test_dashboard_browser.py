"""The dashboard in a real headless chromium, on a dev fleet of 3 real agents under real traffic.

The coordinator serves ``--http 127.0.67.100:PORT --http-tokens FILE`` (a token made by the real
``fleetwave auth add-web-token``); agents bind 127.0.67.1..3. The page is loaded once: a marker
set on ``window`` after the load must survive to the end, so every change seen came through the
page's live stream, never a reload.

Screenshots go to the test's tmp dir (paths printed; run with -s). With
``FLEETWAVE_SCREENSHOT_DIR`` set, the mid-rollout one is also written there as
``dashboard.png`` (the README's picture: ``deploy/docs/dashboard.png``).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from coordinator.dev.broker import free_port
from coordinator.dev.devfleet import DevFleet
from tests.integration.browser import Browser, chromium
from tests.integration.e2e_support import (
    deploy_detached,
    install,
    loaded,
    push,
    status,
    told,
)
from tests.integration.procs import fleetwave, reaping, spawn_coordinator, wait_until

SUBNET = "127.0.67"
HTTP_HOST = "127.0.67.100"
MARKER = "loaded-once"
ABORT = '#actions button[data-verb="abort"]'
PASSED = '#waves tbody td[data-state="passed"]'


async def add_token(directory: Path, name: str) -> tuple[str, Path]:
    code, out, err = await fleetwave("auth", "add-web-token", str(directory), name, "-o", "json")
    assert code == 0, err
    doc = json.loads(out)
    return str(doc["token"]), Path(doc["file"])


def _call(url: str, method: str, token: str | None,
          body: bytes = b"{}") -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, method=method, data=body if method == "POST" else None)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5.0) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def call(url: str, method: str = "GET", token: str | None = None,
               body: bytes = b"{}") -> tuple[int, dict[str, Any]]:
    return await asyncio.to_thread(_call, url, method, token, body)


def _read_stream(url: str, opened: threading.Event) -> int:
    """Read a server-sent event stream to its end; the number of snapshots it carried.
    ``opened`` is set at the first one."""
    seen = 0
    with urllib.request.urlopen(url, timeout=15.0) as resp:
        for raw in resp:
            seen += raw.startswith(b"event: snapshot")
            if seen:
                opened.set()
    return seen


def severe(entries: list[dict[str, Any]]) -> list[str]:
    return [str(e["message"]) for e in entries if e.get("level") == "SEVERE"]


async def passed_waves(page: Browser) -> int:
    return int(await page.js(f"return document.querySelectorAll('{PASSED}').length;"))


async def abort(page: Browser) -> None:
    """Click Abort, and again once it asks 'Really abort?' (a slip does not abort)."""
    assert await page.attr(ABORT, "disabled") == "", "the rollout ended before the abort"
    await page.click(ABORT)
    await page.wait_for(lambda: page.text(ABORT), lambda t: t == "Really abort?", timeout=5,
                        what="the abort button asking to confirm")
    await page.click(ABORT)


async def marker(page: Browser) -> str:
    return str(await page.js("return window.__fleetwaveMarker || 'reloaded';"))


def readme_copy(shot: Path) -> None:
    target = os.environ.get("FLEETWAVE_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        dest = Path(target) / "dashboard.png"
        shutil.copyfile(shot, dest)
        print(f"screenshot for the README: {dest} ({dest.stat().st_size} bytes)")


async def test_dashboard_follows_a_canary_live_and_only_an_operator_aborts_it(
    tmp_path: Path,
) -> None:
    """The page loads without console errors, shows a canary pass wave after wave without a
    reload, refuses an anonymous abort and a wrong token with one line (the rollout runs on),
    and aborts it with the operator's token: the rollout ends aborted, by that operator."""
    token, tokens_file = await add_token(tmp_path / "web", "alice")
    port = free_port(HTTP_HOST)
    base = f"http://{HTTP_HOST}:{port}"
    fleet = DevFleet(tmp_path / "fleet", agents=3, subnet=SUBNET, heartbeat_interval=0.5)
    fleet.coordinator.argv += ["--http", f"{HTTP_HOST}:{port}", "--http-tokens", str(tokens_file)]
    screens = tmp_path / "screens"
    async with fleet:
        url = fleet.nats_url
        await push(url, "1.0.0", "2.0.0")
        await install(fleet, "1.0.0")
        async with loaded(fleet, rate=15.0), chromium(tmp_path / "profile") as page:
            await page.get(f"{base}/")
            await page.wait_for(lambda: page.attr("#rollout-state", "data-state"),
                                lambda s: s == "succeeded", timeout=20,
                                what="the install rollout, succeeded")
            await page.wait_for(
                lambda: page.js("return document.querySelectorAll("
                                "'#nodes tbody td[data-state=\"online\"]').length;"),
                lambda n: n == 3, timeout=10, what="3 nodes online")
            assert "hello@1.0.0" in await page.text("#nodes tbody")
            await page.js(f"window.__fleetwaveMarker = '{MARKER}';")

            # Bakes long enough that the last wave still runs while the test, on a loaded
            # machine, checks the chart and takes its screenshot before it aborts.
            rid = await deploy_detached(
                url, "2.0.0", "--strategy", "canary", "--weights", "25,50,100", "--bake", "10s",
                "--max-error-rate", "5%", "--min-requests", "5")
            await page.wait_for(lambda: page.text("#rollout-id"), lambda t: t == rid,
                                timeout=10, what=f"rollout {rid} shown")
            # Wave by wave: 1 passed, then 2 passed, each seen while the rollout still runs.
            await page.wait_for(lambda: passed_waves(page), lambda n: n >= 1, timeout=60,
                                what="wave 0 passed")
            assert await page.attr("#rollout-state", "data-state") == "running"
            assert await page.text("#waves tbody tr[data-wave='1'] td[data-state]") in (
                "waiting", "updating", "baking"), await page.text("#waves tbody")
            assert severe(await page.console()) == []

            # Anonymous: refused with one line in the page; nothing changes.
            await abort(page)
            refused = await page.wait_for(lambda: page.text("#notice"),
                                          lambda t: "refused (401)" in t, timeout=10,
                                          what="the anonymous abort refused")
            assert "no operator token given" in refused, refused
            assert (await status(url, rid))["state"] == "running"
            # A wrong token: refused as well, and the page stays read-only.
            await page.type("#token", "fwt_not-a-token")
            await page.click("#token-save")
            wrong = await page.wait_for(lambda: page.text("#notice"),
                                        lambda t: "token refused (401)" in t, timeout=10,
                                        what="the wrong token refused")
            assert "not valid" in wrong and await page.text("#who") == "read-only"
            code, body = await call(f"{base}/api/rollouts/{rid}/abort", "POST", "fwt_not-a-token")
            assert code == 401 and "not valid" in body["error"]
            assert (await status(url, rid))["state"] == "running"
            # The operator's token.
            await page.type("#token", token)
            await page.click("#token-save")
            await page.wait_for(lambda: page.text("#who"), lambda t: t == "operator: alice",
                                timeout=10, what="signed in as alice")

            await page.wait_for(lambda: passed_waves(page), lambda n: n >= 2, timeout=60,
                                what="wave 1 passed")
            assert await page.attr("#rollout-state", "data-state") == "running", \
                "the canary ended before the page showed it wave by wave"
            chart = await page.js("return document.querySelectorAll("
                                  "'#chart-errors circle.new').length;")
            assert chart >= 2, "the error-rate chart has no points of the new version"
            shot = await page.screenshot(screens / "dashboard-running.png")
            readme_copy(shot)

            await abort(page)
            await page.wait_for(lambda: page.attr("#rollout-state", "data-state"),
                                lambda s: s == "aborted", timeout=20, what="the rollout aborted")
            await page.wait_for(lambda: page.text("#events"), lambda t: "(by alice)" in t,
                                timeout=10, what="the abort's event by alice")
            assert await marker(page) == MARKER, "the page was reloaded"
            await page.screenshot(screens / "dashboard-aborted.png")
            left = severe(await page.console())
            assert all("401" in m for m in left), left  # the two refused requests only
        st = await status(url, rid)
        assert st["state"] == "aborted" and st["aborted_by"] == "alice", st
        evs = await told(url, rid, "rollout.aborted")
        assert [e["who"] for e in evs if e["kind"] == "rollout.aborted"] == ["alice"]


async def test_tokens_are_checked_reread_on_change_and_bad_files_refused(tmp_path: Path) -> None:
    """Without a bus: a wrong token is 401 with one line, the right one names its operator, a
    revocation takes effect without a restart, a read-only dashboard answers 403; a malformed
    or unreadable token file, or a bad token name, is one line and exit 2."""
    token, tokens_file = await add_token(tmp_path / "web", "bob")
    port = free_port(HTTP_HOST)
    base = f"http://{HTTP_HOST}:{port}"
    coord = spawn_coordinator("nats://127.0.0.1:1", tmp_path, extra=[
        "coordinator", "--key-file", str(tmp_path / "k.seed"), "--http", f"{HTTP_HOST}:{port}",
        "--http-tokens", str(tokens_file)])
    async with reaping(coord):
        await wait_until(lambda: call(f"{base}/healthz"), lambda r: r[0] == 200, timeout=15,
                         what="/healthz")
        assert await call(f"{base}/api/whoami", token=token) == (200, {"name": "bob"})
        code, body = await call(f"{base}/api/whoami", token="fwt_wrong")
        assert code == 401 and body["error"].startswith("the operator token is not valid")
        code, body = await call(f"{base}/api/rollouts/x/abort", "POST")
        assert code == 401 and "no operator token given" in body["error"]
        code, body = await call(f"{base}/api/rollouts/x/abort", "POST", token)
        assert code == 503 and "not connected" in body["error"]  # authorized; no bus to send on
        code, body = await call(f"{base}/api/rollouts/x/promote", "POST", token, b"[1")
        assert code == 400 and "not JSON" in body["error"]
        code, body = await call(f"{base}/api/rollouts/x/explode", "POST", token)
        assert code == 404 and "the actions are pause, resume, promote, abort" in body["error"]
        code, body = await call(f"{base}/api/rollouts", "GET")
        assert code == 503 and "not set up yet" in body["error"]
        code, body = await call(f"{base}/api/whoami", token="x")
        code2, body2 = await call(f"{base}/api/whoami", token="x" * 1000)
        assert (code, code2) == (401, 401) and "too long" in body2["error"]
        code, _, err = await fleetwave("auth", "revoke-web-token", str(tmp_path / "web"), "bob")
        assert code == 0, err
        code, body = await call(f"{base}/api/whoami", token=token)
        assert code == 401, body
        tokens_file.write_text("{not json")
        code, body = await call(f"{base}/api/whoami", token=token)
        assert code == 401 and "cannot read its token file" in body["error"]
        # An open stream does not hold a stopping coordinator up: it is ended at once.
        opened = threading.Event()
        reader = asyncio.create_task(
            asyncio.to_thread(_read_stream, f"{base}/api/stream", opened))
        assert await asyncio.to_thread(opened.wait, 15.0), "the stream carried no snapshot"
        started = time.monotonic()
        assert await coord.stop(timeout=10.0) == 0
        took = time.monotonic() - started
        snapshots = await asyncio.wait_for(reader, 5.0)
        assert snapshots >= 1 and took < 4.0, f"stopped in {took:.1f}s, {snapshots} snapshots"

    other = free_port(HTTP_HOST)
    ro = spawn_coordinator("nats://127.0.0.1:1", tmp_path / "ro", extra=[
        "coordinator", "--key-file", str(tmp_path / "k.seed"), "--http", f"{HTTP_HOST}:{other}"])
    async with reaping(ro):
        await wait_until(lambda: call(f"http://{HTTP_HOST}:{other}/healthz"),
                         lambda r: r[0] == 200, timeout=15, what="/healthz")
        code, body = await call(f"http://{HTTP_HOST}:{other}/api/rollouts/x/abort", "POST", token)
        assert code == 403 and "read-only" in body["error"]

    for bad, why in ((tokens_file, "is not a web token file"),
                     (tmp_path / "missing.json", "cannot read it")):
        code, _, err = await fleetwave("--nats", "nats://127.0.0.1:1", "coordinator", "--key-file",
                                       str(tmp_path / "k.seed"), "--http", f"{HTTP_HOST}:{port}",
                                       "--http-tokens", str(bad))
        assert code == 2 and why in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
    code, _, err = await fleetwave("auth", "add-web-token", str(tmp_path / "web"), "coordinator")
    assert code == 2 and "the coordinator's own" in err and "Traceback" not in err
    code, _, err = await fleetwave("auth", "add-web-token", str(tmp_path / "web2"), "a.b")
    assert code == 2 and "Traceback" not in err
