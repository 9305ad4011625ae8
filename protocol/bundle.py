"""Release bundles: pack a directory into a deterministic ``.tar.gz``, digest it, unpack it safely.

Theory of operation. Every bundle, whether it starts as a directory or as a tarball someone else
made, goes through one canonical form: a sorted list of *entries* (regular file, directory or
in-tree symlink, each with a normalised relative path and mode). ``pack`` writes that list as a
PAX tar with fixed mtime, uid/gid 0 and no owner names, gzip-compressed with a zero gzip mtime and
no file name, so the same content always gives the same bytes and the same sha256 (with the same
zlib). A ``.tar.gz`` given to ``pack`` is validated with the unpacking rules and *re-packed*, never
used as is: its digest then depends on its content only, not on the tool, clock or user that made
it, and a directory and a tarball of the same tree are the same release. A directory's entries
pass the same name and link-target checks as a tarball's members, and ``pack`` then runs
``inspect`` (the agent's own reading) on the bytes it made: what it returns, every agent accepts.

``safe_unpack`` trusts nothing in the archive and checks every member itself before writing any
byte (Python 3.11's tarfile extraction filters are not relied on). Refused, with the entry named:
absolute paths, ``..`` components, duplicate paths, paths that pass through a symlink or a file,
symlinks whose target is absolute or resolves (following the archive's own symlinks) outside the
tree, hardlinks to anything but an earlier regular file, devices, fifos, sparse files (every GNU
form: the old ``S`` type and the PAX ``GNU.sparse.*`` headers 0.0, 0.1 and 1.0) and every other
member type, too many entries, too many bytes once decompressed (the decompression-bomb limit,
enforced while inflating), files that add up to more than that same limit (hardlink copies
counted in full), a member declaring more bytes than the archive holds, header data (PAX
records, GNU long names) above ``MAX_HEADER_DATA``, trailing garbage, and a missing or invalid
``fleetwave.toml``. Modes are normalised, not refused: files become 0644 or 0755 (if any execute
bit was set), directories 0755, so setuid/setgid/sticky bits and world-writable files never reach
the disk. Extraction goes into a fresh temp directory beside ``dest`` that is renamed into place
only when everything is written and fsynced, so ``dest`` is either absent or complete.

Memory. A bundle is never held whole once inflated, nor is any member: the gzip stream is inflated
chunk by chunk into an unnamed temp file (beside ``dest`` when unpacking, so it lands on the
release cache's disk and not in a RAM-backed /tmp), members are remembered as spans of that file,
and files are copied out of it in ``CHUNK``-sized pieces. Sparse members are refused while their
header is parsed, before tarfile builds their map or reads a byte of them, and the sizes that
header blocks declare are bounded before tarfile reads them. Unpacking counts every byte it writes
against ``Limits.max_bytes`` as well as checking the sum beforehand. Packing a directory counts
its files' sizes from ``lstat`` before reading any, and streams each into the tar when it is
written (a file whose size changed since it was listed is refused).

Decision: hardlinks become independent copies, counted in full against the byte limit, not real
links. ``pack`` re-packs a tarball's links as copies, so a release unpacks to the same tree
whichever client wrote the object; and a service that rewrites one path cannot change another.

Decision: ``__pycache__`` directories and ``*.pyc`` files are left out when packing a directory:
they are interpreter caches, appear by merely importing the code, and would make one source tree
push as two different digests.

Why one long module: it is where hostile input meets the agent, so every rule a bundle must pass
(the tree checks that packing and unpacking share, the tar reader's limits) reads in one place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import os
import posixpath
import re
import shutil
import stat
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Literal, Protocol

from protocol.errors import ProtocolError
from protocol.manifest import MANIFEST_NAME, Manifest, parse_manifest

if TYPE_CHECKING:
    # tarfile itself is imported where bundles are packed or read, not here: every agent imports
    # this module, and an idle agent that has nothing to unpack should not keep tarfile resident.
    import tarfile

    from _typeshed import ReadableBuffer

FIXED_MTIME = 0
# Symlinks followed in resolving one link's target, in all (as the kernel counts: 40), not
# only nested: a chain whose links each name the one before twice doubled the work per level,
# and 467 bytes of bundle took 17 s to resolve (a review), 680 bytes would never have ended.
MAX_SYMLINK_DEPTH = 40
CHUNK = 64 * 1024  # the most of any member, or of the gzip stream, held in memory at once
MAX_HEADER_DATA = 1024 * 1024  # one PAX header or GNU long name; real ones are a few hundred bytes
MAX_MANIFEST = 1024 * 1024
_GZIP_MAGIC = b"\x1f\x8b"
_SKIP_DIRS = frozenset({"__pycache__"})
_SKIP_SUFFIXES = (".pyc",)


class BundleError(ProtocolError):
    """A bundle that fleetwave refuses; the message names the entry and the reason."""


@dataclass(frozen=True)
class Limits:
    """What one bundle may hold; beyond it the bundle is refused before anything is written."""

    max_entries: int = 10_000
    # Both the decompressed tar size (headers included) and the sum of the files that unpacking
    # writes (every hardlink copy counted in full).
    max_bytes: int = 256 * 1024 * 1024
    max_path: int = 1024


DEFAULT_LIMITS = Limits()

Kind = Literal["file", "dir", "symlink"]
Source = bytes | IO[bytes]  # a bundle's gzip bytes, or a file of them (read from its start)


@dataclass(frozen=True)
class _Span:
    """Where a file's bytes lie in the inflated tar."""

    offset: int
    size: int


