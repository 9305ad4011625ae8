#!/usr/bin/env python3
"""Build the webapp bundle of one version: ``python3 build.py VERSION OUTDIR [--wheels DIR]``.

OUTDIR (new, or empty) becomes a bundle folder for ``fleetwave release push OUTDIR``:

    OUTDIR/fleetwave.toml     this folder's manifest, with ``version = VERSION``
    OUTDIR/app.py             the app
    OUTDIR/requirements.txt   what lib/ holds, pinned
    OUTDIR/lib/               the dependencies, unpacked: pure-Python wheels only

How: ``pip download`` the pinned wheels into a wheelhouse (``--wheels DIR``, kept for the next
build; a temporary one by default), then ``pip install --no-index --target OUTDIR/lib`` from it.
``--no-index`` skips the download and builds from the wheelhouse alone (a build host without
index access, given a wheelhouse). The wheels are chosen as for any Python 3.11+ on any platform
(``--platform any --abi none``), so a wheel with compiled code is refused by pip, and the bundle
runs on any platform. Console scripts (``lib/bin``: their first line names this machine's
interpreter) are left out; the manifest runs ``python3 -m uvicorn``. The bytecode of the Python
running build.py is included (hash-checked): run it with the hosts' Python for the fastest start.

Needs only Python 3.11+ and pip. Exit 0 built, 1 could not build (one line says why and what to
do), 2 usage.
"""

from __future__ import annotations

import argparse
import compileall
import py_compile
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
COPIED = ("app.py", "requirements.txt")
# The oldest Python the bundle runs on: wheels and environment markers are chosen for it. Pure
# wheels for 3.11 run on every later 3.x.
PYTHON = "3.11"
PURE = ["--only-binary=:all:", "--platform", "any", "--implementation", "py", "--abi", "none",
        "--python-version", PYTHON]
COMPILED = (".so", ".pyd", ".dylib", ".dll")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}")
_VERSION_LINE = re.compile(r'^version = ".*"$', re.M)


class BuildError(Exception):
    """A build that cannot go on; the message is the one line the user reads."""


def pip(*args: str) -> None:
    """Run pip quietly; on failure raise BuildError with pip's own error line."""
    proc = subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check",
                           "-q"], capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines or ["(no output)"]
        raise BuildError(f"pip {args[0]} failed: {errors[0]}")


def manifest_for(version: str) -> str:
    text = (HERE / "fleetwave.toml").read_text(encoding="utf-8")
    text, n = _VERSION_LINE.subn(f'version = "{version}"', text, count=1)
    if n != 1 or tomllib.loads(text).get("version") != version:
        raise BuildError(f"{HERE / 'fleetwave.toml'}: no 'version = \"...\"' line to set")
    return text


def precompile(bundle: Path) -> None:
    """Write the bytecode of this Python (a start compiles nothing: about half the start time
    of this app), checked by the source's hash rather than its mtime, which unpacking may not
    keep; with the build folder left out of it, so that it names nothing of this machine.
    Another Python version ignores these files and compiles as it imports."""
    mode = py_compile.PycInvalidationMode.CHECKED_HASH
    ok = compileall.compile_dir(bundle / "lib", ddir="lib", quiet=1, invalidation_mode=mode)
    ok = ok and compileall.compile_file(bundle / "app.py", ddir=".", quiet=1,
                                        invalidation_mode=mode)
    if not ok:
        raise BuildError(f"cannot compile the bundle's Python files with {sys.executable}")


def build(version: str, out: Path, wheels: Path, *, download: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BuildError(f"{out} exists and is not an empty folder: remove it or name another")
    manifest = manifest_for(version)
    requirements = str(HERE / "requirements.txt")
    wheels.mkdir(parents=True, exist_ok=True)
    if download:
        try:
            pip("download", "--dest", str(wheels), *PURE, "-r", requirements)
        except BuildError as exc:
            raise BuildError(f"cannot fetch the wheels of {requirements}: {exc}; check that "
                             "this host reaches the package index (pip config), or build "
                             "with --no-index from a --wheels folder that holds them") from None
    # Built next to OUTDIR and renamed at the end: a failed build leaves no half bundle.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        try:
            pip("install", "--no-index", "--find-links", str(wheels), "--target",
                str(staging / "lib"), "--no-compile", *PURE, "-r", requirements)
        except BuildError as exc:
            raise BuildError(f"cannot install {requirements} from {wheels}: {exc}; run "
                             "without --no-index to download them") from None
        shutil.rmtree(staging / "lib" / "bin", ignore_errors=True)
        compiled = sorted(str(p.relative_to(staging)) for p in staging.rglob("*")
                          if p.suffix in COMPILED)
        if compiled:
            raise BuildError(f"compiled code in lib/ ({compiled[0]}): the bundle would run "
                             "only on this platform; use pure-Python dependencies")
        for name in COPIED:
            shutil.copy2(HERE / name, staging / name)
        precompile(staging)
        (staging / "fleetwave.toml").write_text(manifest, encoding="utf-8")
        if out.exists():
            out.rmdir()  # checked empty above
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="build.py", description="Build the webapp bundle of VERSION into OUTDIR, for "
        "'fleetwave release push OUTDIR'.")
    parser.add_argument("version", metavar="VERSION", help="the release's version, e.g. 2.0.0")
    parser.add_argument("out", metavar="OUTDIR", type=Path, help="a new or empty folder")
    parser.add_argument("--wheels", type=Path, metavar="DIR",
                        help="the wheelhouse: downloaded wheels are kept here and reused "
                        "(default: a temporary folder)")
    parser.add_argument("--no-index", action="store_true",
                        help="download nothing: build from the --wheels folder alone")
    args = parser.parse_args(argv)
    if not _VERSION.fullmatch(args.version):
        parser.error(f"VERSION {args.version!r} is not allowed: use letters, digits and '.-_+'")
    if args.no_index and args.wheels is None:
        parser.error("--no-index needs --wheels DIR: the wheels to build from")
    try:
        if args.wheels is not None:
            build(args.version, args.out, args.wheels, download=not args.no_index)
        else:
            with tempfile.TemporaryDirectory(prefix="webapp-wheels.") as tmp:
                build(args.version, args.out, Path(tmp), download=True)
    except BuildError as exc:
        print(f"build.py: {exc}", file=sys.stderr)
        return 1
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"build.py: cannot build {args.out}: {exc}", file=sys.stderr)
        return 1
    print(f"built webapp {args.version} in {args.out}: fleetwave release push {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
