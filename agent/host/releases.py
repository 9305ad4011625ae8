"""The agent's release cache: fetch each release once per digest, verify it, unpack it safely.

Layout: ``<root>/<sha256-hex>/`` is one unpacked release, complete or absent (``safe_unpack``
renames a finished temp dir into place). ``<root>`` is 0711 (reached by path, never listed);
each release 0755, as its service reads and lists its own files. ``.<hex>.tmp-*`` are unpacks
in progress, and ``.<hex>.trash-*`` releases being deleted; both are swept by ``prune`` when
nobody owns them, so a crash at any point leaves nothing that looks like a release and is not
one.

Recency: every ``ensure`` stamps the release directory's mtime (strictly increasing within the
process), as ``touch`` does when a release is started from the cache, and ``prune`` keeps the
``keep`` most recently ensured or started releases plus those in use, so the previous versions
stay for a fast rollback. A release fetched ahead of its deploy (``ensure(recent=False)``, the
agent's prefetch) is stamped as the oldest instead: pushing releases that are never deployed
must not push a rollback's target out of the cache (the manager keeps the one fetched ahead in
use until it is deployed or replaced).

Fetching. The object is streamed into an unnamed temp file under ``<root>`` as its chunks
arrive, hashed on the way, and refused as soon as it passes its declared size (``ReleaseRef.size``,
or ``Limits.max_bytes`` when the ref declares none); the file vanishes on any failure or crash, as
it never had a name. ``safe_unpack`` then reads that file, inflating into another such file beside
the release, so neither the object nor any member of it is ever held in memory whole.

Failure modes, each a ``ReleaseError`` whose ``reason`` is one line fit for an observed state or
an event: malformed digest in the ref, release absent from the object store, NATS failure or
timeout while fetching, an object larger than declared or allowed, bytes whose sha256 is not the
ref's digest (corrupt or replaced object; nothing is kept), a hostile or invalid bundle
(``protocol.bundle`` names the entry), a bundle whose manifest names another service or version,
a disk error, and any other error while unpacking (``MemoryError`` included): a release that
cannot be made ready fails that release, never the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Protocol

from agent.errors import ReleaseError
from protocol import subjects
from protocol.bundle import DEFAULT_LIMITS, Limits, safe_unpack
from protocol.errors import BusError, ProtocolError
from protocol.manifest import Manifest
from protocol.messages import ReleaseRef

FETCH_TIMEOUT = 120.0
_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})\Z")
_HEX = re.compile(r"^[0-9a-f]{64}\Z")


class ObjectSource(Protocol):
    """The one bus operation the cache needs (``protocol.bus.Bus`` provides it)."""

    async def obj_get_into(
        self, store: str, name: str, write: Callable[[bytes], object]
    ) -> bool: ...


class _Download:
    """One object on its way to a temp file: counted, hashed, and stopped past ``limit`` bytes."""

    def __init__(self, file: IO[bytes], limit: int, too_large: str) -> None:
        self.file = file
        self.limit = limit
        self.too_large = too_large
        self.size = 0
        self._sha = hashlib.sha256()

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise ReleaseError(self.too_large)
        self._sha.update(chunk)
        self.file.write(chunk)

    def digest(self) -> str:
        return "sha256:" + self._sha.hexdigest()


class _Users:
    """The ensure() calls on one digest: a lock, and how many hold or wait for it."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.count = 0