@dataclass(frozen=True)
class _DirFile:
    """A file of a bundle directory: read only when written into the tar, ``CHUNK`` at a time."""

    path: Path
    size: int  # as lstat saw it when the directory was read; the file must still have it


@dataclass(frozen=True)
class _Entry:
    path: str  # normalised, relative, "/"-separated, never "" or "."
    kind: Kind
    mode: int = 0
    file: _DirFile | None = None  # files read from a directory
    target: str = ""  # symlinks only
    span: _Span | None = None  # files read from a tarball

    @property
    def size(self) -> int:
        if self.span is not None:
            return self.span.size
        return self.file.size if self.file is not None else 0


def digest(data: bytes) -> str:
    """Return the content address of bundle bytes: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def pack(path: Path, *, limits: Limits = DEFAULT_LIMITS) -> tuple[bytes, Manifest]:
    """Pack a bundle directory or ``.tar.gz`` into canonical gzip-tar bytes and its manifest."""
    path = Path(path)
    if path.is_dir():
        return _pack(_read_dir(path, limits), None, str(path), limits)
    if not path.is_file():
        raise BundleError(f"{path}: no such directory or .tar.gz file")
    try:
        src = path.open("rb")
    except OSError as exc:
        raise BundleError(f"{path}: cannot read: {exc.strerror}") from None
    with src, _open_tar(src, limits, None) as archive:
        return _pack(archive.entries, archive, str(path), limits)


def _pack(
    entries: list[_Entry], archive: _Archive | None, source: str, limits: Limits
) -> tuple[bytes, Manifest]:
    entries = _canonical(entries)
    manifest = _manifest(entries, archive, source)
    data = _write_tar(entries, archive)
    if len(data) > limits.max_bytes:
        raise BundleError(
            f"{source}: bundle is {len(data)} bytes, above the {limits.max_bytes} limit"
        )
    # The agent's own reading of these very bytes: whatever the checks above miss (a rule added
    # to unpacking only, a name tarfile writes otherwise than it reads), a bundle that every node
    # would refuse is refused here and never uploaded.
    try:
        inspect(data, limits=limits)
    except BundleError as exc:
        raise BundleError(f"{source}: {exc}") from None
    return data, manifest


def inspect(data: Source, *, limits: Limits = DEFAULT_LIMITS) -> Manifest:
    """Validate a bundle with every unpacking rule, without writing; return the manifest."""
    with _open_tar(data, limits, None) as archive:
        return _manifest(_canonical(archive.entries), archive, "bundle")


def safe_unpack(data: Source, dest: Path, *, limits: Limits = DEFAULT_LIMITS) -> Manifest:
    """Check every member of ``data``, then unpack it to ``dest`` (which must not exist) at once."""
    dest = Path(dest)
    spill = dest.parent if dest.parent.is_dir() else None
    with _open_tar(data, limits, spill) as archive:
        entries = _canonical(archive.entries)
        manifest = _manifest(entries, archive, "bundle")
        _unpack(entries, archive, dest, limits)
    return manifest


def _unpack(entries: list[_Entry], archive: _Archive, dest: Path, limits: Limits) -> None:
    if dest.exists() or dest.is_symlink():
        raise BundleError(f"{dest}: already exists; unpack into a new directory")
    parent = dest.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=parent))
    except OSError as exc:
        raise BundleError(f"{dest}: cannot create a directory beside it: {exc.strerror}") from None
    try:
        _extract(entries, tmp, archive, limits)
        # mkdtemp makes 0700. Its service (perhaps another user) must read and list a release
        # (Python lists each import directory, its working one included); what must not be
        # listed is the parent, where every release's name is (the agent keeps it 0711).
        tmp.chmod(0o755)
        _fsync_dir(tmp)
        tmp.rename(dest)
        _fsync_dir(parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise BundleError(f"{dest}: cannot unpack: {exc.strerror or exc}") from None
        raise


# -- reading ---------------------------------------------------------------------------------------


def _read_dir(root: Path, limits: Limits) -> list[_Entry]:
    entries: list[_Entry] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root, onerror=_unlisted):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if name.endswith(_SKIP_SUFFIXES) and name in filenames:
                continue
            try:
                _clean(rel, limits)  # the checks unpacking applies to the same name
                st = full.lstat()
                if stat.S_ISLNK(st.st_mode):
                    target = str(full.readlink())
                    _check_target(rel, target, limits)
            except BundleError as exc:
                raise BundleError(f"{root}: {exc}") from None
            except OSError as exc:
                raise BundleError(f"{full}: cannot read: {exc.strerror}") from None
            if stat.S_ISLNK(st.st_mode):
                entries.append(_Entry(rel, "symlink", 0o777, target=target))
            elif stat.S_ISDIR(st.st_mode):
                entries.append(_Entry(rel, "dir", st.st_mode))
            elif stat.S_ISREG(st.st_mode):
                # Counted from lstat, before a byte is read: a 2 GiB file is refused as such,
                # not after it is in memory (a review saw 2.1 GB resident).
                total += st.st_size
                if total > limits.max_bytes:
                    raise BundleError(
                        f"{root}: more than {limits.max_bytes} bytes of files (with {rel!r}, "
                        f"{st.st_size} bytes)"
                    )
                entries.append(_Entry(rel, "file", st.st_mode, file=_DirFile(full, st.st_size)))
            else:
                raise BundleError(
                    f"{root}: entry {rel!r} is a {_kind_name(st.st_mode)}; bundles hold only "
                    "regular files, directories and in-tree symlinks"
                )
            if len(entries) > limits.max_entries:
                raise BundleError(f"{root}: more than {limits.max_entries} entries")
    return entries


def _unlisted(exc: OSError) -> None:
    """os.walk's onerror: a directory it cannot list would otherwise be left out silently."""
    raise BundleError(f"{exc.filename}: cannot list it: {exc.strerror or exc}")


