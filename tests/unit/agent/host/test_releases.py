"""agent.host.releases: fetch once per digest, verify, unpack safely, keep the last few."""

from __future__ import annotations

import asyncio
import io
import os
import stat
import tarfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.errors import ReleaseError
from agent.host import releases
from agent.host.releases import ReleaseCache
from protocol.bundle import Limits, digest, pack
from protocol.errors import BusError
from protocol.messages import ReleaseRef
from tests.unit.protocol.test_bundle import archive_of, gnu_sparse

STORE = "fw-test-releases"
MANIFEST_666 = b'name = "hello"\nversion = "6.6.6"\ncommand = ["x"]\n'


CHUNK = 128 * 1024  # what the NATS object store sends per message


class FakeStore:
    """An object store in memory, sent in chunks; ``gate`` holds fetches until set, ``fail`` raises
    BusError, and ``endless`` names an object whose chunks of zeros never end."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.gets = 0
        self.gate: asyncio.Event | None = None
        self.fail = False
        self.started = asyncio.Event()
        self.endless = ""
        self.sent = 0  # bytes handed to the reader

    async def _begin(self, store: str) -> None:
        assert store == STORE
        self.gets += 1
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise BusError("cannot fetch: connection closed")

    async def obj_get_into(self, store: str, name: str, write: Callable[[bytes], object]) -> bool:
        await self._begin(store)
        if name == self.endless:
            while True:
                self.sent += CHUNK
                write(bytes(CHUNK))
                await asyncio.sleep(0)
        data = self.objects.get(name)
        if data is None:
            return False
        view = memoryview(data)
        for i in range(0, len(data), CHUNK):
            self.sent += len(view[i : i + CHUNK])
            write(bytes(view[i : i + CHUNK]))
            await asyncio.sleep(0)
        return True


def bundle(tmp: Path, version: str, extra: str = "") -> bytes:
    src = tmp / f"src-{version}-{len(extra)}"
    src.mkdir()
    (src / "fleetwave.toml").write_text(
        f'name = "hello"\nversion = "{version}"\ncommand = ["python3", "app.py"]\n'
    )
    (src / "app.py").write_text(f"print('{version}{extra}')\n")
    return pack(src)[0]


def names(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def publish(store: FakeStore, data: bytes, version: str) -> ReleaseRef:
    store.objects[f"hello/{version}"] = data
    return ReleaseRef(service="hello", version=version, digest=digest(data), size=len(data))


async def test_ensure_fetches_verifies_unpacks_then_reuses(tmp_path: Path) -> None:
    """The first ensure downloads and unpacks; the next returns the same dir without a fetch."""
    store = FakeStore()
    ref = publish(store, bundle(tmp_path, "1.0.0"), "1.0.0")
    cache = ReleaseCache(tmp_path / "releases")
    assert cache.path_for(ref) is None
    path = await cache.ensure(store, "test", ref)
    assert path == tmp_path / "releases" / ref.digest.removeprefix("sha256:")
    assert (path / "app.py").read_text() == "print('1.0.0')\n"
    assert await cache.ensure(store, "test", ref) == path
    assert cache.path_for(ref) == path
    assert store.gets == 1 and cache.fetches == 1


async def test_concurrent_ensure_of_one_digest_fetches_once(tmp_path: Path) -> None:
    """Five concurrent ensure() calls for one digest share a single download."""
    store = FakeStore()
    store.gate = asyncio.Event()
    ref = publish(store, bundle(tmp_path, "1.0.0"), "1.0.0")
    cache = ReleaseCache(tmp_path / "releases")
    async with asyncio.timeout(10):
        tasks = [asyncio.create_task(cache.ensure(store, "test", ref)) for _ in range(5)]
        await store.started.wait()
        store.gate.set()
        paths = await asyncio.gather(*tasks)
    assert len(set(paths)) == 1
    assert store.gets == 1


async def test_digest_mismatch_is_refused_and_nothing_kept(tmp_path: Path) -> None:
    """Bytes that do not hash to the ref's digest are refused and leave the cache empty."""
    store = FakeStore()
    ref = publish(store, bundle(tmp_path, "1.0.0"), "1.0.0")
    store.objects["hello/1.0.0"] = bundle(tmp_path, "1.0.0", extra="tampered")
    cache = ReleaseCache(tmp_path / "releases")
    with pytest.raises(ReleaseError, match="expected sha256:") as info:
        await cache.ensure(store, "test", ref)
    assert not info.value.transient  # the bytes are wrong: retrying will not help
    assert "refused" in info.value.reason
    assert list((tmp_path / "releases").iterdir()) == []
    assert cache.path_for(ref) is None


