"""Release bundles: pack a directory into a deterministic ``.tar.gz``, digest it, unpack it safely.

Theory of operation. Every bundle, whether it starts as a directory or as a tarball someone else
made, goes through one canonical form: a sorted list of *entries* (regular file, directory or
in-tree symlink, each with a normalised relative path and mode). ``pack`` writes that list as a
PAX tar with fixed mtime, uid/gid 0 and no owner names, gzip-compressed with a zero gzip mtime and
no file name, so the same content always gives the same bytes and the same sha256 (with the same
zlib). A ``.tar.gz`` given to ``pack`` is validated with the unpacking rules and *re-packed*, never
used as is: its digest then depends on its content only, not on the tool, clock or user that made
it, and a directory and a tarball of the same tree are the same release.

``safe_unpack`` trusts nothing in the archive and checks every member itself before writing any
byte (Python 3.11's tarfile extraction filters are not relied on). Refused, with the entry named:
absolute paths, ``..`` components, duplicate paths, paths that pass through a symlink or a file,
symlinks whose target is absolute or resolves (following the archive's own symlinks) outside the
tree, hardlinks to anything but an earlier regular file, devices, fifos and every other member
type, too many entries or too many bytes once decompressed (the decompression-bomb limit, enforced
while inflating), trailing garbage, and a missing or invalid ``fleetwave.toml``. Modes are
normalised, not refused: files become 0644 or 0755 (if any execute bit was set), directories
0755, so setuid/setgid/sticky bits and world-writable files never reach the disk. Hardlinks become
independent copies. Extraction goes into a fresh temp directory beside ``dest`` that is renamed
into place only when everything is written and fsynced, so ``dest`` is either absent or complete.

Decision: ``__pycache__`` directories and ``*.pyc`` files are left out when packing a directory:
they are interpreter caches, appear by merely importing the code, and would make one source tree
push as two different digests.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import posixpath
import shutil
import stat
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from protocol.errors import ProtocolError
from protocol.manifest import MANIFEST_NAME, Manifest, parse_manifest

if TYPE_CHECKING:
    # tarfile itself is imported where bundles are packed or read, not here: every agent imports
    # this module, and an idle agent that has nothing to unpack should not keep tarfile resident.
    import tarfile

FIXED_MTIME = 0
MAX_SYMLINK_DEPTH = 40
_GZIP_MAGIC = b"\x1f\x8b"
_SKIP_DIRS = frozenset({"__pycache__"})
_SKIP_SUFFIXES = (".pyc",)


class BundleError(ProtocolError):
    """A bundle that fleetwave refuses; the message names the entry and the reason."""


@dataclass(frozen=True)
class Limits:
    """What one bundle may hold; beyond it the bundle is refused before anything is written."""

    max_entries: int = 10_000
    max_bytes: int = 256 * 1024 * 1024  # decompressed tar size, headers included
    max_path: int = 1024


DEFAULT_LIMITS = Limits()

Kind = Literal["file", "dir", "symlink"]


@dataclass(frozen=True)
class _Entry:
    path: str  # normalised, relative, "/"-separated, never "" or "."
    kind: Kind
    mode: int = 0
    data: bytes = b""
    target: str = ""  # symlinks only


def digest(data: bytes) -> str:
    """Return the content address of bundle bytes: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def pack(path: Path, *, limits: Limits = DEFAULT_LIMITS) -> tuple[bytes, Manifest]:
    """Pack a bundle directory or ``.tar.gz`` into canonical gzip-tar bytes and its manifest."""
    path = Path(path)
    if path.is_dir():
        entries = _read_dir(path, limits)
        source = str(path)
    elif path.is_file():
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise BundleError(f"{path}: cannot read: {exc.strerror}") from None
        entries = _read_tar(raw, limits)
        source = str(path)
    else:
        raise BundleError(f"{path}: no such directory or .tar.gz file")
    entries = _canonical(entries)
    manifest = _manifest(entries, source)
    data = _write_tar(entries)
    if len(data) > limits.max_bytes:
        raise BundleError(
            f"{path}: bundle is {len(data)} bytes, above the {limits.max_bytes} limit"
        )
    return data, manifest


