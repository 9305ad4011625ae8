"""``fleetwave pause|resume|abort|promote ROLLOUT`` (and the other commands naming a rollout):
an empty id is a usage error before anything is sent; a request the rollout has already had (a
retry after a lost answer) says so and exits 0."""

from __future__ import annotations

from typing import Any

import pytest

import coordinator.cli.client as client
from coordinator.cli import main
from coordinator.errors import RemoteError
from protocol.errors import NotReachable
from protocol.messages import RolloutRequest

URL = ["--nats", "nats://127.0.0.1:1"]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main([*URL, *args])
    out, err = capsys.readouterr()
    code = info.value.code
    assert isinstance(code, int)
    return code, out, err


def coordinator(monkeypatch: pytest.MonkeyPatch, refusal: RemoteError | None,
                st: dict[str, Any] | Exception | None = None) -> list[tuple[str, str]]:
    """A stand-in coordinator: ``refusal`` answers the operator's verb (None: it is done),
    ``st`` a status read (an exception: raised). Returns the (verb, id) asked, in order."""
    asked: list[tuple[str, str]] = []

    def request(ctx: object, verb: str, req: RolloutRequest, **kw: object) -> Any:
        asked.append((verb, req.id))
        if verb == "status":
            assert st is not None, "a status read the test did not expect"
            if isinstance(st, Exception):
                raise st
            return st
        if refusal is not None:
            raise refusal
        return {"id": req.id, "state": "paused", "reason": ""}

    monkeypatch.setattr(client, "request", request)
    return asked


def row(state: str, phase: str = "forward", rid: str = "hello-r1") -> dict[str, Any]:
    return {"id": rid, "state": state, "phase": phase, "reason": ""}


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["pause", ""], id="pause"),
        pytest.param(["resume", "  "], id="resume-blank"),
        pytest.param(["abort", ""], id="abort"),
        pytest.param(["promote", ""], id="promote"),
        pytest.param(["promote", "--full", "\t"], id="promote-full-tab"),
        pytest.param(["status", ""], id="status"),
        pytest.param(["events", "--rollout", ""], id="events-rollout"),
    ],
)
def test_an_empty_rollout_id_is_a_usage_error(
        args: list[str], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``RID=""; fleetwave abort "$RID"``: exit 2 and one line saying what to pass, before any
    request (the coordinator reads "" as the newest rollout of any service)."""
    asked = coordinator(monkeypatch, None)
    code, out, err = run(capsys, *args)
    assert code == 2 and out == "" and asked == [], err
    assert len(err.strip().splitlines()) == 1, err
    assert "is empty; pass a rollout's id, as 'fleetwave rollouts' lists them" in err, err


def test_status_without_a_rollout_still_shows_the_latest(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Leaving ROLLOUT out (not giving an empty one) still asks for the latest rollout."""
    asked = coordinator(monkeypatch, None, row("running"))
    code, out, _ = run(capsys, "status", "-o", "json")
    assert code == 0 and asked == [("status", "")] and '"hello-r1"' in out


@pytest.mark.parametrize(
    ("verb", "refusal", "state"),
    [
        ("pause", "cannot pause rollout hello-r1: it is paused", "paused"),
        ("pause", "cannot pause rollout hello-r1: it is paused (wave 1 failed: node-1: unhealthy)",
         "paused"),
        ("resume", "cannot resume rollout hello-r1: it is running", "running"),
        ("abort", "rollout hello-r1 is already aborted (aborted by alice)", "aborted"),
        ("abort", "cannot abort rollout hello-r1: it is aborted", "aborted"),
    ],
)
def test_a_request_already_carried_out_says_so_and_exits_0(
        verb: str, refusal: str, state: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A retried pause, resume or abort that the coordinator refuses because the rollout is
    already there: "rollout ID: STATE (already)", exit 0, as ``cordon`` says of a node."""
    asked = coordinator(monkeypatch, RemoteError(refusal, "conflict"), row(state))
    code, out, err = run(capsys, verb, "hello-r1")
    assert (code, out, err) == (0, f"rollout hello-r1: {state} (already)\n", "")
    assert asked == [(verb, "hello-r1"), ("status", "hello-r1")]


def test_already_in_json_prints_the_status(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """-o json prints the rollout's status, as a pause that was done does."""
    coordinator(monkeypatch, RemoteError("cannot pause rollout hello-r1: it is paused",
                                         "conflict"), row("paused"))
    code, out, _ = run(capsys, "pause", "hello-r1", "-o", "json")
    assert code == 0 and '"state": "paused"' in out


@pytest.mark.parametrize(
    ("verb", "refusal", "code", "st"),
    [
        pytest.param("resume", "cannot resume rollout hello-r1: it is rolling back", "conflict",
                     row("running", "rollback"), id="resume-while-rolling-back"),
        pytest.param("pause", "rollout hello-r1 is already succeeded", "conflict",
                     row("succeeded"), id="pause-a-finished-one"),
        pytest.param("abort", "rollout hello-r1 is already rolled back", "conflict",
                     row("rolled_back"), id="abort-a-rolled-back-one"),
        pytest.param("resume", "cannot resume rollout hello-r1: it is paused", "conflict",
                     row("paused"), id="status-disagrees"),
        pytest.param("pause", "cannot pause rollout hello-r1: it is paused", "conflict",
                     NotReachable("no coordinator answers"), id="status-unreadable"),
        pytest.param("pause", "cannot pause rollout hello-r1: it is paused", "conflict",
                     row("paused", rid="hello-r2"), id="another-rollout"),
        pytest.param("pause", "no rollout 'hello-r1' in fleet 'default'", "not_found",
                     None, id="not-found"),
    ],
)
def test_other_refusals_stand(
        verb: str, refusal: str, code: str, st: dict[str, Any] | Exception | None,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a conflict on a rollout whose status is where the verb takes it is "already":
    a resume while it rolls back, a pause of a finished rollout, a status that cannot be read
    or says otherwise keep the coordinator's refusal (one line, exit 1)."""
    coordinator(monkeypatch, RemoteError(refusal, code), st)
    exit_code, out, err = run(capsys, verb, "hello-r1")
    assert exit_code == 1 and out == "" and err == f"fleetwave: {refusal}\n"


def test_promote_is_never_already(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused promote stays refused: it moves a rollout on, it leaves it in no state."""
    asked = coordinator(monkeypatch, RemoteError(
        "cannot promote rollout hello-r1: it is aborted", "conflict"), row("aborted"))
    code, _, err = run(capsys, "promote", "hello-r1")
    assert code == 1 and "cannot promote" in err and asked == [("promote", "hello-r1")]
