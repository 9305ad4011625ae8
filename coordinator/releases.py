"""Releases in a fleet: push a bundle, list what was pushed, resolve a version to its digest.

Where things live. The bundle bytes go to the fleet's object store (``subjects.releases_store``)
under ``<service>/<version>``. A small record per release (digest, size, manifest summary, push
time) goes to the KV bucket ``subjects.release_index_bucket``, key
``subjects.release_record_key``. The record is the source of truth for "this version is this
digest": it is written with a create-only KV write, so two pushes of one version with different
content cannot both win, and only the winner's bytes are uploaded.

Push, step by step (each step idempotent, so a push interrupted anywhere is finished by pushing
again):

1. pack and validate the bundle (``protocol.bundle.pack``: deterministic bytes, so the same
   content always has the same digest);
2. if a record exists: another digest is refused (bump the version); the same digest is
   "already present" when the stored object matches, or re-uploaded ("repaired") if the object
   is missing or differs (a push that died between record and upload);
3. else create the record (losing a race means re-reading it and going to 2), then upload.

Errors (``coordinator.errors`` tree): ``ReleaseExists`` (same version, other content) and
``UnknownRelease`` (resolve of a version nobody pushed, or whose bundle is missing).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec

from coordinator.errors import FleetwaveError
from protocol import subjects
from protocol.bundle import digest, pack
from protocol.bus import Bus
from protocol.codec import decode, encode
from protocol.errors import Conflict, MissingBucket, ProtocolError
from protocol.messages import ReleaseRef

PUSH_TIMEOUT = 300.0  # a large bundle on a slow link; every bus call inside has its own timeout


class ReleaseExists(FleetwaveError):
    """The version was pushed before with other content."""


class UnknownRelease(FleetwaveError):
    """No such release in the fleet (or its bundle is missing from the store)."""


class ReleaseInfo(msgspec.Struct, kw_only=True):
    """The record of one pushed release, as kept in the release index bucket and listed."""

    schema: int = 1
    service: str
    version: str
    digest: str  # "sha256:<hex>" of the bundle bytes
    size: int
    port: int | None = None
    command: list[str] = []
    pushed_at: float = 0.0

    @property
    def ref(self) -> ReleaseRef:
        return ReleaseRef(
            service=self.service, version=self.version, digest=self.digest, size=self.size
        )


@dataclass(frozen=True)
class PushResult:
    info: ReleaseInfo
    status: Literal["pushed", "already present", "repaired"]


async def push_release(bus: Bus, path: Path, *, now: float | None = None) -> PushResult:
    """Validate, pack and store the bundle at ``path`` in ``bus``'s fleet; see the module doc."""
    data, manifest = await asyncio.to_thread(pack, Path(path))
    info = ReleaseInfo(
        service=manifest.name,
        version=manifest.version,
        digest=digest(data),
        size=len(data),
        port=manifest.port,
        command=list(manifest.command),
        pushed_at=time.time() if now is None else now,
    )
    try:
        async with asyncio.timeout(PUSH_TIMEOUT):
            await bus.ensure_fleet()
            return await _store(bus, info, data)
    except TimeoutError:
        raise FleetwaveError(
            f"pushing {info.service} {info.version} took more than {PUSH_TIMEOUT:g}s; check the "
            "NATS server and push again (a push resumes where it stopped)"
        ) from None


async def _store(bus: Bus, info: ReleaseInfo, data: bytes) -> PushResult:
    fleet = bus.fleet
    bucket = subjects.release_index_bucket(fleet)
    key = subjects.release_record_key(info.service, info.version)
    for _ in range(3):  # create-or-read: a lost create race means the record now exists
        entry = await bus.kv_get(bucket, key)
        if entry is not None and entry.value is not None:
            recorded = _decode(entry.value, key)
            if recorded.digest != info.digest:
                raise ReleaseExists(
                    f"release {info.service} {info.version} already exists with digest "
                    f"{_short(recorded.digest)}, and this bundle is {_short(info.digest)}; "
                    "bump the version in fleetwave.toml"
                )
            stat = await bus.obj_info(subjects.releases_store(fleet), _obj(info))
            if stat is not None and stat.size == info.size and (
                "sha256:" + stat.sha256 == info.digest
            ):
                return PushResult(recorded, "already present")
            await _upload(bus, info, data)
            return PushResult(recorded, "repaired")
        try:
            await bus.kv_create(bucket, key, encode(info))
        except Conflict:
            continue
        await _upload(bus, info, data)
        return PushResult(info, "pushed")
    raise FleetwaveError(
        f"release {info.service} {info.version} keeps changing under us; push again"
    )


async def _upload(bus: Bus, info: ReleaseInfo, data: bytes) -> None:
    await bus.obj_put(
        subjects.releases_store(bus.fleet), _obj(info), data,
        description=f"{info.service} {info.version} {info.digest}",
    )


async def list_releases(bus: Bus, service: str | None = None) -> list[ReleaseInfo]:
    """Every release pushed to the fleet (of ``service`` only, if given), oldest push first."""
    if service is not None:
        subjects.check_name("service", service)
    try:
        entries = await bus.kv_entries(
            subjects.release_index_bucket(bus.fleet), subjects.release_records(service)
        )
    except MissingBucket:
        return []  # a fresh fleet: the first push (or coordinator) creates the index
    out = [_decode(e.value, e.key) for e in entries if e.value is not None]
    return sorted(out, key=lambda r: (r.service, r.pushed_at, r.version))


async def get_release(bus: Bus, service: str, version: str) -> ReleaseInfo | None:
    """The record of one release, or None if nobody pushed it."""
    subjects.check_name("service", service)
    entry = await bus.kv_get(
        subjects.release_index_bucket(bus.fleet), subjects.release_record_key(service, version)
    )
    if entry is None or entry.value is None:
        return None
    return _decode(entry.value, entry.key)


async def resolve_release(bus: Bus, service: str, version: str) -> ReleaseRef:
    """The ReleaseRef of ``service`` ``version``; UnknownRelease if it cannot be deployed."""
    info = await get_release(bus, service, version)
    if info is None:
        known = [r.version for r in await list_releases(bus, service)]
        hint = f" (known: {', '.join(known)})" if known else ""
        raise UnknownRelease(
            f"no release {service} {version} in fleet {bus.fleet!r}{hint}; push it with "
            "'fleetwave release push DIR'"
        )
    stat = await bus.obj_info(subjects.releases_store(bus.fleet), _obj(info))
    if stat is None:
        raise UnknownRelease(
            f"release {service} {version} is recorded but its bundle is missing from the store; "
            "push the same bundle again to repair it"
        )
    return info.ref


def _decode(value: bytes, key: str) -> ReleaseInfo:
    try:
        return decode(ReleaseInfo, value)
    except ProtocolError as exc:
        raise FleetwaveError(
            f"release record {key} is unreadable ({exc}); was it written by another tool?"
        ) from None


def _obj(info: ReleaseInfo) -> str:
    return subjects.release_key(info.service, info.version)


def _short(d: str) -> str:
    return d[:19] + "..." if len(d) > 22 else d