def inspect(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> Manifest:
    """Validate bundle bytes with every unpacking rule, without writing; return the manifest."""
    return _manifest(_canonical(_read_tar(data, limits)), "bundle")


def safe_unpack(data: bytes, dest: Path, *, limits: Limits = DEFAULT_LIMITS) -> Manifest:
    """Check every member of ``data``, then unpack it to ``dest`` (which must not exist) at once."""
    dest = Path(dest)
    entries = _canonical(_read_tar(data, limits))
    manifest = _manifest(entries, "bundle")
    if dest.exists() or dest.is_symlink():
        raise BundleError(f"{dest}: already exists; unpack into a new directory")
    parent = dest.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=parent))
    except OSError as exc:
        raise BundleError(f"{dest}: cannot create a directory beside it: {exc.strerror}") from None
    try:
        _extract(entries, tmp)
        tmp.chmod(0o755)  # mkdtemp makes 0700; a release dir is readable by the services
        _fsync_dir(tmp)
        tmp.rename(dest)
        _fsync_dir(parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise BundleError(f"{dest}: cannot unpack: {exc.strerror or exc}") from None
        raise
    return manifest


# -- reading ---------------------------------------------------------------------------------------


def _read_dir(root: Path, limits: Limits) -> list[_Entry]:
    entries: list[_Entry] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if name.endswith(_SKIP_SUFFIXES) and name in filenames:
                continue
            st = full.lstat()
            if stat.S_ISLNK(st.st_mode):
                entries.append(_Entry(rel, "symlink", 0o777, target=str(full.readlink())))
            elif stat.S_ISDIR(st.st_mode):
                entries.append(_Entry(rel, "dir", st.st_mode))
            elif stat.S_ISREG(st.st_mode):
                try:
                    data = full.read_bytes()
                except OSError as exc:
                    raise BundleError(f"{full}: cannot read: {exc.strerror}") from None
                total += len(data)
                if total > limits.max_bytes:
                    raise BundleError(f"{root}: more than {limits.max_bytes} bytes of files")
                entries.append(_Entry(rel, "file", st.st_mode, data))
            else:
                raise BundleError(
                    f"{root}: entry {rel!r} is a {_kind_name(st.st_mode)}; bundles hold only "
                    "regular files, directories and in-tree symlinks"
                )
            if len(entries) > limits.max_entries:
                raise BundleError(f"{root}: more than {limits.max_entries} entries")
    return entries


def _inflate(data: bytes, limits: Limits) -> bytes:
    """Gunzip ``data`` (possibly several gzip members), refusing output above the byte limit."""
    if not data.startswith(_GZIP_MAGIC):
        raise BundleError("bundle is not a gzip-compressed tar (.tar.gz)")
    out = bytearray()
    rest = data
    try:
        while rest:
            d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            chunk = d.decompress(rest, limits.max_bytes + 1 - len(out))
            out += chunk
            if len(out) > limits.max_bytes or d.unconsumed_tail:
                raise BundleError(
                    f"bundle inflates to more than {limits.max_bytes} bytes (decompression limit)"
                )
            if not d.eof:
                raise BundleError("bundle is truncated: the gzip stream ends early")
            rest = d.unused_data
            if rest and not rest.startswith(_GZIP_MAGIC):
                raise BundleError("bundle has trailing bytes after the gzip stream")
    except zlib.error as exc:
        raise BundleError(f"bundle is not valid gzip: {exc}") from None
    return bytes(out)


def _read_tar(data: bytes, limits: Limits) -> list[_Entry]:
    import tarfile

    raw = _inflate(data, limits)
    entries: list[_Entry] = []
    files: dict[str, _Entry] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
            for count, member in enumerate(tf, start=1):
                if count > limits.max_entries:
                    raise BundleError(f"bundle has more than {limits.max_entries} entries")
                entry = _member(tf, member, files, limits)
                if entry is None:
                    continue
                entries.append(entry)
                if entry.kind == "file":
                    files[entry.path] = entry
            end = tf.offset
    except tarfile.TarError as exc:
        raise BundleError(f"bundle is not a valid tar: {exc}") from None
    except (EOFError, OSError) as exc:
        raise BundleError(f"bundle is truncated or corrupt: {exc}") from None
    if raw[end:].strip(b"\0"):
        raise BundleError("bundle has unreadable data after its last valid entry (corrupt tar)")
    return entries


def _member(
    tf: tarfile.TarFile, m: tarfile.TarInfo, files: dict[str, _Entry], limits: Limits
) -> _Entry | None:
    path = _clean(m.name, limits)
    if path is None:  # the archive's root itself ("." or "./")
        if not m.isdir():
            raise BundleError(f"bundle entry {m.name!r} names the root but is not a directory")
        return None
    if m.isreg():
        f = tf.extractfile(m)
        if f is None:  # isreg() members always have data; defensive for odd tarfile subclasses
            raise BundleError(f"bundle entry {m.name!r} has no data")
        payload = f.read()
        if len(payload) != m.size:
            raise BundleError(f"bundle entry {m.name!r} is truncated")
        return _Entry(path, "file", m.mode, payload)
    if m.isdir():
        return _Entry(path, "dir", m.mode)
    if m.issym():
        if not m.linkname:
            raise BundleError(f"bundle entry {m.name!r} is a symlink with an empty target")
        return _Entry(path, "symlink", 0o777, target=m.linkname)
    if m.islnk():
        try:
            target = _clean(m.linkname, limits)
        except BundleError as exc:
            msg = f"bundle entry {m.name!r} is a hardlink out of the tree: {exc}"
            raise BundleError(msg) from None
        if target is None or target not in files:
            raise BundleError(
                f"bundle entry {m.name!r} is a hardlink to {m.linkname!r}, which is not a regular "
                "file earlier in the bundle"
            )
        return _Entry(path, "file", files[target].mode, files[target].data)
    raise BundleError(
        f"bundle entry {m.name!r} is a {_TAR_KINDS.get(m.type, f'type {m.type!r} member')}; "
        "bundles hold only regular files, directories and in-tree links"
    )


_TAR_KINDS = {  # POSIX ustar typeflags (tarfile.CHRTYPE, BLKTYPE, FIFOTYPE)
    b"3": "character device",
    b"4": "block device",
    b"6": "fifo",
}


def _clean(name: str, limits: Limits) -> str | None:
    """Normalise an archive path; refuse absolute paths, ``..`` and oddities. None: the root."""
    if not name or "\0" in name:
        raise BundleError(f"bundle entry {name!r} has an empty or NUL-containing name")
    if len(name) > limits.max_path:
        raise BundleError(f"bundle entry {name[:60]!r}... has a path above {limits.max_path} chars")
    if name.startswith("/"):
        raise BundleError(f"bundle entry {name!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BundleError(f"bundle entry {name!r} has a '..' component")
    if any(len(p.encode()) > 255 for p in parts):
        raise BundleError(f"bundle entry {name!r} has a path component above 255 bytes")
    return "/".join(parts) if parts else None


# -- the canonical form ----------------------------------------------------------------------------


def _canonical(entries: list[_Entry]) -> list[_Entry]:
    """Check the tree as a whole, add missing parent directories, normalise modes, sort."""
    by_path: dict[str, _Entry] = {}
    for e in entries:
        if e.path in by_path:
            raise BundleError(f"bundle entry {e.path!r} appears twice")
        by_path[e.path] = e
    for e in entries:
        parts = e.path.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            above = by_path.get(prefix)
            if above is None:
                by_path[prefix] = _Entry(prefix, "dir")
            elif above.kind != "dir":
                raise BundleError(
                    f"bundle entry {e.path!r} lies under {prefix!r}, which is a {above.kind}, "
                    "not a directory"
                )
    links = {p: e.target for p, e in by_path.items() if e.kind == "symlink"}
    for path, target in links.items():
        if target.startswith("/"):
            raise BundleError(f"bundle entry {path!r} is a symlink to an absolute path {target!r}")
        _resolve(posixpath.dirname(path).split("/") if "/" in path else [], target, links, path, 0)
    out = []
    for path in sorted(by_path):
        e = by_path[path]
        if e.kind == "file":
            mode = 0o755 if e.mode & 0o111 else 0o644
        elif e.kind == "dir":
            mode = 0o755
        else:
            mode = 0o777
        out.append(_Entry(path, e.kind, mode, e.data, e.target))
    return out


def _resolve(
    base: list[str], target: str, links: dict[str, str], link: str, depth: int
) -> list[str]:
    """Resolve ``target`` from directory ``base`` inside the archive, following its symlinks."""
    if depth > MAX_SYMLINK_DEPTH:
        raise BundleError(f"bundle entry {link!r} is a symlink loop (more than 40 levels)")
    if target.startswith("/"):
        raise BundleError(f"bundle entry {link!r} is a symlink that leads to absolute {target!r}")
    stack = list(base)
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                raise BundleError(
                    f"bundle entry {link!r} is a symlink to {links[link]!r}, which leads out of "
                    "the bundle"
                )
            stack.pop()
            continue
        stack.append(part)
        inner = links.get("/".join(stack))
        if inner is not None:
            stack.pop()
            stack = _resolve(stack, inner, links, link, depth + 1)
    return stack


def _manifest(entries: list[_Entry], source: str) -> Manifest:
    entry = next((e for e in entries if e.path == MANIFEST_NAME), None)
    if entry is None:
        raise BundleError(f"{source}: no {MANIFEST_NAME} at the root of the bundle")
    if entry.kind != "file":
        raise BundleError(f"{source}: {MANIFEST_NAME} must be a regular file, not a {entry.kind}")
    try:
        text = entry.data.decode("utf-8")
    except UnicodeDecodeError:
        raise BundleError(f"{source}: {MANIFEST_NAME} is not UTF-8 text") from None
    try:
        return parse_manifest(text, source=f"{source}: {MANIFEST_NAME}")
    except ProtocolError as exc:
        raise BundleError(str(exc)) from None


# -- writing ---------------------------------------------------------------------------------------


def _write_tar(entries: list[_Entry]) -> bytes:
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            info = tarfile.TarInfo(e.path)
            info.mtime = FIXED_MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = e.mode
            if e.kind == "file":
                info.type = tarfile.REGTYPE
                info.size = len(e.data)
                tf.addfile(info, io.BytesIO(e.data))
            elif e.kind == "dir":
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.type = tarfile.SYMTYPE
                info.linkname = e.target
                tf.addfile(info)
    # gzip by hand: zero mtime and no file name in the header, so the bytes depend on content only.
    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return comp.compress(buf.getvalue()) + comp.flush()


def _extract(entries: list[_Entry], root: Path) -> None:
    # Entries are sorted, so every parent directory is created before its children; paths were
    # checked to pass through no symlink, so O_NOFOLLOW|O_EXCL on the last component suffices.
    for e in entries:
        target = root / e.path
        if e.kind == "dir":
            target.mkdir(mode=0o700)
        elif e.kind == "symlink":
            target.symlink_to(e.target)
        else:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(e.data)
                f.flush()
                os.fsync(f.fileno())
            target.chmod(e.mode)
    for e in reversed(entries):  # directories last, so a 0755 dir was writable while filled
        if e.kind == "dir":
            (root / e.path).chmod(e.mode)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories
            os.fsync(fd)
    finally:
        os.close(fd)


def _kind_name(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"
