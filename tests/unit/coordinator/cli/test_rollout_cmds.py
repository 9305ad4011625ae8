"""``fleetwave deploy``'s checks: values that must be refused before anything is sent; the
``--on-node-lost`` policy from the flag or rollout.toml, and how ``status`` shows it."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner
from rich.console import Console

from coordinator.api.rollouts import status_dict
from coordinator.cli import main
from coordinator.cli.base import cli
from coordinator.cli.render import progress_lines, status_renderable, status_text
from coordinator.core.engine import new_record
from protocol.messages import DeployRequest, NodeView, RolloutRecord, RolloutSpec
from protocol.testing import NEW, spec
from tests.unit.coordinator.cli.stand_in import stand_in


@pytest.mark.parametrize(
    ("flags", "why"),
    [
        pytest.param(["--max-p99-ratio", "nan"], "--max-p99-ratio", id="p99-nan"),
        pytest.param(["--max-p99-ratio", "inf"], "--max-p99-ratio", id="p99-inf"),
        pytest.param(["--max-p99-ratio", "-1"], "--max-p99-ratio", id="p99-negative"),
        pytest.param(["--batch", "x"], "--batch", id="batch-not-a-number"),
        pytest.param(["--batch", "0"], "--batch", id="batch-zero"),
        pytest.param(["--max-unavailable", "200%"], "--max-unavailable", id="max-unavailable-pct"),
    ],
)
def test_bad_numbers_exit_2_before_sending(
    flags: list[str], why: str, capsys: pytest.CaptureFixture[str],
) -> None:
    """A non-finite p99 ratio (JSON would carry it as null, silently dropping the gate) and a bad
    batch are refused with one line and exit 2 without contacting anything."""
    with pytest.raises(SystemExit) as info:
        main(["--nats", "nats://127.0.0.1:1", "deploy", "hello", "2.0.0", *flags])
    out, err = capsys.readouterr()
    assert info.value.code == 2, err
    assert out == "" and len(err.strip().splitlines()) == 1 and why in err, err
    assert "cannot reach NATS" not in err


def test_nan_from_a_rollout_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """TOML has nan and inf literals: a rollout.toml's max_p99_ratio = nan is refused too."""
    f = tmp_path / "rollout.toml"
    f.write_text('service = "hello"\nversion = "2.0.0"\nmax_p99_ratio = nan\n')
    with pytest.raises(SystemExit) as info:
        main(["--nats", "nats://127.0.0.1:1", "deploy", "-f", str(f)])
    assert info.value.code == 2 and "--max-p99-ratio" in capsys.readouterr().err


def deployed(monkeypatch: pytest.MonkeyPatch, *args: str) -> RolloutSpec:
    """The spec ``fleetwave deploy ARGS --detach`` sends (to a stand-in coordinator)."""
    sent: list[RolloutSpec] = []

    def request(ctx: object, verb: str, body: DeployRequest, **kw: object) -> dict[str, str]:
        sent.append(body.spec)
        return {"id": "r1"}

    log = stand_in(monkeypatch, request)
    with pytest.raises(SystemExit) as info:
        main(["--nats", "nats://127.0.0.1:1", "deploy", *args, "--detach"])
    assert info.value.code == 0
    assert log == ["connect", "deploy on it"]  # detached: no subscription, no follow
    (spec,) = sent
    return spec


