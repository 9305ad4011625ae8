"""``fleetwave deploy``'s checks: values that must be refused before anything is sent."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.cli import main


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