class _Archive:
    """An inflated tar in an unnamed temp file, with its members read as entries (not yet
    checked as a tree); file bytes stay in the file until copied out."""

    def __init__(self, file: IO[bytes], entries: list[_Entry]) -> None:
        self.file = file
        self.entries = entries

    def read(self, span: _Span) -> bytes:
        """The bytes of a small span (callers bound its size)."""
        self.file.seek(span.offset)
        data = self.file.read(span.size)
        if len(data) != span.size:  # spans are checked against the length when read
            raise BundleError("bundle is truncated: a file's data ends early")
        return data

    def seek(self, span: _Span) -> IO[bytes]:
        """The file, positioned at the start of ``span``, for a reader that takes ``span.size``."""
        self.file.seek(span.offset)
        return self.file

    def copy(self, span: _Span, out: IO[bytes]) -> None:
        """Copy ``span`` to ``out`` ``CHUNK`` bytes at a time."""
        self.file.seek(span.offset)
        left = span.size
        while left:
            chunk = self.file.read(min(CHUNK, left))
            if not chunk:
                raise BundleError("bundle is truncated: a file's data ends early")
            out.write(chunk)
            left -= len(chunk)


@contextlib.contextmanager
def _open_tar(source: Source, limits: Limits, spill: Path | None) -> Iterator[_Archive]:
    """Inflate ``source`` into a temp file in ``spill`` (the system's if None) and read it."""
    src: IO[bytes] = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        tar = tempfile.TemporaryFile(dir=spill)  # noqa: SIM115 (the with below owns it)
    except OSError as exc:
        msg = f"cannot make a temp file to inflate the bundle: {exc.strerror}"
        raise BundleError(msg) from None
    with tar:
        try:
            src.seek(0)
            length = _inflate(src, tar, limits)
            entries = _read_tar(tar, length, limits)
        except OSError as exc:
            raise BundleError(f"cannot inflate the bundle: {exc.strerror or exc}") from None
        yield _Archive(tar, entries)