def test_on_node_lost_flag_and_rollout_file_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--on-node-lost and rollout.toml's on_node_lost set the policy (fail unless said); the
    flag overrides the file."""
    assert deployed(monkeypatch, "hello", "2.0.0").on_node_lost == "fail"
    assert deployed(monkeypatch, "hello", "2.0.0", "--on-node-lost", "wait").on_node_lost == "wait"
    f = tmp_path / "rollout.toml"
    f.write_text('service = "hello"\nversion = "2.0.0"\non_node_lost = "wait"\n')
    assert deployed(monkeypatch, "-f", str(f)).on_node_lost == "wait"
    assert deployed(monkeypatch, "-f", str(f), "--on-node-lost", "fail").on_node_lost == "fail"


@pytest.mark.parametrize("where", ["flag", "file"])
def test_a_bad_on_node_lost_is_one_usage_line(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """``--on-node-lost maybe`` (or on_node_lost = "maybe") exits 2 with one line naming the
    choices, before anything is sent."""
    args = ["deploy", "hello", "2.0.0", "--on-node-lost", "maybe"]
    if where == "file":
        f = tmp_path / "rollout.toml"
        f.write_text('service = "hello"\nversion = "2.0.0"\non_node_lost = "maybe"\n')
        args = ["deploy", "-f", str(f)]
    with pytest.raises(SystemExit) as info:
        main(["--nats", "nats://127.0.0.1:1", *args])
    out, err = capsys.readouterr()
    assert info.value.code == 2 and out == ""
    assert err.strip().splitlines() == [
        "fleetwave: --on-node-lost 'maybe' is not one of fail, wait"]


def test_on_node_lost_is_documented_in_help() -> None:
    """``deploy --help`` names the flag and its two policies."""
    result = CliRunner().invoke(cli, ["deploy", "--help"])
    assert result.exit_code == 0
    assert "--on-node-lost fail|wait" in result.output and "progress-deadline" in result.output


def test_status_shows_the_policy_only_when_it_is_not_the_default() -> None:
    """``fleetwave status`` says on node lost: wait; the default says nothing."""
    record = new_record(id="r1", spec=spec(on_node_lost="wait"), release=NEW,
                        nodes=[NodeView(id="node-1")], current={}, now=0.0)
    st = status_dict(record)
    assert st["on_node_lost"] == "wait"
    assert "on node lost: wait" in status_text(st).splitlines()[1]
    default = status_dict(msgspec.structs.replace(record, spec=spec()))
    assert "on node lost" not in status_text(default)


def test_analysis_and_alpha_flags_and_rollout_file_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--analysis and --alpha (or analysis/alpha in rollout.toml) set the gates' analysis;
    threshold at alpha 0.01 unless said; the flag overrides the file."""
    g = deployed(monkeypatch, "hello", "2.0.0").gates
    assert (g.analysis, g.alpha) == ("threshold", 0.01)
    g = deployed(monkeypatch, "hello", "2.0.0", "--analysis", "sequential", "--alpha", "5%").gates
    assert (g.analysis, g.alpha) == ("sequential", 0.05)
    f = tmp_path / "rollout.toml"
    f.write_text('service = "hello"\nversion = "2.0.0"\nanalysis = "sequential"\nalpha = 0.001\n')
    g = deployed(monkeypatch, "-f", str(f)).gates
    assert (g.analysis, g.alpha) == ("sequential", 0.001)
    assert deployed(monkeypatch, "-f", str(f), "--analysis", "threshold").gates.analysis == \
        "threshold"


@pytest.mark.parametrize(("flags", "line"), [
    (["--analysis", "bayes"], "--analysis 'bayes' is not one of threshold, sequential"),
    (["--alpha", "0"], "--alpha 0 is out of range"),
    (["--alpha", "2"], "--alpha '2' is out of range"),
    (["--analysis", "sequential", "--max-error-rate", "100%"], "tolerates every error rate"),
])
def test_a_bad_analysis_or_alpha_is_one_usage_line(
    flags: list[str], line: str, capsys: pytest.CaptureFixture[str],
) -> None:
    """Bad --analysis or --alpha exits 2 with one line, before anything is sent."""
    with pytest.raises(SystemExit) as info:
        main(["--nats", "nats://127.0.0.1:1", "deploy", "hello", "2.0.0", *flags])
    out, err = capsys.readouterr()
    assert info.value.code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and line in err, err


def test_analysis_and_alpha_are_documented_in_help() -> None:
    """``deploy --help`` names both flags and what sequential does."""
    result = CliRunner().invoke(cli, ["deploy", "--help"])
    assert "--analysis threshold|sequential" in result.output
    assert "--alpha X" in result.output and "1/alpha" in result.output


@pytest.mark.parametrize(("flags", "why"), [
    (["--prestage", "-1"], "--prestage '-1' is negative"),
    (["--prestage", "soon"], "--prestage 'soon' is not a number of waves"),
    (["--strategy", "blue-green", "--prestage", "1"], "no meaning with --strategy blue-green"),
    (["--strategy", "shadow", "--mirror", "5%", "--prestage", "all"],
     "no meaning with --strategy shadow"),
])
def test_a_bad_prestage_is_one_usage_line_before_sending(
    flags: list[str], why: str, capsys: pytest.CaptureFixture[str],
) -> None:
    """A negative or non-numeric --prestage, or one on a strategy that stages by itself: exit
    2 with one line, nothing sent."""
    with pytest.raises(SystemExit) as info:
        main(["--nats", "nats://127.0.0.1:1", "deploy", "hello", "2.0.0", *flags])
    out, err = capsys.readouterr()
    assert info.value.code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and why in err, err


