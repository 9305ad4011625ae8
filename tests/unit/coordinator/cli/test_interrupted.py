"""Ctrl-C during a followed deploy: the rollout runs on, and the line says which and how to
follow it again (it said "interrupted" alone; the id had scrolled away on stderr)."""

from __future__ import annotations

from typing import Any

import pytest

import coordinator.cli as cli_module
from coordinator.cli import base


def interrupted(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                followed: list[str]) -> str:
    def ctrl_c(*_: Any, **__: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module.cli, "main", ctrl_c)
    monkeypatch.setattr(base, "followed", followed)
    with pytest.raises(SystemExit) as stop:
        cli_module.main(["deploy", "hello", "2.0.0"])
    assert stop.value.code == 130
    return capsys.readouterr().err


def test_a_ctrl_c_while_following_names_the_rollout_that_runs_on(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    err = interrupted(monkeypatch, capsys, ["hello-r1"])
    assert err == ("fleetwave: interrupted; rollout hello-r1 runs on: follow it with 'fleetwave "
                   "status hello-r1' (or stop it with 'fleetwave abort hello-r1')\n")


def test_a_ctrl_c_of_anything_else_is_one_word(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert interrupted(monkeypatch, capsys, []) == "fleetwave: interrupted\n"
