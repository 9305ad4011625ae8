"""The canary strategy: bad --steps and --weights refused by the CLI before anything is sent, and
the engine's steps in virtual time (bake windows measured by the routers' counters, the last
step's p99 reference, promote, pause and resume at step boundaries)."""

from __future__ import annotations

import pytest

from coordinator.cli import main
from coordinator.core.engine import (
    STATS_GRACE,
    ObservedChanged,
    Pause,
    Promote,
    Resume,
    Rollout,
    Start,
    Tick,
)
from protocol.messages import (
    LATENCY_BOUNDS_MS,
    DesiredState,
    Gates,
    ObservedState,
    RouterStats,
    SlotStatus,
    SlotTraffic,
)
from protocol.testing import OLD
from tests.unit.coordinator import kit
from tests.unit.coordinator.kit import kinds, writes

# -- the CLI ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "why"),
    [
        pytest.param(["--steps", "0,100%"], "would never move a node", id="zero"),
        pytest.param(["--steps", "1,101%"], "out of range", id="over-100%"),
        pytest.param(["--steps", "1,10%,50%"], "must end at 100%", id="not-ending-at-100%"),
        pytest.param(["--steps", "50%,10%,100%"], "strictly increase", id="descending"),
        pytest.param(["--steps", "3,2,100%"], "strictly increase", id="descending-counts"),
        pytest.param(["--steps", "1,x,100%"], "not a count or a percentage", id="not-a-number"),
        pytest.param(["--weights", "0,100"], "exposes the new release to nobody", id="weight-zero"),
        pytest.param(["--weights", "5,101"], "out of range", id="weight-over-100"),
        pytest.param(["--weights", "25,5,100"], "strictly increase", id="weights-descending"),
        pytest.param(["--weights", "5,25"], "must end at 100", id="weights-not-ending"),
    ],
)
def test_bad_steps_and_weights_exit_2_with_one_line(
    flags: list[str], why: str, capsys: pytest.CaptureFixture[str],
) -> None:
    """``fleetwave deploy`` refuses bad lists with exit 2 and one line saying why, before it
    contacts anything (the NATS URL here answers nobody)."""
    with pytest.raises(SystemExit) as info:
        main(["--nats", "nats://127.0.0.1:1", "deploy", "hello", "2.0.0", "--strategy", "canary",
              *flags])
    out, err = capsys.readouterr()
    assert info.value.code == 2
    assert out == "" and len(err.strip().splitlines()) == 1 and why in err, err
    assert "Traceback" not in err


def test_a_rollout_file_gets_the_same_checks(
    tmp_path: object, capsys: pytest.CaptureFixture[str],
) -> None:
    """Steps from a rollout.toml are checked like the flag, also as a TOML array."""
    from pathlib import Path

    f = Path(str(tmp_path)) / "rollout.toml"
    f.write_text('service = "hello"\nversion = "2.0.0"\nstrategy = "canary"\n'
                 'steps = ["1", "10%", "5%", "100%"]\n')
    with pytest.raises(SystemExit) as info:
        main(["--nats", "nats://127.0.0.1:1", "deploy", "-f", str(f)])
    assert info.value.code == 2 and "strictly increase" in capsys.readouterr().err


# -- the engine ------------------------------------------------------------------------------------


def rollout(n: int, **kw: object) -> Rollout:
    return kit.rollout(n, strategy="canary", **kw)


def stats(at: float, **slots: tuple[int, int, int]) -> RouterStats:
    """Router counters read at ``at``: per slot (requests, errors, latency bucket index)."""
    traffic = {}
    for slot, (requests, errors, bucket) in slots.items():
        lat = [0] * (len(LATENCY_BOUNDS_MS) + 1)
        lat[bucket] = requests
        traffic[slot] = SlotTraffic(requests=requests, errors=errors, latency=lat)
    return RouterStats(epoch=1.0, slots=traffic, time=at)


def report(d: DesiredState, t: float, router: RouterStats | None = None) -> ObservedState:
    """An agent converged on ``d`` at ``t``, with these router counters."""
    return ObservedState(
        node=d.node, service="hello", generation=d.generation, observed_generation=d.generation,
        slots={s: SlotStatus(slot=s, status="healthy", version=r.version)
               for s, r in d.slots.items()},
        weights={s: w for s, w in d.weights.items() if w > 0}, phase="converged", time=t,
        router=router)