def test_prestage_flag_and_rollout_file_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--prestage and rollout.toml's prestage (a number or "all") reach the spec as written;
    "" (the strategy's default) when neither says."""
    assert deployed(monkeypatch, "hello", "2.0.0").prestage == ""
    assert deployed(monkeypatch, "hello", "2.0.0", "--prestage", "all").prestage == "all"
    f = tmp_path / "rollout.toml"
    f.write_text('service = "hello"\nversion = "2.0.0"\nprestage = 2\n')
    assert deployed(monkeypatch, "-f", str(f)).prestage == "2"
    assert deployed(monkeypatch, "-f", str(f), "--prestage", "0").prestage == "0"


def test_prestage_is_documented_in_help() -> None:
    """``deploy --help`` names --prestage, its values and its default."""
    result = CliRunner().invoke(cli, ["deploy", "--help"])
    assert result.exit_code == 0
    assert "--prestage N|all" in result.output and "Default 1 for rolling" in result.output


def _fleet_record(n: int) -> RolloutRecord:
    record = new_record(id="r1", spec=spec(batch="10%", max_unavailable="10%"), release=NEW,
                        nodes=[NodeView(id=f"n{i:03}") for i in range(n)], current={}, now=0.0)
    nodes = dict(record.nodes)
    for i, name in enumerate(nodes):
        state = "done" if i < 30 else "updating" if i < 40 else "waiting"
        nodes[name] = msgspec.structs.replace(nodes[name], state=state)
    nodes["n075"] = msgspec.structs.replace(nodes["n075"], online=False)
    nodes["n035"] = msgspec.structs.replace(nodes["n035"], state="failed", reason="boom")
    return msgspec.structs.replace(record, nodes=nodes)


def test_a_brief_status_shows_the_nodes_in_motion_and_counts_the_rest() -> None:
    """``max_nodes`` (a followed deploy): the nodes in motion first (failed and offline before
    updating: a page of updating nodes never hides a failure), then in wave order, up to that
    many; each wave's first ids; counts of every state. A rollout of
    no more nodes than that is shown whole, as without it."""
    record = _fleet_record(100)
    full = status_dict(record)
    assert len(full["nodes"]) == 100 and full["node_count"] == 100
    assert full["node_states"] == {"done": 30, "updating": 9, "failed": 1, "waiting": 60}
    assert status_dict(record, max_nodes=100) == full
    assert "more nodes not shown" not in status_text(full)

    brief = status_dict(record, max_nodes=15)
    # the failed one, the offline one, then those updating, in table order
    moving = ["n035", "n075"] + [f"n{i:03}" for i in range(30, 40) if i != 35]
    assert list(brief["nodes"])[:11] == moving and len(brief["nodes"]) == 15
    assert list(brief["nodes"])[11:] == ["n000", "n001", "n002", "n003"]  # then wave order
    assert brief["node_states"] == full["node_states"] and brief["node_count"] == 100
    assert all(len(w["nodes"]) <= 8 and w["node_count"] == 10 for w in brief["waves"])
    assert list(status_dict(record, max_nodes=2)["nodes"]) == ["n035", "n075"]
    text = status_text(brief)
    assert "... 85 more nodes not shown; all done 30, failed 1, updating 9, waiting 60 " \
           "(of 100); 'fleetwave status r1' lists every node" in text
    assert "(+2, 10 nodes)" in text
    console = Console(file=io.StringIO(), width=300)
    console.print(status_renderable(brief))  # the terminal's view says the same
    assert "85 more nodes not shown" in console.file.getvalue()  # type: ignore[attr-defined]


def test_following_a_large_rollout_prints_counts_and_failures_not_every_node() -> None:
    """A followed rollout shown briefly: a line of counts when they change, a line for a
    node that failed or went offline, none for each node that merely moved on."""
    record = _fleet_record(100)
    before = status_dict(record, max_nodes=15)
    nodes = dict(record.nodes)
    for i in range(30, 35):
        nodes[f"n{i:03}"] = msgspec.structs.replace(nodes[f"n{i:03}"], state="done")
    nodes["n036"] = msgspec.structs.replace(nodes["n036"], state="failed", reason="bad")
    after = status_dict(msgspec.structs.replace(record, nodes=nodes), max_nodes=15)
    lines = [line.split(" ", 1)[1] for line in progress_lines(before, after)]
    assert lines == ["nodes: done 35, failed 2, updating 3, waiting 60 (of 100)",
                     "n036: failed: bad"]


@pytest.mark.parametrize(
    ("make", "why"),
    [
        pytest.param(lambda d: Path("/dev/null"), "not a regular file", id="character-device"),
        pytest.param(
            lambda d: _written(d / "big.toml", b"# padding\n" * 110_000), "larger than 1 MiB",
            id="above-1-MiB",
        ),
    ],
)
def test_a_rollout_file_must_be_a_small_regular_file(
    make: Callable[[Path], Path], why: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """-f reads only a regular file of at most 1 MiB, else one line and exit 2 (``-f /dev/zero``
    grew without end; /dev/null stands for any device here, so the old code cannot hang the
    test)."""
    with pytest.raises(SystemExit) as info:
        main(["--nats", "nats://127.0.0.1:1", "deploy", "-f", str(make(tmp_path)), "--detach"])
    out, err = capsys.readouterr()
    assert info.value.code == 2, err
    assert out == "" and len(err.strip().splitlines()) == 1 and why in err, err


def _written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