def _inflate(src: IO[bytes], out: IO[bytes], limits: Limits) -> int:
    """Gunzip ``src`` (possibly several gzip members) into ``out``; refuse output above the limit.

    Returns the inflated length. At most ``CHUNK`` bytes of input and of output are held at once.
    """
    buf = _read_at_least(src, b"", len(_GZIP_MAGIC))
    if not buf.startswith(_GZIP_MAGIC):
        raise BundleError("bundle is not a gzip-compressed tar (.tar.gz)")
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    total = 0
    try:
        while True:
            starved = False
            if not buf:
                buf = src.read(CHUNK)
                starved = not buf
            chunk = d.decompress(buf, CHUNK)
            buf = d.unconsumed_tail
            total += len(chunk)
            if total > limits.max_bytes:
                raise BundleError(
                    f"bundle inflates to more than {limits.max_bytes} bytes (decompression limit)"
                )
            out.write(chunk)
            if d.eof:
                rest = _read_at_least(src, d.unused_data + buf, len(_GZIP_MAGIC))
                if not rest:
                    return total
                if not rest.startswith(_GZIP_MAGIC):
                    raise BundleError("bundle has trailing bytes after the gzip stream")
                d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
                buf = rest
            elif starved and not chunk:
                raise BundleError("bundle is truncated: the gzip stream ends early")
    except zlib.error as exc:
        raise BundleError(f"bundle is not valid gzip: {exc}") from None


def _read_at_least(src: IO[bytes], buf: bytes, n: int) -> bytes:
    while len(buf) < n:
        more = src.read(CHUNK)
        if not more:
            break
        buf += more
    return buf


def _read_tar(tar: IO[bytes], length: int, limits: Limits) -> list[_Entry]:
    import tarfile

    tar.seek(0)
    entries: list[_Entry] = []
    files: dict[str, _Entry] = {}
    written = 0  # what unpacking will write: every file, hardlink copies in full
    try:
        with tarfile.open(fileobj=tar, mode="r:", tarinfo=_guarded_tarinfo()) as tf:
            count = 0
            while (member := tf.next()) is not None:
                # tarfile keeps every header it read (PAX records and all); only entries are kept
                # here. ``members`` is a plain attribute that typeshed's stub leaves out.
                tf.members.clear()  # type: ignore[attr-defined]
                count += 1
                if count > limits.max_entries:
                    raise BundleError(f"bundle has more than {limits.max_entries} entries")
                entry = _member(member, files, length, limits)
                if entry is None:
                    continue
                entries.append(entry)
                if entry.kind != "file":
                    continue
                files[entry.path] = entry
                written += entry.size
                if written > limits.max_bytes:
                    raise BundleError(
                        f"bundle entry {member.name!r} brings its files to more than "
                        f"{limits.max_bytes} bytes (the byte limit; hardlink copies count in full)"
                    )
            end = tf.offset
    except BundleError:  # a ValueError (via ProtocolError), and already its own one-line reason
        raise
    except tarfile.TarError as exc:
        raise BundleError(f"bundle is not a valid tar: {exc}") from None
    except (EOFError, ValueError) as exc:
        raise BundleError(f"bundle is truncated or corrupt: {exc}") from None
    _check_tail(tar, end, length)
    return entries