def test_bake_waits_for_counters_read_after_it_ended() -> None:
    """Counters read before the bake's end do not judge it: the gates wait for a snapshot that
    spans the whole bake, then judge the traffic in it."""
    r = rollout(2, steps=["1", "100%"], bake=10.0, gates=Gates(max_error_rate=0.05))
    (d,) = writes(r.handle(Start(), 0.0))
    r.handle(ObservedChanged("node-1", report(d, 1.0, stats(0.5, b=(0, 0, 5)))), 1.0)
    assert r.record.waves[0].state == "baking"
    # Read at 3.0, reported at 11.0 (after the bake's end): only 2.5 s of the 10 s bake.
    r.handle(ObservedChanged("node-1", report(d, 11.0, stats(3.0, b=(2, 0, 5)))), 11.0)
    assert r.record.waves[0].state == "baking" and r.record.waves[0].gates == {}
    cmds = r.handle(ObservedChanged("node-1", report(d, 12.0, stats(11.0, b=(100, 20, 5)))),
                    12.0)
    assert "gate.failed" in kinds(cmds)
    assert r.record.waves[0].gates["requests"] == 100 and r.record.waves[0].gates["errors"] == 20


def test_stale_counters_are_judged_after_the_grace() -> None:
    """An agent whose counters stop coming does not hold the rollout: after the grace the gates
    judge what they have (here too little, so inconclusive, never a pass)."""
    r = rollout(2, steps=["1", "100%"], bake=10.0, gates=Gates(max_error_rate=0.05))
    (d,) = writes(r.handle(Start(), 0.0))
    r.handle(ObservedChanged("node-1", report(d, 1.0, stats(0.5, b=(0, 0, 5)))), 1.0)
    r.handle(Tick(), 11.0 + STATS_GRACE - 0.1)
    assert r.state == "running" and r.record.waves[0].state == "baking"
    r.handle(Tick(), 11.0 + STATS_GRACE)
    assert r.state == "paused" and "inconclusive" in r.record.reason


def test_last_step_compares_p99_with_the_previous_window() -> None:
    """The last step leaves no old slot serving: its p99 is compared with the old release's
    traffic of the step before, so a healthy last step passes and a slow one fails."""
    for bucket, outcome in ((5, "pass"), (20, "fail")):
        r = rollout(2, steps=["1", "100%"], bake=10.0, gates=Gates(max_p99_ratio=1.5))
        (d1,) = writes(r.handle(Start(), 0.0))
        old2 = DesiredState(fleet="f", node="node-2", service="hello", generation=7,
                            slots={"a": OLD}, weights={"a": 100})
        r.handle(ObservedChanged("node-2", report(old2, 0.5, stats(0.5, a=(0, 0, 5)))), 0.5)
        r.handle(ObservedChanged("node-1", report(d1, 1.0, stats(1.0, b=(0, 0, 5)))), 1.0)
        r.handle(ObservedChanged("node-2", report(old2, 11.0, stats(11.0, a=(500, 0, 5)))), 11.0)
        cmds = r.handle(ObservedChanged("node-1", report(d1, 11.5, stats(11.5, b=(50, 0, 5)))),
                        11.5)
        assert "gate.passed" in kinds(cmds), r.record.waves[0].gates
        (d2,) = writes(cmds)
        r.handle(ObservedChanged("node-2", report(d2, 12.0, stats(12.0, a=(500, 0, 5)))), 12.0)
        assert r.record.waves[1].state == "baking"
        r.handle(ObservedChanged("node-2", report(d2, 23.0, stats(23.0, a=(500, 0, 5),
                                                                  b=(40, 0, bucket)))), 23.0)
        gates = r.record.waves[1].gates
        assert gates["outcome"] == outcome and gates["p99_old_from"] == "wave 1", gates
        assert gates["old_requests"] == 500
        assert r.state == ("succeeded" if outcome == "pass" else "running")


