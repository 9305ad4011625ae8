"""``fleetwave auth``'s web token commands and ``auth revoke`` of an operator: what a bad DIR
or NAME is told (nothing changes on disk), and the operator's token removed with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.auth import web_tokens
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


def test_add_web_token_refuses_a_name_that_is_no_operator_and_makes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``add-web-token DIR carol --auth-dir AUTH``, carol not enrolled in AUTH: exit 2, one
    line, DIR not made; in AUTH itself the same, its token file not made."""
    code, _, _ = run(capsys, "init", str(tmp_path / "auth"))
    assert code == 0
    web = tmp_path / "web"
    for args in (["add-web-token", str(web), "carol", "--auth-dir", str(tmp_path / "auth")],
                 ["add-web-token", str(tmp_path / "auth"), "carol"]):
        code, out, err = run(capsys, *args)
        assert (code, out) == (2, ""), err
        assert len(err.strip().splitlines()) == 1 and "'carol' is not an enrolled operator" in err
    assert not web.exists() and not (tmp_path / "auth" / web_tokens.FILE_NAME).exists()


def test_revoke_of_an_operator_removes_its_token_from_the_auth_directorys_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``auth revoke AUTH alice`` also removes alice's token from AUTH/web-tokens.json (and
    says so), keeping admin's."""
    auth = str(tmp_path / "auth")
    for args in (["init", auth], ["add-operator", auth, "alice"],
                 ["add-web-token", auth, "alice"], ["add-web-token", auth, "admin"]):
        code, _, err = run(capsys, *args)
        assert code == 0, err
    code, out, err = run(capsys, "revoke", auth, "alice")
    assert code == 0, err
    assert f"its dashboard token removed from {tmp_path / 'auth' / web_tokens.FILE_NAME}" in out
    kept = web_tokens.read(tmp_path / "auth" / web_tokens.FILE_NAME)
    assert [t.name for t in kept] == ["admin"]


@pytest.mark.parametrize("command", [["init", ""], ["add-node", "", "n1"], ["prune", " "]])
def test_an_empty_auth_directory_is_refused_in_one_line(
        command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``Path('')`` is the current directory: ``auth init ''`` said ". already exists"."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *command)
    assert (code, out) == (2, "")
    assert len(err.strip().splitlines()) == 1 and "is empty" in err, err
    assert list(tmp_path.iterdir()) == []
