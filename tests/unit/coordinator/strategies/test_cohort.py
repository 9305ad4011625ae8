"""Cohorts in the coordinator: bad keys and rules refused by the CLI with one line (exit 2), and
the rule carried in every weighted wave's desired state, salted by the rollout, gone at 100 and
on rollback."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.cli import main
from coordinator.cli.rollout_cmds import build_spec
from coordinator.core.engine import RollbackRequested, Start
from protocol.messages import CohortSpec
from tests.unit.coordinator import kit

CANARY = ["--strategy", "canary", "--weights", "20,100"]


@pytest.mark.parametrize(
    ("flags", "why"),
    [
        pytest.param([*CANARY, "--cohort-key", "query:user"], "not a cohort key", id="kind"),
        pytest.param([*CANARY, "--cohort-key", "header:X User"], "not a header name",
                     id="header-name"),
        pytest.param([*CANARY, "--cohort-key", "cookie:a;b"], "not a cookie name",
                     id="cookie-name"),
        pytest.param([*CANARY, "--allow", "header:X-Beta"], "has no '='", id="allow-no-eq"),
        pytest.param([*CANARY, "--deny", "ip=1.2.3.4"], "header or a cookie", id="deny-ip"),
        pytest.param(["--strategy", "blue-green", "--cohort-key", "header:X-User"],
                     "no meaning with --strategy blue-green", id="blue-green"),
        pytest.param(["--strategy", "rolling", "--cohort-key", "ip"],
                     "no meaning with --strategy rolling", id="rolling"),
        pytest.param(["--strategy", "shadow", "--mirror", "10%", "--allow", "header:a=1"],
                     "no meaning with --strategy shadow", id="shadow-allow"),
        pytest.param(["--strategy", "canary", "--steps", "1,100%", "--cohort-key", "ip"],
                     "needs --weights alone", id="steps"),
        pytest.param([*CANARY, "--preview", "header:X-QA=1"], "does not have", id="preview"),
        pytest.param([*CANARY, "--cohort-key", "header:X-User", "--assign-cookie"],
                     "needs --cohort-key cookie:NAME", id="assign-header"),
        pytest.param([*CANARY, "--cohort-fallback", "request"], "give --cohort-key",
                     id="fallback-alone"),
        pytest.param([*CANARY, "--cohort-key", "ip", "--cohort-fallback", "x"], "not one of",
                     id="fallback-kind"),
        pytest.param(["--strategy", "canary", "--weights", "0,10,100", "--cohort-key", "ip"],
                     "exposes the new release to nobody", id="zero-without-allow"),
    ],
)
def test_bad_cohort_input_exits_2_with_one_line(
    flags: list[str], why: str, capsys: pytest.CaptureFixture[str],
) -> None:
    """``fleetwave deploy`` refuses a bad key, rule or strategy with exit 2 and one line saying
    why, before it contacts anything (the NATS URL here answers nobody)."""
    with pytest.raises(SystemExit) as info:
        main(["--nats", "nats://127.0.0.1:1", "deploy", "hello", "2.0.0", *flags])
    out, err = capsys.readouterr()
    assert info.value.code == 2
    assert out == "" and len(err.strip().splitlines()) == 1 and why in err, err
    assert "Traceback" not in err


def test_rollout_file_keys(tmp_path: Path) -> None:
    """rollout.toml carries the same settings (rules as a list, a value may hold a comma)."""
    spec = build_spec({"service": "hello", "version": "2.0.0", "strategy": "canary",
                       "weights": [0, 10, 100], "cohort_key": "cookie:fw", "assign_cookie": True,
                       "cohort_fallback": "request", "allow": ["header:X-Beta=1,2"],
                       "deny": "cookie:tier=gold"})
    assert (spec.cohort_key, spec.assign_cookie, spec.cohort_fallback) == (
        "cookie:fw", True, "request")
    assert spec.allow == ["header:X-Beta=1,2"] and spec.deny == ["cookie:tier=gold"]


def test_weighted_waves_carry_the_rule_and_rollback_drops_it() -> None:
    """Each weighted wave's desired state names the key, the rollout as salt and the new slot;
    a rollback restores the old state without any rule."""
    r = kit.rollout(2, id="r-77", strategy="canary", weights=[20, 100],
                    cohort_key="header:X-User", allow=["header:X-Beta=1"])
    states = kit.writes(r.handle(Start(), 0.0))
    assert states
    for d in states:
        c = d.cohorts
        assert c == CohortSpec(key="header:X-User", salt="r-77", new=c.new if c else "",
                               allow=["header:X-Beta=1"])
        assert c is not None and d.weights[c.new] == 20
    back = kit.writes(r.handle(RollbackRequested(reason="operator"), 1.0))
    assert back and all(d.cohorts is None for d in back)


def test_preview_rides_the_blue_green_stage() -> None:
    """Blue-green staging carries the preview rule to the staged slot (weight 0)."""
    r = kit.rollout(2, strategy="blue-green", preview=["header:X-QA=1"])
    states = kit.writes(r.handle(Start(), 0.0))
    assert states and all(d.cohorts is not None and d.cohorts.preview == ["header:X-QA=1"]
                          and d.weights[d.cohorts.new] == 0 for d in states)
