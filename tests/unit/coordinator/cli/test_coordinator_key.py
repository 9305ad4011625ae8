"""``fleetwave coordinator`` makes its signing key only once its flags passed: an --http
address it cannot listen on is one line (exit 2) and leaves no key file behind."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from coordinator.cli import main


def _run(key: Path, http: str) -> int | str | None:
    """The exit code of a coordinator run with ``--key-file key --http http``."""
    with pytest.raises(SystemExit) as info:
        main(["--nats", "nats://127.0.0.1:1", "coordinator", "--http", http,
              "--key-file", str(key)])
    return info.value.code


def test_an_address_not_of_this_host_makes_no_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """--http 1.2.3.4:80: the kernel's reason, exit 2, no key file (nor its folder)."""
    code = _run(tmp_path / "k" / "coordinator.seed", "1.2.3.4:80")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("fleetwave: --http 1.2.3.4:80: cannot listen ("), err
    assert not (tmp_path / "k").exists()


def test_an_address_in_use_makes_no_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """A port another socket listens on: "address already in use", exit 2, no key file."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        code = _run(tmp_path / "k" / "coordinator.seed", f"127.0.0.1:{port}")
    err = capsys.readouterr().err
    assert code == 2 and "address already in use" in err, err
    assert not (tmp_path / "k").exists()