class ReleaseCache:
    """Unpacked releases under ``root``, fetched from the fleet's object store on demand."""

    def __init__(
        self, root: Path, keep: int = 5, *, limits: Limits = DEFAULT_LIMITS,
        fetch_timeout: float = FETCH_TIMEOUT,
    ) -> None:
        self.root = Path(root)
        self.keep = keep
        self.limits = limits
        self.fetch_timeout = fetch_timeout
        self.fetches = 0  # how many times a bundle was downloaded (tests and metrics)
        self._locks: dict[str, _Users] = {}  # digest hex -> ensure() calls on it now
        self._last_stamp = 0
        # Traversable, not listable: a service (another user with --service-user) reaches its
        # own release by path but cannot list the others (agent.host.identity).
        self.root.mkdir(mode=0o711, parents=True, exist_ok=True)

    def path_for(self, ref: ReleaseRef) -> Path | None:
        """The unpacked release directory of ``ref`` if it is in the cache, else None."""
        m = _DIGEST.match(ref.digest)
        if m is None:
            return None
        path = self.root / m.group(1)
        return path if path.is_dir() and not path.is_symlink() else None

    async def ensure(self, bus: ObjectSource, fleet: str, ref: ReleaseRef, *,
                     recent: bool = True) -> Path:
        """Return the unpacked release of ``ref``, fetching and verifying it only if absent;
        ``recent``: count it as just used (module docstring), else leave a release at hand as
        recent as it was, and stamp one fetched now as the oldest."""
        m = _DIGEST.match(ref.digest)
        if m is None:
            raise ReleaseError(
                f"release {ref.service} {ref.version}: digest {ref.digest!r} is not 'sha256:<hex>'"
            )
        hexd = m.group(1)
        user = self._locks.setdefault(hexd, _Users())
        user.count += 1
        try:
            async with user.lock:  # concurrent ensure() of one digest: one fetches, others wait
                path = self.path_for(ref)
                if path is None:
                    path = await self._fetch(bus, fleet, ref, hexd)
                    if not recent:
                        with contextlib.suppress(OSError):  # (a hint, as _stamp's)
                            os.utime(path, ns=(0, 0))
                if recent:
                    self._stamp(path)
                return path
        finally:
            user.count -= 1
            if user.count == 0:
                del self._locks[hexd]

    async def _fetch(self, bus: ObjectSource, fleet: str, ref: ReleaseRef, hexd: str) -> Path:
        what = f"release {ref.service} {ref.version}"
        if ref.size > self.limits.max_bytes:
            raise ReleaseError(f"{what} is {ref.size} bytes, above this agent's bundle limit")
        try:
            # Unnamed (O_TMPFILE where there is one): a crash or a failure leaves nothing behind.
            tmp = tempfile.TemporaryFile(dir=self.root)  # noqa: SIM115 (the with below owns it)
        except OSError as exc:
            raise ReleaseError(f"{what}: cannot make a temp file: {exc.strerror}") from None
        with tmp:
            got = await self._download(bus, fleet, ref, tmp, what)
            if got != ref.digest:
                raise ReleaseError(
                    f"{what}: fetched bundle has digest {got[:19]}..., expected "
                    f"{ref.digest[:19]}...; refused (the stored object is corrupt or was replaced)"
                )
            dest = self.root / hexd
            manifest = await self._unpack(tmp, dest, what)
        if (manifest.name, manifest.version) != (ref.service, ref.version):
            self._discard(dest)
            raise ReleaseError(
                f"{what}: the bundle's manifest says {manifest.name} {manifest.version}; refused"
            )
        return dest

    async def _download(
        self, bus: ObjectSource, fleet: str, ref: ReleaseRef, tmp: IO[bytes], what: str
    ) -> str:
        """Stream the object into ``tmp``, bounded by its declared size; return its digest."""
        key = subjects.release_key(ref.service, ref.version)
        if ref.size:
            limit = ref.size
            too_large = (
                f"{what}: the stored object is larger than its declared {limit} bytes, so it is "
                f"not the expected {ref.digest[:19]}...; refused (the stored object is corrupt or "
                "was replaced)"
            )
        else:
            limit = self.limits.max_bytes
            too_large = (
                f"{what}: the stored object is larger than this agent's {limit} byte bundle "
                "limit; refused"
            )
        sink = _Download(tmp, limit, too_large)
        try:
            async with asyncio.timeout(self.fetch_timeout):
                found = await bus.obj_get_into(subjects.releases_store(fleet), key, sink.write)
        except TimeoutError:
            raise ReleaseError(
                f"{what}: fetching {key} took more than {self.fetch_timeout:g}s; will retry",
                transient=True,
            ) from None
        except BusError as exc:
            raise ReleaseError(f"{what}: cannot fetch it: {exc}", transient=True) from None
        except OSError as exc:
            raise ReleaseError(f"{what}: cannot write the download: {exc.strerror}") from None
        if not found:
            raise ReleaseError(
                f"{what} is not in the fleet's object store (key {key}); push it with "
                "'fleetwave release push'"
            )
        self.fetches += 1
        return sink.digest()

    async def _unpack(self, tmp: IO[bytes], dest: Path, what: str) -> Manifest:
        """Unpack the verified download; every error, whatever it is, becomes a ReleaseError."""
        try:
            return await asyncio.to_thread(safe_unpack, tmp, dest, limits=self.limits)
        except ProtocolError as exc:
            raise ReleaseError(f"{what}: refused bundle: {exc}") from None
        except Exception as exc:  # MemoryError, or a bug: it fails this release, not the agent
            self._discard(dest)
            detail = f": {exc}" if str(exc) else ""
            raise ReleaseError(
                f"{what}: cannot unpack the bundle: {type(exc).__name__}{detail}".replace("\n", " ")
            ) from None

    def prune(self, in_use: set[str]) -> None:
        """Delete releases beyond the ``keep`` most recently ensured, except those ``in_use``.

        ``in_use`` holds digests (``sha256:<hex>`` or bare hex). Leftover temp and trash
        directories from an earlier crash are removed too, unless an ensure() owns them now.
        """
        keep_hex = {d.removeprefix("sha256:") for d in in_use}
        releases: list[tuple[int, str]] = []
        for entry in os.scandir(self.root):
            name = entry.name
            if _HEX.match(name) and entry.is_dir(follow_symlinks=False):
                releases.append((entry.stat(follow_symlinks=False).st_mtime_ns, name))
            elif name.startswith(".") and (".tmp-" in name or ".trash-" in name):
                owner = name[1:].split(".", 1)[0]
                if owner not in self._locks:
                    shutil.rmtree(entry.path, ignore_errors=True)
        releases.sort(reverse=True)
        recent = {name for _, name in releases[: self.keep]}
        for _, name in releases:
            if name not in recent and name not in keep_hex and name not in self._locks:
                self._discard(self.root / name)

    def touch(self, path: Path) -> None:
        """Count the release at ``path`` as just used (a slot started from it)."""
        self._stamp(path)

    def _stamp(self, path: Path) -> None:
        stamp = max(time.time_ns(), self._last_stamp + 1)
        self._last_stamp = stamp
        with contextlib.suppress(OSError):  # recency is a hint; failing to record it is harmless
            os.utime(path, ns=(stamp, stamp))

    def _discard(self, path: Path) -> None:
        """Remove a release so that it never looks present while half deleted."""
        trash = path.with_name(f".{path.name}.trash-{secrets.token_hex(4)}")
        try:
            path.rename(trash)
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)


