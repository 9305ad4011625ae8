"""The example services' bundles, assembled from one app and one manifest per version.

``deploy/examples/<service>/`` holds what every version shares (``app.py``) and a folder per
version with its ``fleetwave.toml`` (a file there wins over a shared one of the same name). A
bundle must be self-contained (links out of it are refused), so a version cannot just point at
the shared app: ``bundle`` writes the folder that ``release push`` takes.

Where the examples are: beside the code in a clone (``deploy/examples``), or where the wheel
installed them (``<prefix>/share/fleetwave/examples``), so that ``fleetwave demo`` works either
way.
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from pathlib import Path

from coordinator.errors import FleetwaveError

_CHECKOUT = Path(__file__).resolve().parents[2] / "deploy" / "examples"
_INSTALLED = Path(sys.prefix) / "share" / "fleetwave" / "examples"
SHARED_SKIP = frozenset({"README.md"})  # documentation of the examples, not part of a bundle


def examples_root(given: Path | None = None, service: str = "hello") -> Path:
    """The folder holding ``<service>/<version>/fleetwave.toml``: ``given``, the clone's, or the
    installed copy; FleetwaveError (saying what to do) when none has ``service``."""
    for root in ([given] if given is not None else [_CHECKOUT, _INSTALLED]):
        if any((root / service).glob("*/fleetwave.toml")):
            return root
    where = given or f"{_CHECKOUT} or {_INSTALLED}"
    raise FleetwaveError(
        f"the example bundles are not at {where}; reinstall fleetwave, run from a clone, or pass "
        f"--examples DIR (the folder holding {service}'s app.py and <version>/fleetwave.toml)"
    )


def versions(service: str = "hello", root: Path | None = None) -> list[str]:
    """The versions of ``service`` that have a manifest, in name order."""
    base = examples_root(root, service) / service
    return sorted(p.name for p in base.iterdir() if (p / "fleetwave.toml").is_file())


def bundle(version: str, dest: Path, service: str = "hello", root: Path | None = None) -> Path:
    """Write the bundle of ``service`` ``version`` to ``dest/<version>`` and return that folder
    (replaced if it exists)."""
    base = examples_root(root, service) / service
    own = base / version
    if not (own / "fleetwave.toml").is_file():
        raise FleetwaveError(f"no example {service} {version} in {base}")
    out = dest / version
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for shared in sorted(base.iterdir()):
        if shared.is_file() and shared.name not in SHARED_SKIP:
            shutil.copy2(shared, out / shared.name)
    shutil.copytree(own, out, dirs_exist_ok=True)
    return out


def bundles(dest: Path, service: str = "hello", root: Path | None = None) -> dict[str, Path]:
    """Every version's bundle under ``dest`` (``dest/<version>``), by version."""
    return {v: bundle(v, dest, service, root) for v in versions(service, root)}


_ASSEMBLED: dict[str, Path] = {}


def assembled(version: str, service: str = "hello") -> Path:
    """The bundle of ``service`` ``version`` in a temp dir of this process (every version is
    written on first use, and removed when the process exits): for tests and benchmarks."""
    if service not in _ASSEMBLED:
        made = Path(tempfile.mkdtemp(prefix=f"fleetwave-{service}-"))
        atexit.register(shutil.rmtree, made, True)
        bundles(made, service)
        _ASSEMBLED[service] = made
    return _ASSEMBLED[service] / version