def _check_tail(tar: IO[bytes], end: int, length: int) -> None:
    """Only zero padding may follow the last entry (anything else is a damaged or spliced tar)."""
    tar.seek(min(end, length))
    while chunk := tar.read(CHUNK):
        if chunk.strip(b"\0"):
            raise BundleError("bundle has unreadable data after its last valid entry (corrupt tar)")


@functools.cache
def _guarded_tarinfo() -> type[tarfile.TarInfo]:
    """A TarInfo that refuses what tarfile would otherwise read unbounded, as it parses headers.

    tarfile's header parsing reads a GNU sparse member's map (old ``S`` extension blocks, or a
    PAX 1.0 map in the member's data, numbers one per line) into lists before any caller sees the
    member, and reads PAX headers and GNU long names whole. ``_proc_member`` is tarfile's
    documented hook for subclasses ("can be overridden in a subclass"), called on every header.
    """
    import tarfile

    header_types = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                    tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
    pax_types = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)

    class Guarded(tarfile.TarInfo):
        def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
            if self.type == tarfile.GNUTYPE_SPARSE:
                raise BundleError(_sparse_reason(self.name))
            if self.size < 0:  # tarfile reads a base-256 -1; read(-1) is "all that is left"
                raise BundleError(f"bundle entry {self.name!r} declares a negative size")
            if self.type in header_types and self.size > MAX_HEADER_DATA:
                raise BundleError(
                    f"bundle has an extended header of {self.size} bytes, above the "
                    f"{MAX_HEADER_DATA} limit"
                )
            if self.type in pax_types and tf.fileobj is not None:
                _refuse_sparse_keys(tf.fileobj, self.size)
            # the hook is not in typeshed's stub of TarInfo, but is tarfile's own extension point
            member: tarfile.TarInfo = super()._proc_member(tf)  # type: ignore[misc]
            return member

    return Guarded


_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")  # tarfile's own record syntax: "<len> <key>=<value>\n"


class _Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...
    def tell(self) -> int: ...
    def seek(self, pos: int, /) -> object: ...


def _refuse_sparse_keys(f: _Readable, size: int) -> None:
    """Refuse a PAX header (about to be parsed by tarfile) with any ``GNU.sparse.*`` record."""
    at = f.tell()
    buf = f.read(size)
    f.seek(at)
    pos = 0
    while (m := _PAX_RECORD.match(buf, pos)) is not None and int(m.group(1)) > 0:
        if m.group(2).startswith(b"GNU.sparse."):
            raise BundleError(_sparse_reason(f"(PAX record {m.group(2).decode(errors='replace')})"))
        pos += int(m.group(1))


def _sparse_reason(name: str) -> str:
    return (
        f"bundle entry {name!r} is a sparse file; bundles hold only plain regular files, "
        "directories and in-tree links"
    )


def _member(
    m: tarfile.TarInfo, files: dict[str, _Entry], length: int, limits: Limits
) -> _Entry | None:
    if m.sparse is not None or any(k.startswith("GNU.sparse.") for k in m.pax_headers):
        raise BundleError(_sparse_reason(m.name))  # the parse hook refuses these first
    path = _clean(m.name, limits)
    if path is None:  # the archive's root itself ("." or "./")
        if not m.isdir():
            raise BundleError(f"bundle entry {m.name!r} names the root but is not a directory")
        return None
    if m.size < 0:
        raise BundleError(f"bundle entry {m.name!r} declares a negative size ({m.size})")
    if m.isreg():
        if m.size > limits.max_bytes:
            raise BundleError(
                f"bundle entry {m.name!r} declares {m.size} bytes, above the {limits.max_bytes} "
                "limit"
            )
        if m.offset_data + m.size > length:
            raise BundleError(f"bundle entry {m.name!r} is truncated")
        return _Entry(path, "file", m.mode, span=_Span(m.offset_data, m.size))
    if m.isdir():
        return _Entry(path, "dir", m.mode)
    if m.issym():
        _check_target(m.name, m.linkname, limits)
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
        original = files[target]
        return _Entry(path, "file", original.mode, span=original.span)
    raise BundleError(
        f"bundle entry {m.name!r} is a {_TAR_KINDS.get(m.type, f'type {m.type!r} member')}; "
        "bundles hold only regular files, directories and in-tree links"
    )


