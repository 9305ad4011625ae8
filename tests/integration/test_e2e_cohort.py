"""End to end: a canary by users (``--cohort-key``) on a dev fleet of 4 real agents running the
example ``hello`` service behind their routers (127.0.70.i:8080), driven with the real CLI.

1000 users, told apart by an ``X-User`` header, each send 6 requests spread over all 4 nodes per
round (every node at least once); a few are allow-listed (``X-Beta: 1``). A round runs while a
step bakes (the test waits for the wave to bake, runs the round, then ``promote``s past the rest
of the bake), so every request of a round meets one weight on every node. What must hold: every
user saw exactly one version within a step, about the step's weight of users saw the new one,
the allow-listed always did, users only moved old -> new between steps; and after a failed gate
every user is back on the old version, with no failed request but the new version's own errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.dev.devfleet import DevFleet
from tests.integration.procs import fleetwave, hello_bundle, wait_until

SUBNET = "127.0.70"
AGENTS = 4
PORT = 8080
USERS = 1000  # the share of users on the new version is then within ±5 points at 4 sigma
PER_USER = 6  # requests per user per round, over nodes (u + k) % AGENTS: each node at least once
WORKERS = 24  # concurrent clients, each with a keep-alive connection per node
BETA = frozenset(f"u{i}" for i in range(0, USERS, 50))  # allow-listed (X-Beta: 1)
DEPLOY_TIMEOUT = 120.0


@dataclass
class Answer:
    user: str
    node: int
    status: int  # 0: the request failed without an HTTP answer
    version: str
    at: float


@dataclass
class Round:
    answers: list[Answer] = field(default_factory=list)

    def versions(self) -> dict[str, set[str]]:
        seen: dict[str, set[str]] = defaultdict(set)
        for a in self.answers:
            seen[a.user].add(a.version)
        return seen

    def nodes(self) -> dict[str, set[int]]:
        seen: dict[str, set[int]] = defaultdict(set)
        for a in self.answers:
            seen[a.user].add(a.node)
        return seen


class Client:
    """One keep-alive HTTP/1.1 connection per node; GET / as a user."""

    def __init__(self, fleet: DevFleet) -> None:
        self.fleet = fleet
        self.conns: dict[int, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
        self.cookies: list[str] = []  # every Set-Cookie value received

    async def get(
        self, node: int, user: str, *, jar: dict[str, str] | None = None, extra: str = "",
    ) -> tuple[int, str]:
        """GET / on ``node`` as ``user``: by its X-User header, or (``jar``) as a browser that
        keeps the cookies it is given, sending no X-User. ``extra``: more header lines."""
        if jar is None:
            beta = "X-Beta: 1\r\n" if user in BETA else ""
            who = f"X-User: {user}\r\n{beta}"
        else:
            who = "".join(f"Cookie: {k}={v}\r\n" for k, v in jar.items())
        request = f"GET / HTTP/1.1\r\nHost: hello\r\n{who}{extra}\r\n".encode()
        for attempt in (0, 1):  # a keep-alive connection the far end closed: one fresh try
            try:
                async with asyncio.timeout(10.0):
                    conn = self.conns.get(node)
                    if conn is None:
                        conn = await asyncio.open_connection(self.fleet.host(node), PORT)
                        self.conns[node] = conn
                    reader, writer = conn
                    writer.write(request)
                    head = await reader.readuntil(b"\r\n\r\n")
                    status = int(head.split(b" ", 2)[1])
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                        elif name.strip().lower() == b"set-cookie" and jar is not None:
                            self.cookies.append(value.decode().strip())
                            k, _, rest = value.decode().strip().partition("=")
                            jar[k] = rest.split(";", 1)[0]
                    body = await reader.readexactly(length)
                    return status, str(json.loads(body).get("version", "?"))
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                self.close(node)
                if attempt == 1:
                    return 0, f"<{exc.__class__.__name__}>"
        return 0, "<unreachable>"

    def close(self, node: int | None = None) -> None:
        for n in [node] if node is not None else list(self.conns):
            conn = self.conns.pop(n, None) if n is not None else None
            if conn is not None:
                conn[1].close()


async def user_round(
    fleet: DevFleet, clients: list[Client], jars: dict[str, dict[str, str]] | None = None,
) -> Round:
    """Every user sends PER_USER requests, over every node, from WORKERS concurrent clients;
    with ``jars`` each user is a browser with its cookie jar, its requests one after another
    (so that the first answer's cookie goes with the next)."""
    work: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
    if jars is None:
        for k in range(PER_USER):
            for i in range(USERS):
                work.put_nowait((f"u{i}", 1 + (i + k) % AGENTS))
    else:
        for i in range(USERS):
            work.put_nowait((f"u{i}", 1 + i % AGENTS))
    out = Round()

    async def worker(client: Client) -> None:
        while not work.empty():
            user, node = work.get_nowait()
            if jars is None:
                status, version = await client.get(node, user)
                out.answers.append(Answer(user, node, status, version, time.monotonic()))
                continue
            jar = jars.setdefault(user, {})
            for k in range(PER_USER):
                at = 1 + (node - 1 + k) % AGENTS
                status, version = await client.get(at, user, jar=jar)
                out.answers.append(Answer(user, at, status, version, time.monotonic()))

    async with asyncio.timeout(120.0):
        await asyncio.gather(*(worker(c) for c in clients))
    return out


async def status(url: str, rid: str = "") -> dict[str, Any]:
    code, out, err = await fleetwave("status", *([rid] if rid else []), "-o", "json",
                                     nats_url=url)
    assert code == 0, err
    doc: dict[str, Any] = json.loads(out)
    return doc


async def wave_baking(url: str, rid: str, index: int) -> None:
    """Wait until wave ``index`` bakes: every node of it runs its weight."""
    await wait_until(lambda: status(url, rid),
                     lambda st: st["waves"][index]["state"] == "baking",
                     timeout=60, what=f"wave {index + 1} baking", interval=0.2)


async def checked(
    url: str, rid: str, r: Round, weight: int, versions: tuple[str, str], within: float = 0.05,
) -> set[str]:
    """``check_step``, and when it fails, the rollout's state and reason with it: a round that
    finds nobody on the new version most likely ran after the wave failed and rolled back."""
    try:
        return check_step(r, weight, versions, within)
    except AssertionError as exc:
        st = await status(url, rid)
        raise AssertionError(f"{exc} (rollout {st['state']}: {st.get('reason', '')})") from exc


def check_step(
    r: Round, weight: int, versions: tuple[str, str], within: float = 0.05,
) -> set[str]:
    """One version per user within the step; the allow-listed on the new one; the share of
    users on the new one is ``weight`` % ± ``within``. Returns the users on the new version.
    (Each rollout salts the hash anew, so the share is a fresh sample of 980 users every run:
    ±5 points is 4 sigma at 20 %, ±6 is 3.8 sigma at 50 %.)"""
    old, new = versions
    assert all(a.status == 200 for a in r.answers), [a for a in r.answers if a.status != 200][:5]
    assert all(len(n) == AGENTS for n in r.nodes().values())
    seen = r.versions()
    assert len(seen) == USERS
    mixed = {u: v for u, v in seen.items() if len(v) != 1}
    assert not mixed, f"users who saw both versions within a step: {list(mixed.items())[:5]}"
    on_new = {u for u, v in seen.items() if v == {new}}
    assert {u for u, v in seen.items() if v == {old}} | on_new == set(seen)
    assert on_new >= BETA, f"allow-listed users on the old version: {sorted(BETA - on_new)}"
    share = len(on_new - BETA) / (USERS - len(BETA))
    assert abs(share - weight / 100) <= within, f"{share:.1%} of users on {new} at {weight}"
    return on_new


async def test_users_keep_one_version_across_nodes_and_only_move_forward(tmp_path: Path) -> None:
    """--weights 20,50,100 by X-User with an allow list: per step every user sees one version on
    all 4 nodes, 20 % ± 5 / 50 % ± 6 of users are on the new one, allow-listed users always are,
    users on it at 20 are still on it at 50; status says the weight as a share of users."""
    async with DevFleet(tmp_path / "fleet", agents=AGENTS, subnet=SUBNET,
                        heartbeat_interval=0.5) as fleet:
        url = fleet.nats_url
        for v in ("1.0.0", "2.0.0", "2.2.0"):
            code, _, err = await fleetwave("release", "push", str(hello_bundle(v)), nats_url=url)
            assert code == 0, err
        code, out, err = await fleetwave("deploy", "hello", "1.0.0", "--batch", "100%",
                                         "--max-unavailable", "100%", nats_url=url,
                                         timeout=DEPLOY_TIMEOUT)
        assert code == 0, f"{out}{err}"
        clients = [Client(fleet) for _ in range(WORKERS)]
        try:
            code, out, err = await fleetwave(
                "deploy", "hello", "2.0.0", "--strategy", "canary", "--weights", "20,50,100",
                "--cohort-key", "header:X-User", "--allow", "header:X-Beta=1", "--bake", "5m",
                "--max-unavailable", "100%", "--detach", nats_url=url)
            assert code == 0, f"{out}{err}"
            rid = out.strip()
            await wave_baking(url, rid, 0)
            at20 = await checked(url, rid, await user_round(fleet, clients), 20,
                                 ("1.0.0", "2.0.0"))
            code, out, err = await fleetwave("status", rid, nats_url=url)
            assert "20 % of users (header X-User; no key: client IP)" in out, out
            assert (await fleetwave("promote", rid, nats_url=url))[0] == 0
            await wave_baking(url, rid, 1)
            at50 = await checked(url, rid, await user_round(fleet, clients), 50,
                                 ("1.0.0", "2.0.0"), 0.06)
            assert at20 <= at50, f"users moved back new -> old: {sorted(at20 - at50)[:5]}"
            assert (await fleetwave("promote", rid, nats_url=url))[0] == 0
            await wave_baking(url, rid, 2)
            assert (await fleetwave("promote", rid, nats_url=url))[0] == 0
            await wait_until(lambda: status(url, rid), lambda st: st["state"] == "succeeded",
                             timeout=60, what="the canary succeeding")
            done = await user_round(fleet, clients)
            assert {a.version for a in done.answers} == {"2.0.0"}
            assert all(a.status == 200 for a in done.answers)

            # A release that fails its gate: every user is back on the old version, and no
            # request failed but those 2.2.0 answered with its own 500s.
            rounds: list[Round] = []
            stop = asyncio.Event()

            async def keep_sending() -> None:
                while not stop.is_set():
                    rounds.append(await user_round(fleet, clients))

            sender = asyncio.create_task(keep_sending())
            try:
                code, out, err = await fleetwave(
                    "deploy", "hello", "2.2.0", "--strategy", "canary", "--weights", "20,100",
                    "--cohort-key", "header:X-User", "--allow", "header:X-Beta=1",
                    "--bake", "3s", "--max-error-rate", "5%", "--min-requests", "20",
                    "--max-unavailable", "100%", nats_url=url, timeout=DEPLOY_TIMEOUT)
            finally:
                stop.set()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait_for(sender, 120.0)
            assert code == 3, f"2.2.0 should be rolled back, got {code}: {out}{err}"
            # The gates' report says who the sides were at the wave's weight: ~20 % of the 980
            # users the key decides new (the allow-listed are counted as "allowed" requests),
            # the rest old (KMV estimates within ~9 %: ±35 % is about 4 sigma for both the
            # sample and the sketch), no request without the key.
            g = (await status(url))["waves"][0]["gates"]
            assert g["outcome"] == "fail" and g["fallback_requests"] == 0, g
            assert g["allowed"] > 0, g
            assert 0.65 * 196 <= g["users_new"] <= 1.35 * 196, g
            assert 0.65 * 784 <= g["users_old"] <= 1.35 * 784, g
            answers = [a for r in rounds for a in r.answers]
            assert answers
            bad = [a for a in answers if a.status != 200 and a.version != "2.2.0"]
            assert not bad, f"failed requests not answered by 2.2.0: {bad[:5]}"
            assert any(a.version == "2.2.0" for a in answers), "nobody was on the canary"
            after = await user_round(fleet, clients)
            assert {a.version for a in after.answers} == {"2.0.0"}
            assert all(a.status == 200 for a in after.answers)
        finally:
            for c in clients:
                c.close()


async def test_anonymous_browsers_get_a_cohort_cookie_and_keep_their_version(
    tmp_path: Path,
) -> None:
    """--cohort-key cookie:fw_cohort --assign-cookie: browsers without the cookie get one on
    their first answer (HttpOnly, SameSite=Lax, Path=/, Max-Age), are routed by it, and keep one
    version on all 4 nodes; 20 % ± 5 of them get the new one. Then a shadow's --preview: a
    tester's header reaches the staged release, nobody else does. Then a first step of weight 0
    for allow-listed users only, and a deny list (``beta_first_and_deny``)."""
    async with DevFleet(tmp_path / "fleet", agents=AGENTS, subnet=SUBNET,
                        heartbeat_interval=0.5) as fleet:
        url = fleet.nats_url
        for v in ("1.0.0", "2.0.0"):
            code, _, err = await fleetwave("release", "push", str(hello_bundle(v)), nats_url=url)
            assert code == 0, err
        code, out, err = await fleetwave("deploy", "hello", "1.0.0", "--batch", "100%",
                                         "--max-unavailable", "100%", nats_url=url,
                                         timeout=DEPLOY_TIMEOUT)
        assert code == 0, f"{out}{err}"
        clients = [Client(fleet) for _ in range(WORKERS)]
        try:
            code, out, err = await fleetwave(
                "deploy", "hello", "2.0.0", "--strategy", "canary", "--weights", "20,100",
                "--cohort-key", "cookie:fw_cohort", "--assign-cookie", "--bake", "5m",
                "--max-unavailable", "100%", "--detach", nats_url=url)
            assert code == 0, f"{out}{err}"
            rid = out.strip()
            await wave_baking(url, rid, 0)
            jars: dict[str, dict[str, str]] = {}
            r = await user_round(fleet, clients, jars)
            cookies = [c for client in clients for c in client.cookies]
            assert len(cookies) == USERS, f"{len(cookies)} cookies for {USERS} browsers"
            for attr in ("Path=/", "Max-Age=2592000", "HttpOnly", "SameSite=Lax"):
                assert all(attr in c for c in cookies), cookies[:2]
            assert all(set(j) == {"fw_cohort"} for j in jars.values())
            assert all(a.status == 200 for a in r.answers)
            seen = r.versions()
            mixed = {u: v for u, v in seen.items() if len(v) != 1}
            assert not mixed, f"browsers that saw both versions: {list(mixed.items())[:5]}"
            share = sum(v == {"2.0.0"} for v in seen.values()) / USERS
            assert abs(share - 0.20) <= 0.05, f"{share:.1%} of browsers on 2.0.0 at weight 20"
            again = await user_round(fleet, clients, jars)  # the same browsers come back
            assert again.versions() == seen
            assert len([c for client in clients for c in client.cookies]) == USERS
            code, out, err = await fleetwave("abort", rid, nats_url=url)
            assert code == 0, f"{out}{err}"
            await wait_until(lambda: status(url, rid), lambda st: st["state"] != "running",
                             timeout=30, what="the canary aborted")

            # Preview: a shadow stages 2.0.0 at weight 0; only the tester's header reaches it.
            code, out, err = await fleetwave(
                "deploy", "hello", "2.0.0", "--strategy", "shadow", "--mirror", "10%",
                "--preview", "header:X-QA=yes", "--bake", "5m", "--max-unavailable", "100%",
                "--detach", nats_url=url)
            assert code == 0, f"{out}{err}"
            rid = out.strip()
            await wave_baking(url, rid, 0)
            for node in range(1, AGENTS + 1):
                tester = [await clients[0].get(node, "qa", extra="X-QA: yes\r\n")
                          for _ in range(5)]
                others = [await clients[0].get(node, f"u{i}") for i in range(20)]
                assert {v for _, v in tester} == {"2.0.0"}, tester
                assert {v for _, v in others} == {"1.0.0"}, others
            code, out, err = await fleetwave("abort", rid, nats_url=url)
            assert code == 0, f"{out}{err}"
            await wait_until(lambda: status(url, rid), lambda st: st["state"] != "running",
                             timeout=30, what="the shadow aborted")
            await beta_first_and_deny(url, clients)
        finally:
            for c in clients:
                c.close()


async def beta_first_and_deny(url: str, clients: list[Client]) -> None:
    """--weights 0,10,100 --allow header:X-Beta=1 --deny header:X-Tier=gold: at weight 0 only
    the beta users reach the new version; at 10 the key's users join them, and no gold user
    does, whatever their bucket."""
    code, out, err = await fleetwave(
        "deploy", "hello", "2.0.0", "--strategy", "canary", "--weights", "0,10,100",
        "--cohort-key", "header:X-User", "--allow", "header:X-Beta=1",
        "--deny", "header:X-Tier=gold", "--bake", "5m", "--max-unavailable", "100%",
        "--detach", nats_url=url)
    assert code == 0, f"{out}{err}"
    rid = out.strip()
    await wave_baking(url, rid, 0)
    c = clients[0]
    for node in range(1, AGENTS + 1):
        beta = {(await c.get(node, f"u{i}"))[1] for i in sorted(int(u[1:]) for u in BETA)}
        others = {(await c.get(node, f"u{i}"))[1] for i in range(1, 200, 7)
                  if f"u{i}" not in BETA}
        assert beta == {"2.0.0"} and others == {"1.0.0"}, (node, beta, others)
    assert (await fleetwave("promote", rid, nats_url=url))[0] == 0
    await wave_baking(url, rid, 1)
    gold: set[str] = set()
    plain: set[str] = set()
    for i in range(1, 400):
        if f"u{i}" in BETA:
            continue
        gold.add((await c.get(1 + i % AGENTS, f"u{i}", extra="X-Tier: gold\r\n"))[1])
        plain.add((await c.get(1 + i % AGENTS, f"u{i}"))[1])
    assert gold == {"1.0.0"}, "a deny-listed user reached the new version"
    assert plain == {"1.0.0", "2.0.0"}, plain
    code, out, err = await fleetwave("abort", rid, nats_url=url)
    assert code == 0, f"{out}{err}"
