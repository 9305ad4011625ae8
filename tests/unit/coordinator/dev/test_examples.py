"""coordinator.dev.examples: a version's bundle is the shared app plus that version's files."""

from pathlib import Path

import pytest

from coordinator.dev import examples
from coordinator.errors import FleetwaveError


def _tree(root: Path) -> Path:
    svc = root / "hello"
    (svc / "1.0.0").mkdir(parents=True)
    (svc / "2.0.0").mkdir()
    (svc / "app.py").write_text("shared\n")
    (svc / "README.md").write_text("docs\n")
    (svc / "1.0.0" / "fleetwave.toml").write_text('version = "1.0.0"\n')
    (svc / "2.0.0" / "fleetwave.toml").write_text('version = "2.0.0"\n')
    (svc / "2.0.0" / "app.py").write_text("own\n")
    return root


def test_bundle_is_the_shared_app_and_the_version_s_own_files(tmp_path: Path) -> None:
    """Shared files are copied (README aside) and a version's own file of the same name wins."""
    root = _tree(tmp_path / "ex")
    one = examples.bundle("1.0.0", tmp_path / "out", root=root)
    assert sorted(p.name for p in one.iterdir()) == ["app.py", "fleetwave.toml"]
    assert (one / "app.py").read_text() == "shared\n"
    two = examples.bundle("2.0.0", tmp_path / "out", root=root)
    assert (two / "app.py").read_text() == "own\n"
    assert examples.versions(root=root) == ["1.0.0", "2.0.0"]


def test_bundle_replaces_an_older_copy(tmp_path: Path) -> None:
    """Writing a bundle again leaves no file of the previous one behind."""
    root = _tree(tmp_path / "ex")
    out = examples.bundle("1.0.0", tmp_path / "out", root=root)
    (out / "stale").write_text("x")
    assert not (examples.bundle("1.0.0", tmp_path / "out", root=root) / "stale").exists()


def test_unknown_versions_and_missing_examples_are_clear_errors(tmp_path: Path) -> None:
    """A version without a manifest, or a folder without examples, names what is missing."""
    root = _tree(tmp_path / "ex")
    with pytest.raises(FleetwaveError, match=r"no example hello 9\.9\.9"):
        examples.bundle("9.9.9", tmp_path / "out", root=root)
    with pytest.raises(FleetwaveError, match="--examples DIR"):
        examples.examples_root(tmp_path / "empty")


def test_the_shipped_examples_assemble_into_their_versions() -> None:
    """The examples this installation has (the clone's here) hold hello 1.0.0 and 2.0.0."""
    assert {"1.0.0", "2.0.0", "2.1.0"} <= set(examples.versions())
    assert (examples.assembled("1.0.0") / "app.py").is_file()