def _check_target(name: str, target: str, limits: Limits) -> None:
    """Refuse a symlink target that cannot be checked as a tree path (the rest is _canonical's)."""
    if not target:
        raise BundleError(f"bundle entry {name!r} is a symlink with an empty target")
    if "\0" in target or len(target) > limits.max_path:
        raise BundleError(
            f"bundle entry {name!r} is a symlink whose target has a NUL or is above "
            f"{limits.max_path} chars"
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
    try:
        encoded = [p.encode() for p in parts]
    except UnicodeError:  # tarfile and os.walk give undecodable bytes as surrogate escapes
        raise BundleError(f"bundle entry {_raw(name)} has a name that is not UTF-8") from None
    if any(len(p) > 255 for p in encoded):
        raise BundleError(f"bundle entry {name!r} has a path component above 255 bytes")
    return "/".join(parts) if parts else None


def _raw(name: str) -> str:
    """A name shown as the bytes it stands for (b'\\xff'), which a str repr would hide."""
    try:
        return repr(name.encode("utf-8", "surrogateescape"))
    except UnicodeError:  # a surrogate that no byte stands for
        return repr(name)


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
        _resolve(posixpath.dirname(path).split("/") if "/" in path else [], target, links, path,
                 [0])
    out = []
    for path in sorted(by_path):
        e = by_path[path]
        if e.kind == "file":
            mode = 0o755 if e.mode & 0o111 else 0o644
        elif e.kind == "dir":
            mode = 0o755
        else:
            mode = 0o777
        out.append(dataclasses.replace(e, mode=mode))
    return out


def _resolve(
    base: list[str], target: str, links: dict[str, str], link: str, followed: list[int]
) -> list[str]:
    """Resolve ``target`` from directory ``base`` inside the archive, following its symlinks
    (``followed``: how many so far in resolving ``link``, MAX_SYMLINK_DEPTH at most)."""
    followed[0] += 1
    if followed[0] > MAX_SYMLINK_DEPTH:
        raise BundleError(
            f"bundle entry {link!r} is a symlink loop or chain (more than {MAX_SYMLINK_DEPTH} "
            "links followed)"
        )
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
            stack = _resolve(stack, inner, links, link, followed)
    return stack


def _manifest(entries: list[_Entry], archive: _Archive | None, source: str) -> Manifest:
    entry = next((e for e in entries if e.path == MANIFEST_NAME), None)
    if entry is None:
        raise BundleError(f"{source}: no {MANIFEST_NAME} at the root of the bundle")
    if entry.kind != "file":
        raise BundleError(f"{source}: {MANIFEST_NAME} must be a regular file, not a {entry.kind}")
    if entry.size > MAX_MANIFEST:
        raise BundleError(
            f"{source}: {MANIFEST_NAME} is {entry.size} bytes, above the {MAX_MANIFEST} limit"
        )
    if entry.file is not None:
        raw = _read_small(entry.file)
    elif entry.span is not None and archive is not None:
        raw = archive.read(entry.span)
    else:  # unreachable: a file entry comes from a directory or from an archive
        raise BundleError(f"{source}: {MANIFEST_NAME} has no data")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BundleError(f"{source}: {MANIFEST_NAME} is not UTF-8 text") from None
    try:
        return parse_manifest(text, source=f"{source}: {MANIFEST_NAME}")
    except ProtocolError as exc:
        raise BundleError(str(exc)) from None


# -- writing ---------------------------------------------------------------------------------------


class _Gzip(io.BufferedIOBase):
    """A write-only file that gzips what it is given as it comes (tarfile writes into it).

    Zero mtime and no file name in the header, so the bytes depend on content only; zlib's output
    does not depend on how its input is split, so this gives the same bytes as one compress call.
    """

    def __init__(self) -> None:
        super().__init__()
        self._z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        self._parts: list[bytes] = []
        self._pos = 0

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer) -> int:
        view = memoryview(data)
        self._parts.append(self._z.compress(view))
        self._pos += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self._pos

    def getvalue(self) -> bytes:
        return b"".join(self._parts) + self._z.flush()


