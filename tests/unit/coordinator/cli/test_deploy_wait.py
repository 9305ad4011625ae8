"""``fleetwave deploy --wait done|switched|started``: when a followed deploy returns, what it
says then, and the one line a bad value gets."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner

import coordinator.cli.rollout_cmds as rollout_cmds
from coordinator.cli import main
from coordinator.cli.base import cli
from coordinator.errors import RemoteError
from tests.unit.coordinator.cli.stand_in import Status, stand_in

SWITCH = {"at": 1000.0, "wave": 1, "first": 1000.01, "last": 1000.02, "spread": 0.01,
          "lag": 0.02, "nodes": {"node-1": 1000.01, "node-2": 1000.02}}


def status(state: str = "running", waves: tuple[str, ...] = ("waiting", "waiting"),
           switch: dict[str, Any] | None = None, strategy: str = "blue-green") -> dict[str, Any]:
    return {"id": "hello-r1", "service": "hello", "version": "2.0.0", "from_version": "1.0.0",
            "strategy": strategy, "state": state, "reason": "", "phase": "forward",
            "current_wave": 0, "report": {"switch": switch} if switch else {},
            "waves": [{"index": i, "nodes": ["node-1", "node-2"], "weight": 100, "state": s,
                       "started": 0.0, "finished": 0.0, "gates": {}}
                      for i, s in enumerate(waves)],
            "nodes": {}}


STAGING = status(waves=("updating", "waiting"))
SWITCHED = status(waves=("passed", "baking"), switch=SWITCH)
WARM = status(waves=("passed", "passed"), switch={**SWITCH, "warm_until": 1300.0})
DONE = status(state="succeeded", waves=("passed", "passed"), switch=SWITCH)


def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        statuses: list[dict[str, Any]], *args: str) -> tuple[int, str, str, int]:
    """Exit code, stdout, stderr and how many statuses were read, of ``deploy ARGS`` against a
    stand-in coordinator whose status polls answer ``statuses`` in turn (the last repeated)."""
    polls: Iterator[dict[str, Any]] = iter(statuses)
    seen = [0]

    def request(ctx: object, verb: str, body: object, **kw: object) -> dict[str, str]:
        assert verb == "deploy"
        return {"id": "hello-r1"}

    async def call(ctx: object, verb: str, body: object, **kw: object) -> dict[str, Any]:
        assert verb == "status"
        seen[0] += 1
        return next(polls, statuses[-1])

    stand_in(monkeypatch, request, call)
    monkeypatch.setattr(rollout_cmds, "POLL", 0.0)
    with pytest.raises(SystemExit) as info:
        main(["--nats", "nats://127.0.0.1:1", "deploy", "hello", "2.0.0", *args])
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err, seen[0]


def test_blue_green_returns_at_the_switch_by_default(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """A followed blue-green deploy returns 0 once every node switched (not after the warm
    window), saying until when a rollback is an instant switch back and how to ask for it."""
    code, out, _, polls = run(monkeypatch, capsys, [STAGING, SWITCHED, WARM, DONE],
                              "--strategy", "blue-green", "--scale-down-delay", "5m")
    assert (code, polls) == (0, 2)
    assert "rollout hello-r1 switched" in out
    assert "'fleetwave rollback hello'" in out and "'fleetwave status hello-r1'" in out
    assert "until" in out and "(--scale-down-delay 5m)" in out


def test_wait_done_follows_blue_green_to_its_end(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """--wait done keeps following through the warm window until the rollout succeeds."""
    code, _, _, polls = run(monkeypatch, capsys, [STAGING, SWITCHED, WARM, DONE],
                            "--strategy", "blue-green", "--wait", "done")
    assert (code, polls) == (0, 4)


def test_wait_started_returns_once_the_first_wave_moves(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """--wait started returns 0 once the first wave updates its nodes, saying how to follow."""
    pending = status(strategy="rolling")
    moving = status(strategy="rolling", waves=("updating", "waiting"))
    code, out, _, polls = run(monkeypatch, capsys, [pending, moving, DONE], "--wait", "started",
                              "-o", "json")
    assert (code, polls) == (0, 2)
    assert json.loads(out)["waves"][0]["state"] == "updating"


def test_an_end_before_the_wait_point_keeps_its_exit_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """A blue-green rollout rolled back while staging exits 3, as without --wait."""
    back = status(state="rolled_back", waves=("failed", "waiting"))
    code, _, _, _ = run(monkeypatch, capsys, [STAGING, back], "--strategy", "blue-green")
    assert code == 3


def test_rolling_follows_to_the_end_by_default(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """Without a switch to wait for, the default stays done."""
    moving = status(strategy="rolling", waves=("updating", "waiting"))
    code, _, _, polls = run(monkeypatch, capsys, [moving, moving, DONE])
    assert (code, polls) == (0, 3)


@pytest.mark.parametrize(
    ("args", "line"),
    [
        pytest.param(["--wait", "forever"], "Invalid value for '--wait': 'forever' is not one of "
                     "'done', 'switched', 'started'.", id="unknown-value"),
        pytest.param(["--wait", "switched"], "--wait switched is for a rollout that switches "
                     "every node at once (--strategy blue-green, or shadow --then blue-green); "
                     "use --wait done or started", id="switched-without-a-switch"),
        pytest.param(["--wait", "started", "--detach"], "--wait and --detach contradict each "
                     "other: --detach returns at once; leave one out", id="with-detach"),
    ],
)
def test_a_bad_wait_is_one_usage_line(
    args: list[str], line: str, capsys: pytest.CaptureFixture[str],
) -> None:
    """A value that does not exist, switched without a switch, or --wait with --detach exit 2
    with one line, before anything is sent."""
    with pytest.raises(SystemExit) as info:
        main(["--nats", "nats://127.0.0.1:1", "deploy", "hello", "2.0.0", *args])
    out, err = capsys.readouterr()
    assert info.value.code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and line in err, err


def test_wait_is_documented_in_help() -> None:
    """``deploy --help`` names the three wait points and blue-green's default."""
    result = CliRunner().invoke(cli, ["deploy", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "--wait [done|switched|started]" in text and "blue-green" in text


def accepted(monkeypatch: pytest.MonkeyPatch, status: Status | None = None) -> None:
    """The coordinator recorded the rollout but could not start it (a bus error)."""
    def request(ctx: object, verb: str, body: object, **kw: object) -> dict[str, str]:
        raise RemoteError("rollout hello-r1 is recorded but its start failed (NATS is away); "
                          "the coordinator starts it on its next resync: check with "
                          "'fleetwave status hello-r1'", "accepted", {"id": "hello-r1"})

    stand_in(monkeypatch, request, status)


def test_a_detached_deploy_accepted_but_not_started_exits_5(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """--detach prints the id (the rollout exists) and one line saying its start is not
    confirmed, and exits 5, not 1 (which would tell a pipeline nothing happened)."""
    accepted(monkeypatch)
    with pytest.raises(SystemExit) as info:
        main(["--nats", "nats://127.0.0.1:1", "deploy", "hello", "2.0.0", "--detach"])
    out, err = capsys.readouterr()
    assert (info.value.code, out) == (rollout_cmds.EXIT_ACCEPTED, "hello-r1\n")
    assert info.value.code == 5
    assert len(err.splitlines()) == 1 and "'fleetwave status hello-r1'" in err, err


def test_a_followed_deploy_accepted_but_not_started_follows_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """Followed, the accepted rollout is followed as any other: its end gives the exit code."""
    async def call(ctx: object, verb: str, body: object, **kw: object) -> dict[str, Any]:
        return DONE

    accepted(monkeypatch, call)
    monkeypatch.setattr(rollout_cmds, "POLL", 0.0)
    with pytest.raises(SystemExit) as info:
        main(["--nats", "nats://127.0.0.1:1", "deploy", "hello", "2.0.0", "--wait", "done"])
    _, err = capsys.readouterr()
    assert info.value.code == 0 and "is recorded but its start failed" in err, err


def test_a_followed_deploy_listens_before_it_asks_on_one_connection(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """The rollout's events are subscribed to before the deploy is sent (none of its first
    ones passes unheard), and the request and the follow share that one connection."""
    async def call(ctx: object, verb: str, body: object, **kw: object) -> dict[str, Any]:
        return DONE

    log = stand_in(monkeypatch, lambda *a, **k: {"id": "hello-r1"}, call)
    monkeypatch.setattr(rollout_cmds, "POLL", 0.0)
    with pytest.raises(SystemExit) as info:
        main(["--nats", "nats://127.0.0.1:1", "deploy", "hello", "2.0.0", "--wait", "done"])
    assert info.value.code == 0, capsys.readouterr().err
    subscribed = [e for e in log if e.startswith("subscribe ")]
    assert len(subscribed) == len(rollout_cmds.FOLLOWED_KINDS)
    assert log == ["connect", *subscribed, "deploy on it", "status on it"], log


def test_a_deploy_that_cannot_reach_nats_says_so_in_one_line_and_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    said = "cannot reach NATS at nats://127.0.0.1:1 (no answer within 3s); start a broker"
    log = stand_in(monkeypatch, lambda *a, **k: {"id": "hello-r1"}, unreachable=said)
    with pytest.raises(SystemExit) as info:
        main(["--nats", "nats://127.0.0.1:1", "deploy", "hello", "2.0.0"])
    out, err = capsys.readouterr()
    assert (info.value.code, out, err) == (1, "", f"fleetwave: {said}\n")
    assert log == ["connect"]  # nothing was asked


def test_exit_codes_are_documented_in_help() -> None:
    """``deploy --help`` lists every exit code, 5 included."""
    text = " ".join(CliRunner().invoke(cli, ["deploy", "--help"]).output.split())
    assert "5 the rollout was recorded but its start is not confirmed" in text, text


def brief(state: str, nodes: dict[str, dict[str, Any]], done: int) -> dict[str, Any]:
    """A status of a 300-node rolling rollout as a follow reads it (``max_nodes``)."""
    rows = {n: {"state": s["state"], "version": "2.0.0", "healthy": False, "online": True,
                "wave": 0, "generation": 3, "slot": "b", "reason": s.get("reason", ""),
                "staged": ""} for n, s in nodes.items()}
    return {**status(state=state, strategy="rolling", waves=("updating", "waiting")),
            "nodes": rows, "node_count": 300,
            "node_states": {"done": done, "failed": 1, "waiting": 299 - done}}


def test_a_large_followed_rollout_says_each_failure_once_and_json_keeps_the_polled_state(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """A node that leaves the page of a brief status and comes back is not said again; with
    -o json the whole status is read at the end for its nodes, while the state (and so the
    exit code) stays the one the follow stopped on."""
    failed = {"n1": {"state": "failed", "reason": "boom"}}
    polls = [brief("running", {}, 5), brief("running", failed, 10), brief("running", {}, 20),
             brief("running", failed, 30), brief("succeeded", {}, 299)]
    code, out, _, _ = run(monkeypatch, capsys, polls)
    assert code == 0
    assert sum("n1: failed" in line for line in out.splitlines()) == 1, out
    assert any("nodes: done 30" in line for line in out.splitlines()), out

    full = {**brief("running", {f"n{i}": {"state": "done"} for i in range(300)}, 299)}
    asked: list[int] = []

    async def call(ctx: object, verb: str, body: Any, **kw: object) -> dict[str, Any]:
        asked.append(body.max_nodes)
        return full if body.max_nodes == 0 else polls[-1]

    stand_in(monkeypatch, lambda *a, **k: {"id": "hello-r1"}, call)
    with pytest.raises(SystemExit) as info:
        main(["--nats", "nats://127.0.0.1:1", "deploy", "hello", "2.0.0", "-o", "json"])
    printed = json.loads(capsys.readouterr().out)
    assert info.value.code == 0 and printed["state"] == "succeeded"
    assert len(printed["nodes"]) == 300 and asked == [rollout_cmds.FOLLOW_NODES, 0]
