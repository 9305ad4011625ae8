"""``fleetwave demo --examples DIR``: the hello example's folder, or the folder holding it; any
other folder is one usage line naming it (``demo.examples_dir``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.cli import main
from coordinator.dev.demo import examples_dir


def _hello(root: Path) -> Path:
    (root / "hello" / "1.0.0").mkdir(parents=True)
    (root / "hello" / "1.0.0" / "fleetwave.toml").write_text("")
    return root / "hello"


def test_a_folder_without_manifests_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """The path given, what it lacks, what to pass: one line, exit 2, before any fleet."""
    with pytest.raises(SystemExit) as info:
        main(["demo", "--examples", str(tmp_path)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--examples {tmp_path} holds no <version>/fleetwave.toml" in err


def test_the_hello_folder_or_its_parent_is_taken(tmp_path: Path) -> None:
    """deploy/examples/hello as the help says, or deploy/examples."""
    hello = _hello(tmp_path)
    assert examples_dir(hello) == hello
    assert examples_dir(tmp_path) == hello