async def test_hostile_bundle_with_matching_digest_is_refused(tmp_path: Path) -> None:
    """A bundle that verifies but holds a path escape is refused by safe_unpack; nothing kept."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in (("fleetwave.toml", b'name="hello"\nversion="6.6.6"\ncommand=["x"]\n'),
                           ("../../evil", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    store = FakeStore()
    ref = publish(store, buf.getvalue(), "6.6.6")
    cache = ReleaseCache(tmp_path / "releases")
    with pytest.raises(ReleaseError, match=r"refused bundle: .*'\.\.' component"):
        await cache.ensure(store, "test", ref)
    assert list((tmp_path / "releases").iterdir()) == []
    assert names(tmp_path) == ["releases"]


async def test_manifest_naming_another_version_is_refused(tmp_path: Path) -> None:
    """A verified bundle whose manifest names another version than the ref is refused."""
    store = FakeStore()
    data = bundle(tmp_path, "1.0.0")
    store.objects["hello/2.0.0"] = data
    ref = ReleaseRef(service="hello", version="2.0.0", digest=digest(data))
    cache = ReleaseCache(tmp_path / "releases")
    with pytest.raises(ReleaseError, match=r"manifest says hello 1\.0\.0"):
        await cache.ensure(store, "test", ref)
    assert list((tmp_path / "releases").iterdir()) == []


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ("missing", "not in the fleet's object store"),
        ("bus_error", "cannot fetch it"),
        ("bad_digest", "is not 'sha256:<hex>'"),
        ("too_big", "above this agent's bundle limit"),
    ],
)
async def test_fetch_failures_are_one_line_reasons(setup: str, reason: str, tmp_path: Path) -> None:
    """Each way a fetch can fail is a ReleaseError with a one-line reason."""
    store = FakeStore()
    ref = publish(store, bundle(tmp_path, "1.0.0"), "1.0.0")
    if setup == "missing":
        store.objects.clear()
    elif setup == "bus_error":
        store.fail = True
    elif setup == "bad_digest":
        ref = ReleaseRef(service="hello", version="1.0.0", digest="md5:abc")
    elif setup == "too_big":
        ref = ReleaseRef(service="hello", version="1.0.0", digest=ref.digest, size=1 << 40)
    cache = ReleaseCache(tmp_path / "releases")
    with pytest.raises(ReleaseError, match=reason) as info:
        await cache.ensure(store, "test", ref)
    assert "\n" not in info.value.reason


async def test_fetch_that_hangs_times_out(tmp_path: Path) -> None:
    """A fetch that never completes ends with a ReleaseError after fetch_timeout."""
    store = FakeStore()
    store.gate = asyncio.Event()  # never set
    ref = publish(store, bundle(tmp_path, "1.0.0"), "1.0.0")
    cache = ReleaseCache(tmp_path / "releases", fetch_timeout=0.05)
    with pytest.raises(ReleaseError, match="took more than") as info:
        await cache.ensure(store, "test", ref)
    assert info.value.transient  # a bus outage: retried, not a failure of the node
    assert cache._locks == {}


async def test_prune_keeps_recent_and_in_use(tmp_path: Path) -> None:
    """prune keeps the `keep` most recently ensured releases and those in use; sweeps debris."""
    store = FakeStore()
    refs = [publish(store, bundle(tmp_path, v), v) for v in ("1", "2", "3", "4")]
    cache = ReleaseCache(tmp_path / "releases", keep=2)
    for ref in refs:
        await cache.ensure(store, "test", ref)
    await cache.ensure(store, "test", refs[1])  # 2 is now the most recent
    debris = tmp_path / "releases" / ".deadbeef.tmp-1234"
    debris.mkdir()
    cache.prune({refs[0].digest})
    assert cache.path_for(refs[0]) is not None  # in use
    assert cache.path_for(refs[1]) is not None  # most recent
    assert cache.path_for(refs[3]) is not None  # second most recent
    assert cache.path_for(refs[2]) is None
    assert not debris.exists()
    assert len(list((tmp_path / "releases").iterdir())) == 3
    assert store.gets == 4


async def test_a_release_fetched_ahead_ranks_oldest_until_it_is_used(tmp_path: Path) -> None:
    """``ensure(recent=False)`` (a prefetch) stamps a release it fetches as the oldest and
    leaves one at hand as recent as it was; ``touch`` (a slot started from it) makes it the
    most recent."""
    store = FakeStore()
    one, two, ahead = (publish(store, bundle(tmp_path, v), v) for v in ("1", "2", "3"))
    cache = ReleaseCache(tmp_path / "releases", keep=2)
    for ref in (one, two):
        await cache.ensure(store, "test", ref)
    path = await cache.ensure(store, "test", ahead, recent=False)
    await cache.ensure(store, "test", one, recent=False)  # at hand: as recent as it was
    cache.prune(set())
    assert cache.path_for(ahead) is None  # the oldest: out, unless the manager keeps it
    assert cache.path_for(one) is not None and cache.path_for(two) is not None
    path = await cache.ensure(store, "test", ahead, recent=False)
    cache.touch(path)
    cache.prune(set())
    assert cache.path_for(ahead) is not None and cache.path_for(two) is not None
    assert cache.path_for(one) is None


# -- hostile sizes: the download and the unpack are bounded, and never raise out -----------------


async def test_sparse_bundle_fails_the_fetch_with_the_reason(tmp_path: Path) -> None:
    """A verified bundle with a sparse member of 1 TiB is a refused release, not a MemoryError."""
    store = FakeStore()
    sparse = archive_of(gnu_sparse(1 << 40), manifest=MANIFEST_666)
    ref = publish(store, sparse, "6.6.6")
    cache = ReleaseCache(tmp_path / "releases")
    with pytest.raises(ReleaseError, match=r"refused bundle: .*sparse") as info:
        await cache.ensure(store, "test", ref)
    assert not info.value.transient and "\n" not in info.value.reason
    assert list((tmp_path / "releases").iterdir()) == []


async def test_any_error_while_unpacking_becomes_the_release_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever unpacking raises (here MemoryError) ends as a ReleaseError with a reason; the
    cache stays usable and empty."""

    def exhausted(*args: object, **kwargs: object) -> object:
        raise MemoryError

    store = FakeStore()
    ref = publish(store, bundle(tmp_path, "1.0.0"), "1.0.0")
    cache = ReleaseCache(tmp_path / "releases")
    monkeypatch.setattr(releases, "safe_unpack", exhausted)
    with pytest.raises(ReleaseError, match="MemoryError") as info:
        await cache.ensure(store, "test", ref)
    assert not info.value.transient and "\n" not in info.value.reason
    assert list((tmp_path / "releases").iterdir()) == []
    assert cache._locks == {}


