"""``fleetwave remove``: the spec it sends, the exit codes of a followed removal, and the one
line each bad flag gets before anything is sent."""

from __future__ import annotations

from typing import Any

import pytest

import coordinator.cli.rollout_cmds as rollout_cmds
from coordinator.cli import main
from coordinator.cli.remove_cmds import removal_spec
from protocol.messages import DeployRequest
from tests.unit.coordinator.cli.stand_in import stand_in


def status(state: str) -> dict[str, Any]:
    return {"id": "hello-rm", "service": "hello", "version": "", "from_version": "1.0.0",
            "strategy": "remove", "state": state, "reason": "", "phase": "forward",
            "current_wave": 0, "report": {},
            "waves": [{"index": 0, "nodes": ["node-1"], "weight": 100, "state": "passed",
                       "started": 0.0, "finished": 0.0, "gates": {}}],
            "nodes": {"node-1": {"version": "", "state": "done", "healthy": False,
                                 "online": True, "wave": 0, "generation": 8, "slot": "",
                                 "reason": ""}}}


def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], end: str,
        *args: str) -> tuple[int, str, str, list[DeployRequest]]:
    """``remove ARGS`` against a stand-in coordinator whose rollout ends ``end``."""
    sent: list[DeployRequest] = []

    def request(ctx: object, verb: str, body: DeployRequest, **kw: object) -> dict[str, str]:
        assert verb == "deploy"
        sent.append(body)
        return {"id": "hello-rm"}

    async def call(ctx: object, verb: str, body: object, **kw: object) -> dict[str, Any]:
        return status(end)

    stand_in(monkeypatch, request, call)
    monkeypatch.setattr(rollout_cmds, "POLL", 0.0)
    with pytest.raises(SystemExit) as info:
        main(["--nats", "nats://127.0.0.1:1", "remove", *args])
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err, sent


@pytest.mark.parametrize(("end", "code"), [("succeeded", 0), ("rolled_back", 3),
                                           ("paused", 4), ("aborted", 1)])
def test_a_followed_removal_exits_as_a_deploy(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], end: str, code: int,
) -> None:
    """The removal is sent as a deploy of strategy remove and followed with deploy's codes."""
    got, out, _, sent = run(monkeypatch, capsys, end, "hello", "--selector", "zone=b",
                            "--batch", "50%")
    assert got == code
    (req,) = sent
    assert (req.spec.strategy, req.spec.version, req.spec.selector, req.spec.batch) == (
        "remove", "", {"zone": "b"}, "50%")
    assert "(removed)" in out


def test_detach_prints_the_id(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """--detach prints the rollout id and returns 0 at once."""
    code, out, _, _ = run(monkeypatch, capsys, "running", "hello", "--detach")
    assert (code, out.strip()) == (0, "hello-rm")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        pytest.param(("bad name",), "service name", id="service"),
        pytest.param(("hello", "--batch", "0"), "--batch", id="batch"),
        pytest.param(("hello", "--max-unavailable", "x"), "--max-unavailable", id="unavailable"),
        pytest.param(("hello", "--selector", "zone"), "--selector", id="selector"),
        pytest.param(("hello", "--on-failure", "retry"), "--on-failure", id="on-failure"),
        pytest.param(("hello", "--progress-deadline", "soon"), "--progress-deadline",
                     id="deadline"),
        pytest.param(("hello", "--wait", "switched"), "--wait", id="wait"),
        pytest.param(("hello", "--wait", "done", "--detach"), "--detach", id="wait-detach"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2_sending_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    args: tuple[str, ...], says: str,
) -> None:
    """Each bad value is refused in one line naming it, before anything is sent."""
    code, out, err, sent = run(monkeypatch, capsys, "succeeded", *args)
    assert (code, out, sent) == (2, "", [])
    assert err.count("\n") == 1 and says in err and "Traceback" not in err, err


def test_the_spec_has_the_defaults_of_a_rollout() -> None:
    """Without flags: every node with the service, one at a time, rolled back on failure."""
    s = removal_spec("hello")
    assert (s.strategy, s.version, s.selector, s.batch, s.max_unavailable, s.on_failure) == (
        "remove", "", {}, "1", "1", "rollback")
