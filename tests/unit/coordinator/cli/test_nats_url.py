"""A malformed --nats is a usage error (exit 2, one line) at once, not a connect deadline that
ends in "cannot reach NATS" (``client.check_nats``)."""

from __future__ import annotations

import pytest

from coordinator.cli import main


@pytest.mark.parametrize("url", [
    "nats://127.0.0.1:99999", "http://127.0.0.1:4222", "nats://[::1", "", "nats://127.0.0.1:abc",
])
@pytest.mark.parametrize("command", [["status"], ["nodes"], ["coordinator"], ["release", "list"]])
def test_a_malformed_nats_url_exits_2_in_one_line(
    url: str, command: list[str], capsys: pytest.CaptureFixture[str],
) -> None:
    """The line names --nats and says what is wrong; nothing is tried."""
    with pytest.raises(SystemExit) as info:
        main(["--nats", url, *command])
    out, err = capsys.readouterr()
    assert info.value.code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("fleetwave: --nats "), err
    assert "cannot reach" not in err
