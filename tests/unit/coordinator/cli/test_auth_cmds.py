"""``fleetwave auth``'s web token commands: what a bad DIR or NAME is told, and that it changes
nothing on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.cli import main


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(["auth", *args])
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def test_revoke_web_token_in_a_missing_directory_makes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``revoke-web-token`` on a directory that does not exist exits 2 with one line and
    leaves it not existing (no directory, no lock file)."""
    typo = tmp_path / "typo-web"
    code, out, err = run(capsys, "revoke-web-token", str(typo), "alice")
    assert (code, out) == (2, "")
    assert len(err.strip().splitlines()) == 1 and "typo-web" in err, err
    assert not typo.exists()