def keep_to_group(path: Path, gid: int | None) -> None:
    """Make the unpacked release ``path`` readable by group ``gid`` alone (and the agent): its
    directories 0750, its files 0640 (0750 with an execute bit), group ``gid``; with None,
    readable by all again (0755/0644, the agent's group), as it was unpacked.

    A service that runs as a user of its own (``--service-user SERVICE=USER``) then keeps its
    release from the host's other services' users, who could read it by path before (the
    path is a full digest, which a command line could leak). The owner stays the agent's, so a
    service cannot change its own release. Links are left as they are (their targets are
    inside the release: ``protocol.bundle``). A tree already so is left as it is (the top's
    group and mode say), so that a deploy of a release at hand walks nothing; with None, so is
    one this never kept to a group (its top not 0750), whatever its group (a data dir with the
    set-group-ID bit gives its own)."""
    top = path.stat()
    want_gid = os.getegid() if gid is None else gid
    want_dir = 0o755 if gid is None else 0o750
    if top.st_gid == want_gid and (top.st_mode & 0o777) == want_dir:
        return
    if gid is None and (top.st_mode & 0o777) != 0o750:
        return  # never kept to a group by us: left exactly as unpacked
    for top_down, _dirs, files in os.walk(path):  # (follows no links; Path.walk is 3.12's)
        dirpath = Path(top_down)
        if dirpath != path:  # (the top last, below)
            os.chown(dirpath, -1, want_gid)
            dirpath.chmod(want_dir)
        for name in files:
            file = dirpath / name
            st = file.lstat()
            if not stat.S_ISREG(st.st_mode):
                continue
            os.chown(file, -1, want_gid, follow_symlinks=False)
            runs = st.st_mode & 0o111
            file.chmod((0o755 if runs else 0o644) if gid is None
                       else (0o750 if runs else 0o640))
    # The top last: it says the tree is done (a walk cut short is done again next time).
    os.chown(path, -1, want_gid)
    path.chmod(want_dir)