def _write_tar(entries: list[_Entry], archive: _Archive | None) -> bytes:
    import tarfile

    out = _Gzip()
    with tarfile.open(fileobj=out, mode="w:", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            info = tarfile.TarInfo(e.path)
            info.mtime = FIXED_MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = e.mode
            if e.kind == "file":
                info.type = tarfile.REGTYPE
                info.size = e.size
                if e.file is not None:
                    _add_dir_file(tf, info, e.file)
                elif e.span is not None and archive is not None:
                    tf.addfile(info, archive.seek(e.span))
                else:  # unreachable: a file entry comes from a directory or from an archive
                    raise BundleError(f"bundle entry {e.path!r} has no data")
            elif e.kind == "dir":
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.type = tarfile.SYMTYPE
                info.linkname = e.target
                tf.addfile(info)
    return out.getvalue()


def _open_dir_file(file: _DirFile) -> IO[bytes]:
    """Open a bundle directory's file as the regular file of the size it was listed with.

    O_NOFOLLOW and O_NONBLOCK: if it was replaced since it was listed, by a symlink or a fifo,
    opening it neither follows the link nor waits for a writer."""
    try:
        fd = os.open(file.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise BundleError(f"{file.path}: cannot read: {exc.strerror}") from None
    f = os.fdopen(fd, "rb")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size != file.size:
        f.close()
        raise BundleError(f"{file.path}: changed while it was being packed; push again")
    return f


def _read_small(file: _DirFile) -> bytes:
    """The whole of a file its caller has bounded (the manifest)."""
    with _open_dir_file(file) as f:
        try:
            data = f.read(file.size + 1)
        except OSError as exc:
            raise BundleError(f"{file.path}: cannot read: {exc.strerror}") from None
    if len(data) != file.size:
        raise BundleError(f"{file.path}: changed while it was being packed; push again")
    return data


def _add_dir_file(tf: tarfile.TarFile, info: tarfile.TarInfo, file: _DirFile) -> None:
    """Copy a directory's file into the tar ``info.size`` bytes at a time (tarfile's own copy)."""
    with _open_dir_file(file) as f:
        try:
            tf.addfile(info, f)  # reads exactly info.size bytes; OSError if the file is shorter
            grew = f.read(1) != b""
        except OSError as exc:
            if exc.strerror is not None:
                raise BundleError(f"{file.path}: cannot read: {exc.strerror}") from None
            grew = True  # tarfile's "unexpected end of data": the file shrank
    if grew:
        raise BundleError(f"{file.path}: changed while it was being packed; push again")


def _extract(entries: list[_Entry], root: Path, archive: _Archive, limits: Limits) -> None:
    # Entries are sorted, so every parent directory is created before its children; paths were
    # checked to pass through no symlink, so O_NOFOLLOW|O_EXCL on the last component suffices.
    written = 0
    for e in entries:
        target = root / e.path
        if e.kind == "dir":
            target.mkdir(mode=0o700)
        elif e.kind == "symlink":
            target.symlink_to(e.target)
        else:
            # The sum was checked when reading; counting here too keeps the cap true of what is
            # written, whatever the reading side becomes.
            written += e.size
            if written > limits.max_bytes:
                raise BundleError(f"bundle files add up to more than {limits.max_bytes} bytes")
            if e.span is None:  # unreachable: unpacked entries all come from the archive
                raise BundleError(f"bundle entry {e.path!r} has no data")
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                archive.copy(e.span, f)
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
