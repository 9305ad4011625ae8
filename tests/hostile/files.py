"""Hostile files an operator pushes: ``fleetwave.toml`` manifests and ``.tar.gz`` bundles."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import stat
import tarfile
import tomllib
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from protocol.bundle import BundleError, Limits, safe_unpack
from protocol.errors import ProtocolError
from protocol.expand import expand_argv
from protocol.manifest import MANIFEST_NAME, Manifest, parse_manifest
from tests.hostile.kit import CASE_SECONDS, blob, ints, mutate, pick, shaped, spoil, txt, within

# -- manifests -------------------------------------------------------------------------------------

VALID_MANIFEST = """\
name = "hello"
version = "2.0.0"
port = 8080
command = ["python3", "app.py", "--port=${PORT}", "$${HOME}"]
env = { GREETING = "hi" }
[health]
http = "/healthz"
interval = "500ms"
timeout = "1s"
healthy_threshold = 2
start_timeout = "30s"
[stop]
drain = "2s"
[hooks]
pre_start = ["./migrate", "${FLEETWAVE_SLOT}", "${FLEETWAVE_NODE}@${FLEETWAVE_VERSION}"]
"""
DURATIONS = ["500ms", "0", "1m30s", "1e5s", "-1s", "\u0665s", "1.5.5s", "9" * 400 + "h", "", " 1s "]


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string (lone surrogates aside)
    if isinstance(value, int | float):
        return repr(value) if not isinstance(value, float) or value == value else "nan"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return '""'


def to_toml(doc: dict[str, Any]) -> str:
    """TOML text for a dict of plain values and one level of tables."""
    top = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    tables = [
        f"[{_toml_key(k)}]\n"
        + "\n".join(f"{_toml_key(a)} = {_toml_value(b)}" for a, b in v.items())
        for k, v in doc.items()
        if isinstance(v, dict)
    ]
    return "\n".join(top + tables) + "\n"


@st.composite
def manifest_texts(draw: Any) -> str:
    """fleetwave.toml text: schema-shaped (durations as strings), spoiled, mutated, or junk."""
    how = draw(pick(tuple(["shaped", "spoiled", "mutated", "junk"])))
    if how == "junk":
        return str(draw(txt(300)))
    if how == "mutated":
        data = mutate(VALID_MANIFEST.encode(), draw)
        return data.decode("utf-8", "replace")
    if how == "shaped":  # every key the Struct has, values of its types, durations as text
        doc = draw(shaped(Manifest))
        for table in ("health", "stop", "hooks"):
            section = doc.get(table)
            if isinstance(section, dict):
                for key in list(section):
                    if key.endswith(("interval", "timeout", "drain")):
                        section[key] = draw(pick(tuple(DURATIONS)))
        return to_toml(doc)
    doc = tomllib.loads(VALID_MANIFEST)  # a valid manifest with one to three places spoiled
    for _ in range(draw(ints(1, 3))):
        doc = spoil(doc, draw)
    return to_toml(doc)


def check_manifest(text: str) -> None:
    """Property: a manifest parses into one an agent can act on, or raises ProtocolError.

    Acting on it means: every argv and env string can be passed to exec (no NUL), before and
    after the agent fills its ``${NAME}``s, the health path can go on a request line as it is
    (visible ASCII, no space), thresholds and durations are usable numbers."""

    def run() -> None:
        try:
            m = parse_manifest(text)
        except ProtocolError:
            return
        argvs = [m.command, m.health.exec or [], m.hooks.pre_start or [], m.hooks.validate or []]
        for arg in (a for argv in argvs for a in argv):
            assert arg and "\0" not in arg, f"argv element {arg!r} cannot be exec'd"
        values = {"FLEETWAVE_NODE": "node-1", "FLEETWAVE_SLOT": "a",
                  "FLEETWAVE_VERSION": m.version} | ({} if m.port is None else {"PORT": "40000"})
        for arg in (a for argv in argvs for a in expand_argv(argv, values)):
            assert arg and "\0" not in arg, f"filled argv element {arg!r} cannot be exec'd"
        for key, value in m.env.items():
            assert key and "=" not in key and "\0" not in key + value, f"env {key!r}={value!r}"
        if m.health.http is not None:
            assert re.fullmatch(r"/[!-~]*", m.health.http), f"health.http {m.health.http!r}"
        assert m.port is None or 1 <= m.port <= 65535
        for seconds in (m.health.interval, m.health.timeout, m.health.start_timeout,
                        m.stop.drain, m.stop.timeout, m.hooks.timeout):
            assert 0 <= seconds < float("inf")

    within(CASE_SECONDS, run)


# -- bundles ---------------------------------------------------------------------------------------

MEMBER_NAMES = [
    "app.py", "bin/run", "a/b/c.txt", "../escape", "/etc/passwd", "./ok", "a/../../x", "a//b",
    "dup", "dup", "link", "link/inside", ".", "", "a\x00b", "x" * 300, "é/ü", "a/",
    "fleetwave.toml",
    "dir/", "\\..\\win",
]
LINK_TARGETS = ["app.py", "../..", "/etc", "link", "a/b", "nope", "", "dir/../../x", "." ]
TYPES = [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
         tarfile.BLKTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE, b"x"]
SMALL = Limits(max_entries=40, max_bytes=64 * 1024, max_path=200)


@st.composite
def bundles(draw: Any) -> bytes:
    """A .tar.gz with hostile members (names, types, links, modes, sizes), or one broken after."""
    fmt = draw(pick(tuple([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        if draw(ints(0, 9)):  # most bundles carry a manifest, so unpacking gets far
            manifest = VALID_MANIFEST.encode() if draw(ints(0, 3)) else draw(blob(200))
            info = tarfile.TarInfo(MANIFEST_NAME)
            info.size = len(manifest)
            tar.addfile(info, io.BytesIO(manifest))
        for _ in range(draw(ints(0, 6))):
            name = draw(pick(tuple(MEMBER_NAMES), text=30))
            info = tarfile.TarInfo(name)
            info.type = draw(pick(tuple(TYPES)))
            info.mode = draw(ints(0, 0o7777))
            info.linkname = draw(pick(tuple(LINK_TARGETS), text=20))
            data = draw(blob(64))
            info.size = len(data) if info.type in (tarfile.REGTYPE, tarfile.CONTTYPE) else 0
            lies = draw(ints(0, 9)) == 0
            if lies:  # a size that lies: the header is written by hand, tarfile would not
                info.size = draw(pick(tuple([0, 1, 10**6, 2**33 - 1])))
            info.mtime = draw(pick(tuple([0, -1, 2**33 - 1])))
            if fmt == tarfile.PAX_FORMAT and draw(ints(0, 4)) == 0:
                info.pax_headers = {
                    draw(pick(tuple(["GNU.sparse.map", "path", "linkpath", "size", "x"]))):
                        draw(txt(20))
                }
            try:
                if lies:
                    raw = info.tobuf(fmt, "utf-8", "surrogateescape")
                    raw += data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)
                    tar.fileobj.write(raw)
                    tar.offset += len(raw)
                else:
                    tar.addfile(info, io.BytesIO(data))
            except (ValueError, tarfile.TarError, UnicodeError, OverflowError):
                pass  # tarfile refused to write it: the next one
    data = buf.getvalue()
    if draw(ints(0, 3)) == 0:
        data = mutate(data, draw)
    gz = gzip.compress(data, mtime=0)
    if draw(ints(0, 7)) == 0:
        gz = mutate(gz, draw)
    return gz


def check_bundle(data: bytes, workdir: Path) -> None:
    """Property: unpacking refuses with BundleError, leaving nothing behind, or writes a tree of
    plain files, directories and in-tree symlinks only, modes normalised."""
    dest = workdir / "release"
    before = set(os.listdir(workdir))

    def run() -> None:
        try:
            safe_unpack(data, dest, limits=SMALL)
        except BundleError:
            assert not dest.exists(), "a refused bundle left its destination behind"
            assert set(os.listdir(workdir)) == before, "a refused bundle left files behind"
            return
        root = dest.resolve()
        for path in [dest, *dest.rglob("*")]:
            st_ = path.lstat()
            if stat.S_ISLNK(st_.st_mode):
                target = os.readlink(path)
                assert not os.path.isabs(target), f"{path}: absolute link {target!r}"
                assert path.resolve().is_relative_to(root), f"{path}: link out of the tree"
            else:
                assert stat.S_ISREG(st_.st_mode) or stat.S_ISDIR(st_.st_mode), f"{path}: kind"
                assert st_.st_mode & 0o7022 == 0, f"{path}: mode {oct(st_.st_mode)}"
        shutil.rmtree(dest)

    within(CASE_SECONDS, run)
