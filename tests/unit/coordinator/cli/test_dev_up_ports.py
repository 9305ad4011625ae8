"""``fleetwave dev up``: N brokers listen on --port .. --port+N-1, so a first port too high
for N is a usage error before anything is created."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.cli import dev_cmds, main


def test_brokers_past_port_65535_exit_2_before_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """--port 65535 --brokers 3: one line naming --port and the highest that fits; no fleet."""
    made: list[object] = []
    monkeypatch.setattr(dev_cmds, "DevFleet", lambda *a, **kw: made.append(a) or 1 / 0)
    with pytest.raises(SystemExit) as info:
        main(["dev", "up", "--port", "65535", "--brokers", "3", "--dir", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--port 65533 or lower" in err
    assert made == [] and not (tmp_path / "d").exists()