@pytest.mark.parametrize("declared", [0, 300_000])
async def test_object_larger_than_allowed_stops_the_download(declared: int, tmp_path: Path) -> None:
    """An object that keeps coming beyond its declared size (or, undeclared, beyond the agent's
    limit) is refused as soon as it passes it; nothing is kept in the cache."""
    store = FakeStore()
    store.endless = "hello/1.0.0"
    ref = ReleaseRef(service="hello", version="1.0.0", digest="sha256:" + "0" * 64, size=declared)
    limit = 1024 * 1024
    cache = ReleaseCache(tmp_path / "releases", limits=Limits(max_bytes=limit))
    with pytest.raises(ReleaseError, match="larger than") as info:
        await cache.ensure(store, "test", ref)
    assert not info.value.transient and "\n" not in info.value.reason
    assert store.sent <= (declared or limit) + CHUNK
    assert list((tmp_path / "releases").iterdir()) == []


async def test_fetch_and_unpack_hold_neither_the_object_nor_a_file_whole(tmp_path: Path) -> None:
    """An 8 MiB incompressible release is fetched, verified and unpacked with a small peak of
    memory: the object goes to a temp file as it arrives, and each file is copied in chunks."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "fleetwave.toml").write_text('name = "hello"\nversion = "1.0.0"\ncommand = ["x"]\n')
    payload = os.urandom(8 * 1024 * 1024)
    (src / "blob.bin").write_bytes(payload)
    store = FakeStore()
    ref = publish(store, pack(src)[0], "1.0.0")
    cache = ReleaseCache(tmp_path / "releases")
    tracemalloc.start()
    try:
        path = await cache.ensure(store, "test", ref)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (path / "blob.bin").read_bytes() == payload
    assert peak < 2 * 1024 * 1024, f"{peak} bytes allocated for an 8 MiB release"
    assert names(tmp_path / "releases") == [path.name]  # no download or temp file left behind


def test_the_cache_directory_is_made_traversable_but_not_listable(tmp_path: Path) -> None:
    """A new cache directory is 0711: a service (another user) reaches its release by path but
    cannot list the releases, each with its service's manifest and [env]."""
    cache = ReleaseCache(tmp_path / "data" / "releases")
    assert stat.S_IMODE(cache.root.stat().st_mode) == 0o711


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another group takes root")
def test_a_release_kept_to_its_services_group_and_given_back(tmp_path: Path) -> None:
    """keep_to_group: directories 0750 and files 0640 (0750 if executable) of the group, the
    owner kept, links left; None gives it back as unpacked (0755/0644, the agent's group); a
    tree already so is not walked again."""
    import grp

    from agent.host.releases import keep_to_group

    gid = grp.getgrnam("daemon").gr_gid
    rel = tmp_path / "abc"
    (rel / "lib").mkdir(parents=True)
    (rel / "app.py").write_text("print()")
    (rel / "run").write_text("#!/bin/sh\n")
    (rel / "run").chmod(0o755)
    (rel / "lib" / "x.py").write_text("")
    (rel / "link").symlink_to("app.py")
    rel.chmod(0o755)

    def modes() -> dict[str, tuple[int, int]]:
        return {str(p.relative_to(tmp_path)): (p.lstat().st_gid, stat.S_IMODE(p.lstat().st_mode))
                for p in [rel, *sorted(rel.rglob("*"))] if not p.is_symlink()}

    keep_to_group(rel, gid)
    assert modes() == {"abc": (gid, 0o750), "abc/app.py": (gid, 0o640), "abc/lib": (gid, 0o750),
                       "abc/lib/x.py": (gid, 0o640), "abc/run": (gid, 0o750)}
    assert (rel / "link").lstat().st_gid == os.getegid() and rel.stat().st_uid == os.geteuid()
    (rel / "lib" / "x.py").chmod(0o600)  # the top says it is done: not walked again
    keep_to_group(rel, gid)
    assert stat.S_IMODE((rel / "lib" / "x.py").stat().st_mode) == 0o600
    keep_to_group(rel, None)
    me = os.getegid()
    assert modes() == {"abc": (me, 0o755), "abc/app.py": (me, 0o644), "abc/lib": (me, 0o755),
                       "abc/lib/x.py": (me, 0o644), "abc/run": (me, 0o755)}
    # A release never kept to a group is left as unpacked, whatever its group (a set-group-ID
    # data dir): its files' modes are the bundle's.
    os.chown(rel, -1, gid)
    (rel / "app.py").chmod(0o600)
    keep_to_group(rel, None)
    assert rel.stat().st_gid == gid and stat.S_IMODE((rel / "app.py").stat().st_mode) == 0o600