def test_pause_holds_the_next_step_and_resume_releases_it() -> None:
    """A pause during a step's bake holds the rollout at that step even after the bake ends;
    resume judges the step and starts the next one."""
    r = rollout(2, steps=["1", "100%"], bake=10.0)
    (d,) = writes(r.handle(Start(), 0.0))
    r.handle(ObservedChanged("node-1", report(d, 1.0)), 1.0)
    r.handle(Pause(), 2.0)
    assert writes(r.handle(Tick(), 30.0)) == [] and r.record.current_wave == 0
    assert r.record.waves[0].state == "baking" and r.state == "paused"
    cmds = r.handle(Resume(), 31.0)
    assert r.record.waves[0].state == "passed"
    assert [w.node for w in writes(cmds)] == ["node-2"] and r.record.current_wave == 1


def test_promote_skips_one_bake_and_full_every_bake() -> None:
    """promote ends the current step's bake at once; promote --full every remaining step's."""
    r = rollout(3, steps=["1", "2", "100%"], bake=3600.0, gates=Gates(max_error_rate=0.01))
    (d1,) = writes(r.handle(Start(), 0.0))
    r.handle(ObservedChanged("node-1", report(d1, 1.0)), 1.0)
    cmds = r.handle(Promote(), 2.0)
    assert "gate.skipped" in kinds(cmds) and [w.node for w in writes(cmds)] == ["node-2"]
    (d2,) = writes(cmds)
    r.handle(ObservedChanged("node-2", report(d2, 3.0)), 3.0)
    assert r.record.waves[1].state == "baking", "a plain promote is spent on one step"
    cmds = r.handle(Promote(full=True), 4.0)
    (d3,) = writes(cmds)
    cmds = r.handle(ObservedChanged("node-3", report(d3, 5.0)), 5.0)
    assert r.state == "succeeded"
    assert [w.gates["outcome"] for w in r.record.waves] == ["promoted"] * 3


def test_a_bake_that_ends_while_the_bus_is_away_waits_for_counters_that_cover_it() -> None:
    """The leader's counters were read before a broker outage that spans the bake's end: the
    grace for covering counters runs from the fleet's excuse (the bus back, the agents on it
    again), not from the bake's end, so the gates never pass the wave on the part of its bake
    before the outage; fresh counters judge the whole bake (here, the errors of the outage)."""
    r = rollout(2, steps=["1", "100%"], bake=10.0, gates=Gates(max_error_rate=0.05))
    (d,) = writes(r.handle(Start(), 0.0))
    r.handle(ObservedChanged("node-1", report(d, 1.0, stats(0.5, b=(0, 0, 5)))), 1.0)
    r.handle(ObservedChanged("node-1", report(d, 4.0, stats(3.5, b=(300, 0, 5)))), 4.0)
    r.excuse(40.0)  # the bus went away at 5 s; the agents are back on it by 40 s
    r.handle(Tick(), 11.0 + STATS_GRACE)  # no gate judges 3 s of a 10 s bake
    assert r.state == "running" and r.record.waves[0].state == "baking"
    r.handle(Tick(), 40.0 + STATS_GRACE - 0.1)
    assert r.state == "running" and r.record.waves[0].state == "baking"
    cmds = r.handle(ObservedChanged("node-1", report(d, 42.0, stats(41.0, b=(600, 90, 5)))),
                    42.0)
    assert "gate.failed" in kinds(cmds)
    assert r.record.waves[0].gates["requests"] == 600 and r.record.waves[0].gates["errors"] == 90


def test_under_an_excuse_stale_counters_are_judged_after_its_grace() -> None:
    """Counters that never come back still do not hold the rollout: the grace after the
    excuse's end, then the gates judge what they have (inconclusive, never a pass)."""
    r = rollout(2, steps=["1", "100%"], bake=10.0, gates=Gates(max_error_rate=0.05))
    (d,) = writes(r.handle(Start(), 0.0))
    r.handle(ObservedChanged("node-1", report(d, 1.0, stats(0.5, b=(0, 0, 5)))), 1.0)
    r.excuse(40.0)
    r.handle(Tick(), 40.0 + STATS_GRACE - 0.1)
    assert r.state == "running"
    r.handle(Tick(), 40.0 + STATS_GRACE)
    assert r.state == "paused" and "inconclusive" in r.record.reason
