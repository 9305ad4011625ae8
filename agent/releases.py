"""The agent's release cache: fetch each release once per digest, verify it, unpack it safely.

Layout: ``<root>/<sha256-hex>/`` is one unpacked release, complete or absent (``safe_unpack``
renames a finished temp dir into place). ``.<hex>.tmp-*`` are unpacks in progress, and
``.<hex>.trash-*`` releases being deleted; both are swept by ``prune`` when nobody owns them,
so a crash at any point leaves nothing that looks like a release and is not one.

Recency: every ``ensure`` stamps the release directory's mtime (strictly increasing within the
process), and ``prune`` keeps the ``keep`` most recently ensured releases plus those in use, so
the previous versions stay for a fast rollback.

Failure modes, each a ``ReleaseError`` whose ``reason`` is one line fit for an observed state or
an event: malformed digest in the ref, release absent from the object store, NATS failure or
timeout while fetching, bytes whose sha256 is not the ref's digest (corrupt or replaced object;
nothing is kept), a hostile or invalid bundle (``protocol.bundle`` names the entry), a bundle whose
manifest names another service or version, and a disk error while unpacking.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Protocol

from protocol import subjects
from protocol.bundle import DEFAULT_LIMITS, Limits, digest, safe_unpack
from protocol.errors import BusError, ProtocolError
from protocol.messages import ReleaseRef

FETCH_TIMEOUT = 120.0
_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")
_HEX = re.compile(r"^[0-9a-f]{64}$")


class ReleaseError(Exception):
    """A release that cannot be made ready on this node; ``reason`` says why in one line.

    ``transient`` marks a failure of the bus (a timeout, a broker away), which a later attempt
    may not meet; anything else (not stored, wrong digest, hostile bundle) will not change.
    """

    def __init__(self, reason: str, *, transient: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


class ObjectSource(Protocol):
    """The one bus operation the cache needs (``protocol.bus.Bus`` provides it)."""

    async def obj_get(self, store: str, name: str) -> bytes | None: ...


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
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, ref: ReleaseRef) -> Path | None:
        """The unpacked release directory of ``ref`` if it is in the cache, else None."""
        m = _DIGEST.match(ref.digest)
        if m is None:
            return None
        path = self.root / m.group(1)
        return path if path.is_dir() and not path.is_symlink() else None

    async def ensure(self, bus: ObjectSource, fleet: str, ref: ReleaseRef) -> Path:
        """Return the unpacked release of ``ref``, fetching and verifying it only if absent."""
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
        key = subjects.release_key(ref.service, ref.version)
        try:
            async with asyncio.timeout(self.fetch_timeout):
                data = await bus.obj_get(subjects.releases_store(fleet), key)
        except TimeoutError:
            raise ReleaseError(
                f"{what}: fetching {key} took more than {self.fetch_timeout:g}s; will retry",
                transient=True,
            ) from None
        except BusError as exc:
            raise ReleaseError(f"{what}: cannot fetch it: {exc}", transient=True) from None
        if data is None:
            raise ReleaseError(
                f"{what} is not in the fleet's object store (key {key}); push it with "
                "'fleetwave release push'"
            )
        self.fetches += 1
        got = digest(data)
        if got != ref.digest:
            raise ReleaseError(
                f"{what}: fetched bundle has digest {got[:19]}..., expected {ref.digest[:19]}...; "
                "refused (the stored object is corrupt or was replaced)"
            )
        dest = self.root / hexd
        try:
            manifest = await asyncio.to_thread(safe_unpack, data, dest, limits=self.limits)
        except ProtocolError as exc:
            raise ReleaseError(f"{what}: refused bundle: {exc}") from None
        if (manifest.name, manifest.version) != (ref.service, ref.version):
            self._discard(dest)
            raise ReleaseError(
                f"{what}: the bundle's manifest says {manifest.name} {manifest.version}; refused"
            )
        return dest

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
