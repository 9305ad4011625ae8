"""Settings only some strategies read are refused, in one line, by a strategy that would ignore
them (``spec.check_meaning``): ``--weights 5,100`` on the default rolling strategy would roll
every node to 100% where a 5% canary was meant."""

from __future__ import annotations

import pytest

from coordinator import strategies
from coordinator.cli import main
from coordinator.errors import UsageError
from protocol.messages import Gates
from protocol.testing import spec


@pytest.mark.parametrize(("fields", "flag"), [
    pytest.param({"weights": [5, 100]}, "--weights", id="rolling-weights"),
    pytest.param({"steps": ["1", "100%"]}, "--steps", id="rolling-steps"),
    pytest.param({"mirror": 10.0}, "--mirror", id="rolling-mirror"),
    pytest.param({"mirror_methods": ["POST"]}, "--mirror-methods", id="rolling-methods"),
    pytest.param({"ignore_headers": ["Date"]}, "--ignore-header", id="rolling-ignore-header"),
    pytest.param({"ignore_json_fields": ["a.b"]}, "--ignore-json-field", id="rolling-json"),
    pytest.param({"mirror_keep_headers": ["X-A"]}, "--mirror-keep-header", id="rolling-keep"),
    pytest.param({"scale_down_delay": 5.0}, "--scale-down-delay", id="rolling-delay"),
    pytest.param({"strategy": "canary", "mirror": 10.0}, "--mirror", id="canary-mirror"),
    pytest.param({"strategy": "canary", "scale_down_delay": 0.0}, "--scale-down-delay",
                 id="canary-delay"),
    pytest.param({"strategy": "blue-green", "weights": [5, 100]}, "--weights",
                 id="blue-green-weights"),
    pytest.param({"strategy": "blue-green", "mirror": 10.0}, "--mirror", id="blue-green-mirror"),
    pytest.param({"strategy": "shadow", "mirror": 10.0, "steps": ["1"]}, "--steps",
                 id="shadow-steps"),
    pytest.param({"strategy": "shadow", "mirror": 10.0, "scale_down_delay": 5.0},
                 "--scale-down-delay", id="shadow-delay"),
    pytest.param({"strategy": "shadow", "mirror": 10.0, "then": "rolling",
                  "scale_down_delay": 5.0}, "--scale-down-delay", id="shadow-then-rolling-delay"),
    pytest.param({"strategy": "canary", "batch": "50%"}, "--batch", id="canary-batch"),
    pytest.param({"strategy": "blue-green", "batch": "2"}, "--batch", id="blue-green-batch"),
    pytest.param({"strategy": "shadow", "mirror": 10.0, "batch": "2"}, "--batch",
                 id="shadow-batch"),
    pytest.param({"strategy": "shadow", "mirror": 10.0, "then": "blue-green", "batch": "2"},
                 "--batch", id="shadow-then-blue-green-batch"),
    pytest.param({"gates": Gates(max_mismatch_rate=0.01)}, "--max-mismatch-rate",
                 id="rolling-mismatch"),
    pytest.param({"strategy": "canary", "gates": Gates(max_mismatch_rate=0.01)},
                 "--max-mismatch-rate", id="canary-mismatch"),
])
def test_a_setting_the_strategy_ignores_is_refused(fields: dict[str, object], flag: str) -> None:
    """The flag, the strategy and what to do instead, in one line."""
    with pytest.raises(UsageError) as info:
        strategies.validate(spec(**fields))
    text = str(info.value)
    assert text.startswith(f"{flag} has no meaning with --strategy ") and "\n" not in text
    assert f"leave {flag} out" in text


@pytest.mark.parametrize("fields", [
    pytest.param({"strategy": "canary", "weights": [5, 100]}, id="canary-weights"),
    pytest.param({"strategy": "canary", "steps": ["1", "100%"]}, id="canary-steps"),
    pytest.param({"strategy": "blue-green", "scale_down_delay": 5.0}, id="blue-green-delay"),
    pytest.param({"strategy": "shadow", "mirror": 10.0, "mirror_methods": ["POST"],
                  "ignore_headers": ["Date"], "ignore_json_fields": ["a"],
                  "mirror_keep_headers": ["X-A"]}, id="shadow-mirror"),
    pytest.param({"strategy": "shadow", "mirror": 10.0, "then": "blue-green",
                  "scale_down_delay": 5.0}, id="shadow-then-blue-green-delay"),
    pytest.param({"scale_down_delay": 300.0, "mirror_methods": ["GET", "HEAD"]},
                 id="rolling-defaults-written-out"),
    pytest.param({"batch": "20%"}, id="rolling-batch"),
    pytest.param({"strategy": "shadow", "mirror": 10.0, "then": "rolling", "batch": "2",
                  "gates": Gates(max_mismatch_rate=0.01)}, id="shadow-then-rolling-batch"),
    pytest.param({"strategy": "canary", "batch": "1"}, id="canary-batch-default-written-out"),
])
def test_a_setting_the_strategy_reads_is_accepted(fields: dict[str, object]) -> None:
    """Each strategy keeps the settings it acts on, and a default written out is no setting."""
    strategies.validate(spec(**fields))


def test_deploy_weights_on_the_default_strategy_exits_2_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``deploy hello 2.0.0 --weights 5,100``: exit 2, one line naming --weights, nothing sent."""
    with pytest.raises(SystemExit) as info:
        main(["--nats", "nats://127.0.0.1:1", "deploy", "hello", "2.0.0", "--weights", "5,100"])
    out, err = capsys.readouterr()
    assert info.value.code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "--weights has no meaning with --strategy rolling" in err, err


@pytest.mark.parametrize(("argv", "flag"), [
    (["--strategy", "blue-green", "--batch", "2"], "--batch"),
    (["--strategy", "canary", "--max-mismatch-rate", "1%"], "--max-mismatch-rate"),
])
def test_deploy_with_a_flag_its_strategy_ignores_exits_2_in_one_line(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str],
) -> None:
    """``--batch`` on a blue-green and ``--max-mismatch-rate`` outside a shadow were ignored
    without a word; now exit 2, one line, nothing sent."""
    with pytest.raises(SystemExit) as info:
        main(["--nats", "nats://127.0.0.1:1", "deploy", "hello", "2.0.0", *argv])
    out, err = capsys.readouterr()
    assert info.value.code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert f"{flag} has no meaning with --strategy" in err, err
