"""``fleetwave coordinator --config FILE`` at the CLI: a bad file is one line and exit 2 before
anything starts, by flag or by FLEETWAVE_CONFIG; --help documents it."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from coordinator.cli import cli, main


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    code = info.value.code
    return (code if isinstance(code, int) else 1), capsys.readouterr().err


@pytest.mark.parametrize("via", ["flag", "env"])
def test_an_unknown_key_is_one_line_exit_2(tmp_path: Path, via: str,
                                           capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A typo'd key names itself and the file; nothing connects (no broker runs here)."""
    conf = tmp_path / "c.toml"
    conf.write_text('[[notify]]\nurl = "http://127.0.66.9/h"\nsekret = "x"\n')
    argv = ["--nats", "nats://127.0.66.9:1", "coordinator", "--key-file", str(tmp_path / "k")]
    if via == "flag":
        argv += ["--config", str(conf)]
    else:
        monkeypatch.setenv("FLEETWAVE_CONFIG", str(conf))
    code, err = run(argv, capsys)
    assert code == 2
    assert err.strip() == (f"fleetwave: --config {conf}: unknown key `sekret` in [[notify]] #1; "
                           "the keys are http and [[notify]] tables with url and secret")
    assert not (tmp_path / "k").exists()  # refused before the key file was made


def test_help_documents_config_and_http() -> None:
    """--config and --http, with their environment variables, are in --help."""
    text = " ".join(CliRunner().invoke(cli, ["coordinator", "--help"]).output.split())
    assert "--config FILE" in text and "FLEETWAVE_CONFIG" in text
    assert "--http HOST:PORT" in text and "/metrics" in text


def test_the_command_tunes_the_gc_and_starts_the_daemon_on_asyncios_loop(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything ``fleetwave coordinator`` does before the daemon's loop runs, for real: the
    key file is made, the GC set to GC_THRESHOLDS, then ``asyncio.run`` (stubbed here: no
    broker runs) is given the daemon."""
    import asyncio
    import gc

    from coordinator.runtime.daemon import GC_THRESHOLDS

    started: list[str] = []

    def fake_run(main: object) -> int:
        started.append(getattr(main, "__qualname__", ""))
        main.close()  # type: ignore[attr-defined]  # a coroutine never awaited
        return 0

    before = gc.get_threshold()
    monkeypatch.setattr(asyncio, "run", fake_run)
    try:
        code, err = run(["--nats", "nats://127.0.66.9:1", "coordinator", "--key-file",
                         str(tmp_path / "k")], capsys)
        assert gc.get_threshold() == GC_THRESHOLDS
    finally:
        gc.set_threshold(*before)
    assert code == 0, err
    assert started == ["_run_coordinator"] and (tmp_path / "k").exists()


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--lease-ttl", "nan", "'nan' is not a finite number"),
    ("--max-heartbeats-per-second", "nan", "'nan' is not a finite number"),
    ("--events-max-bytes", "9" * 400 + "GiB", "is far too large"),
])
def test_a_number_no_range_can_hold_is_one_line_exit_2(
        flag: str, value: str, says: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """NaN passes every comparison of a range (a --lease-ttl of nan left standbys never taking
    over a dead leader) and a size of 400 digits overflowed into a traceback (found by a
    review): one line and exit 2, before anything starts."""
    code, err = run(["--nats", "nats://127.0.66.9:1", "coordinator", "--key-file",
                     str(tmp_path / "k"), flag, value], capsys)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "k").exists()
