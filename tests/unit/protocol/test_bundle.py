"""protocol.bundle: deterministic packing, digests, and refusal of every hostile tarball."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from protocol.bundle import BundleError, Limits, digest, inspect, pack, safe_unpack

MANIFEST = b'name = "hello"\nversion = "1.0.0"\nport = 8080\ncommand = ["python3", "app.py"]\n'


def make_dir(root: Path) -> Path:
    (root / "lib").mkdir(parents=True)
    (root / "fleetwave.toml").write_bytes(MANIFEST)
    (root / "app.py").write_text("print('hi')\n")
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    (root / "lib" / "util.py").write_text("X = 1\n")
    (root / "lib" / "current").symlink_to("util.py")
    (root / "empty").mkdir()
    return root


Member = tuple[str, str, bytes | str]  # (name, kind, data or link target)


def tarball(
    members: list[Member], *, manifest: bool = True,
    tweak: Callable[[tarfile.TarInfo], None] | None = None,
) -> bytes:
    """A .tar.gz built member by member, hostile on purpose when asked."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tf:
        if manifest:
            info = tarfile.TarInfo("fleetwave.toml")
            info.size = len(MANIFEST)
            tf.addfile(info, io.BytesIO(MANIFEST))
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                assert isinstance(payload, bytes)
                info.size = len(payload)
                if tweak:
                    tweak(info)
                tf.addfile(info, io.BytesIO(payload))
                continue
            info.type = {
                "dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE,
                "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE,
            }[kind]
            if kind in ("sym", "hard"):
                assert isinstance(payload, str)
                info.linkname = payload
            if tweak:
                tweak(info)
            tf.addfile(info)
    return buf.getvalue()


def test_pack_is_deterministic_across_mtimes_and_copies(tmp_path: Path) -> None:
    """The same tree packed twice, with other mtimes, gives identical bytes and digest."""
    a = make_dir(tmp_path / "a")
    data1, m = pack(a)
    for p in a.rglob("*"):
        os.utime(p, (1_000_000, 1_000_000), follow_symlinks=False)
    (a / "__pycache__").mkdir()
    (a / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"junk")
    data2, _ = pack(a)
    assert data1 == data2
    assert m.name == "hello" and m.version == "1.0.0"
    assert digest(data1) == digest(data2)


def test_content_change_changes_digest(tmp_path: Path) -> None:
    """One changed byte in one file gives another digest."""
    a = make_dir(tmp_path / "a")
    before = digest(pack(a)[0])
    (a / "app.py").write_text("print('ho')\n")
    assert digest(pack(a)[0]) != before


def test_digest_format() -> None:
    """digest() is 'sha256:' and 64 hex digits of the bytes."""
    d = digest(b"abc")
    assert d == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_tarball_input_is_repacked_to_the_same_digest(tmp_path: Path) -> None:
    """A .tar.gz made by another tool (./ prefixes, owners, mtimes) re-packs to the dir's digest."""
    a = make_dir(tmp_path / "a")
    foreign = tmp_path / "foreign.tar.gz"
    with tarfile.open(foreign, "w:gz") as tf:  # tarfile's defaults: real mtimes, uid, uname
        tf.add(a, arcname=".")
    assert digest(pack(foreign)[0]) == digest(pack(a)[0])


def test_unpack_round_trip_and_modes(tmp_path: Path) -> None:
    """Unpacking gives back files, dirs and in-tree symlinks with normalised modes."""
    a = make_dir(tmp_path / "a")
    data, _ = pack(a)
    dest = tmp_path / "out" / "rel"
    manifest = safe_unpack(data, dest)
    assert manifest.version == "1.0.0"
    assert (dest / "app.py").read_text() == "print('hi')\n"
    assert (dest / "lib" / "current").is_symlink()
    assert os.readlink(dest / "lib" / "current") == "util.py"
    assert (dest / "empty").is_dir()
    assert stat.S_IMODE((dest / "run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "app.py").stat().st_mode) == 0o644
    assert sorted(p.name for p in dest.parent.iterdir()) == ["rel"]  # temp dir gone


def test_setuid_and_world_writable_bits_are_stripped(tmp_path: Path) -> None:
    """Decision: setuid/setgid/sticky and group/other write bits are stripped, not refused."""

    def evil_mode(info: tarfile.TarInfo) -> None:
        info.mode = 0o6777

    data = tarball([("tool", "file", b"#!/bin/sh\n")], tweak=evil_mode)
    dest = tmp_path / "rel"
    safe_unpack(data, dest)
    assert stat.S_IMODE((dest / "tool").stat().st_mode) == 0o755


def test_hardlink_in_tree_becomes_a_copy(tmp_path: Path) -> None:
    """A hardlink to an earlier regular file is accepted and unpacked as an independent copy."""
    data = tarball([("a.txt", "file", b"A"), ("b.txt", "hard", "a.txt")])
    dest = tmp_path / "rel"
    safe_unpack(data, dest)
    assert (dest / "b.txt").read_bytes() == b"A"
    assert os.stat(dest / "a.txt").st_ino != os.stat(dest / "b.txt").st_ino


def test_symlink_with_dotdot_inside_the_tree_is_accepted(tmp_path: Path) -> None:
    """A relative symlink that climbs but stays inside the bundle is fine."""
    data = tarball([("bin/", "dir", b""), ("pkg/tool.py", "file", b"x"),
                    ("bin/tool", "sym", "../pkg/tool.py")])
    safe_unpack(data, tmp_path / "rel")
    assert (tmp_path / "rel" / "bin" / "tool").read_bytes() == b"x"


def _gzip(raw: bytes) -> bytes:
    return gzip.compress(raw, mtime=0)


def _bomb() -> bytes:
    """A small .tar.gz whose one member inflates far past a 1 MiB limit."""
    return tarball([("big.bin", "file", b"\0" * (4 * 1024 * 1024))])


def _garbage_after_entries() -> bytes:
    ok = gzip.decompress(tarball([("a.txt", "file", b"A")]))
    end = ok.rstrip(b"\0")
    end += b"\0" * (-len(end) % 512)
    return _gzip(end + b"GARBAGE!" * 64 + b"\0" * 1024)


def _negative_size() -> bytes:
    """A member whose size field says -1 in base-256 (tarfile reads it so): ``read(-1)`` would
    take all the rest of the inflated tar into memory at once (a review: 400 MiB for a 200 KB
    bundle)."""
    raw = bytearray(_tar_with_manifest(MANIFEST))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        info = tarfile.TarInfo("a.txt")
        info.size = 600
        tf.addfile(info, io.BytesIO(b"x" * 600))
    member = bytearray(buf.getvalue())
    member[124:136] = b"\xff" * 12  # base-256, negative: -1
    member[148:156] = b" " * 8
    member[148:156] = b"%06o\0 " % sum(member[:512])
    end = raw.rstrip(b"\0")
    end += b"\0" * (-len(end) % 512)
    return _gzip(bytes(end) + bytes(member))


def _doubling_links(levels: int) -> bytes:
    """a0 -> ., and each aN -> a(N-1)/a(N-1): 2 ** N links followed to resolve aN (a review: 467
    bytes took 17 s, 680 would never end); the kernel refuses past 40 followed in all."""
    links: list[Member] = [("a0", "sym", ".")]
    links += [(f"a{n}", "sym", f"a{n - 1}/a{n - 1}") for n in range(1, levels + 1)]
    return tarball(links)


HOSTILE: dict[str, tuple[Callable[[], bytes], str]] = {
    "absolute path": (lambda: tarball([("/etc/evil", "file", b"x")]), "absolute path"),
    "dotdot path": (lambda: tarball([("../evil", "file", b"x")]), "'..' component"),
    "dotdot deep": (lambda: tarball([("a/../../evil", "file", b"x")]), "'..' component"),
    "symlink absolute": (lambda: tarball([("l", "sym", "/etc/passwd")]), "absolute path"),
    "symlink escapes": (lambda: tarball([("l", "sym", "../outside")]), "leads out"),
    "symlink escapes deep": (
        lambda: tarball([("a/b/l", "sym", "../../../x")]), "leads out",
    ),
    "symlink escapes via another symlink": (
        lambda: tarball([("up", "sym", "."), ("d/", "dir", b""), ("d/l", "sym", "../up/../x")]),
        "leads out",
    ),
    "symlink chain escapes": (
        lambda: tarball([("s/", "dir", b""), ("s/e", "sym", ".."), ("s/f", "sym", "e/..")]),
        "leads out",
    ),
    "symlink loop": (lambda: tarball([("a", "sym", "b"), ("b", "sym", "a")]), "loop"),
    "symlink chain doubling": (lambda: _doubling_links(15), "more than 40 links followed"),
    "symlink target too long": (
        lambda: tarball([("l", "sym", "a/" * 600)]), "target has a NUL or is above",
    ),
    "negative size": (_negative_size, "negative size"),
    "write through symlink dir": (
        lambda: tarball([("d", "sym", "."), ("d/x", "file", b"x")]), "which is a symlink",
    ),
    "file under a file": (
        lambda: tarball([("f", "file", b"x"), ("f/x", "file", b"x")]), "which is a file",
    ),
    "hardlink out of tree": (lambda: tarball([("h", "hard", "/etc/passwd")]), "hardlink"),
    "hardlink dotdot": (lambda: tarball([("h", "hard", "../x")]), "'..' component"),
    "hardlink to later file": (
        lambda: tarball([("h", "hard", "z.txt"), ("z.txt", "file", b"z")]), "hardlink",
    ),
    "character device": (lambda: tarball([("tty", "chr", b"")]), "character device"),
    "block device": (lambda: tarball([("sda", "blk", b"")]), "block device"),
    "fifo": (lambda: tarball([("pipe", "fifo", b"")]), "fifo"),
    "duplicate entry": (
        lambda: tarball([("a.txt", "file", b"1"), ("a.txt", "file", b"2")]), "appears twice",
    ),
    "missing manifest": (lambda: tarball([("a.txt", "file", b"x")], manifest=False), "no "),
    "manifest is a symlink": (
        lambda: tarball([("real.toml", "file", MANIFEST), ("fleetwave.toml", "sym", "real.toml")],
                        manifest=False),
        "regular file",
    ),
    "invalid manifest": (
        lambda: _gzip(_tar_with_manifest(b'name = "hello"\nbogus = 1\n')), "bogus",
    ),
    "not gzip": (lambda: b"PK\x03\x04 a zip file", "not a gzip"),
    "truncated gzip": (lambda: tarball([("a", "file", b"x" * 5000)])[:-40], "truncated"),
    "garbage after entries": (_garbage_after_entries, "unreadable data"),
    "decompression bomb": (_bomb, "decompression limit"),
    "too many entries": (
        lambda: tarball([(f"f{i}", "file", b"") for i in range(30)]), "entries",
    ),
    "long path": (lambda: tarball([("d/" * 600 + "x", "file", b"x")]), "path above"),
    # tarfile reads a PAX name with hdrcharset=BINARY as surrogate escapes ("\udcff")
    "non-UTF-8 name": (
        lambda: tarball([("ok/\udcff", "file", b"x")]), "bundle entry b'ok/\\xff' has a name "
        "that is not UTF-8",
    ),
}


def _tar_with_manifest(text: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("fleetwave.toml")
        info.size = len(text)
        tf.addfile(info, io.BytesIO(text))
    return buf.getvalue()


SMALL = Limits(max_entries=20, max_bytes=1024 * 1024)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tarball_is_refused_and_nothing_is_written(case: str, tmp_path: Path) -> None:
    """Every hostile tarball is refused with its reason, and the parent dir stays empty."""
    make, reason = HOSTILE[case]
    data = make()
    parent = tmp_path / "releases"
    parent.mkdir()
    with pytest.raises(BundleError) as info:
        safe_unpack(data, parent / "rel", limits=SMALL)
    assert reason in str(info.value)
    assert "\n" not in str(info.value)
    assert list(parent.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["releases"]
    with pytest.raises(BundleError):
        inspect(data, limits=SMALL)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_refused_member_is_not_called_corrupt(case: str) -> None:
    """A refusal reads as its own reason, not as "truncated or corrupt" (the agent shows it)."""
    make, reason = HOSTILE[case]
    with pytest.raises(BundleError) as info:
        inspect(make(), limits=SMALL)
    assert "truncated or corrupt" not in str(info.value)
    assert reason in str(info.value)


@pytest.mark.parametrize("case", ["absolute path", "symlink escapes", "character device"])
def test_pack_refuses_hostile_tarball_input(case: str, tmp_path: Path) -> None:
    """pack() applies the same rules to a .tar.gz it is given."""
    path = tmp_path / "in.tar.gz"
    path.write_bytes(HOSTILE[case][0]())
    with pytest.raises(BundleError):
        pack(path)


def test_pack_refuses_symlink_out_of_directory(tmp_path: Path) -> None:
    """A bundle directory with a symlink pointing outside it cannot be packed."""
    a = make_dir(tmp_path / "a")
    (a / "leak").symlink_to("/etc/passwd")
    with pytest.raises(BundleError, match="absolute"):
        pack(a)
    (a / "leak").unlink()
    (a / "leak").symlink_to("../../secret")
    with pytest.raises(BundleError, match="leads out"):
        pack(a)


def _non_utf8_name(a: Path) -> None:
    (Path(os.fsdecode(bytes(a) + b"/\xff"))).write_text("x")


def _deep_path(a: Path) -> None:
    deep = a.joinpath(*["d" * 60] * 17)  # 17 * 61 = 1037 chars below the bundle's root
    deep.mkdir(parents=True)


def _long_link_target(a: Path) -> None:
    (a / "l").symlink_to("a/" * 600)


def _empty_file_in_a_deep_dir(a: Path) -> None:
    deep = a.joinpath(*["d" * 50] * 20)  # the directories fit; the file's path does not
    deep.mkdir(parents=True)
    (deep / ("f" * 6)).write_text("x")  # 1019 + 7 chars


REFUSED_DIRS: dict[str, tuple[Callable[[Path], None], str]] = {
    "non-UTF-8 name": (_non_utf8_name, "bundle entry b'\\xff' has a name that is not UTF-8"),
    "nested path above 1024 chars": (_deep_path, "has a path above 1024 chars"),
    "file path above 1024 chars": (_empty_file_in_a_deep_dir, "has a path above 1024 chars"),
    "symlink target above 1024 chars": (_long_link_target, "target has a NUL or is above 1024"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_DIRS))
def test_pack_refuses_in_a_directory_what_the_agent_would_refuse(
    case: str, tmp_path: Path,
) -> None:
    """A directory entry that the agent's unpacking would refuse is refused by pack() itself,
    naming the entry, so no bundle that every node refuses is ever pushed."""
    a = make_dir(tmp_path / "a")
    REFUSED_DIRS[case][0](a)
    with pytest.raises(BundleError) as info:
        pack(a)
    assert REFUSED_DIRS[case][1] in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_pack_refuses_files_that_fit_in_a_tar_that_does_not(tmp_path: Path) -> None:
    """Files just under the byte limit whose tar (headers counted) is above it, which the agent
    refuses as a decompression bomb, are refused by pack() with the agent's own reason."""
    a = make_dir(tmp_path / "a")
    (a / "big.bin").write_bytes(b"\0" * (SMALL.max_bytes - 200))
    with pytest.raises(BundleError, match="decompression limit"):
        pack(a, limits=SMALL)


def test_pack_refuses_a_subdirectory_it_cannot_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A subdirectory that cannot be listed is named with the OS's reason, not left out.

    Tests run as root in CI, where a 0000 directory can still be listed, so the refusal is
    injected where os.walk lists a directory (os.scandir raising EACCES for that one path)."""
    a = make_dir(tmp_path / "a")
    (a / "secret").mkdir()
    (a / "secret" / "data").write_text("x")
    real_scandir = os.scandir

    def scandir(path: str) -> object:
        if Path(path) == a / "secret":
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(BundleError) as info:
        pack(a)
    assert str(info.value) == f"{a / 'secret'}: cannot list it: Permission denied"


def test_pack_refuses_fifo_in_directory(tmp_path: Path) -> None:
    """A fifo in a bundle directory is named and refused."""
    a = make_dir(tmp_path / "a")
    os.mkfifo(a / "pipe")
    with pytest.raises(BundleError, match="'pipe' is a fifo"):
        pack(a)


def test_pack_refuses_missing_or_bad_manifest(tmp_path: Path) -> None:
    """No fleetwave.toml, or one with an unknown key, is refused naming the problem."""
    a = make_dir(tmp_path / "a")
    (a / "fleetwave.toml").write_bytes(MANIFEST + b"colour = 'red'\n")
    with pytest.raises(BundleError, match="colour"):
        pack(a)
    (a / "fleetwave.toml").unlink()
    with pytest.raises(BundleError, match=r"no fleetwave\.toml"):
        pack(a)


def test_pack_refuses_missing_path(tmp_path: Path) -> None:
    """A path that does not exist is one clear error."""
    with pytest.raises(BundleError, match="no such"):
        pack(tmp_path / "nope")


def test_unpack_refuses_existing_destination(tmp_path: Path) -> None:
    """safe_unpack never merges into or replaces an existing directory."""
    data, _ = pack(make_dir(tmp_path / "a"))
    dest = tmp_path / "rel"
    dest.mkdir()
    (dest / "keep").write_text("mine")
    with pytest.raises(BundleError, match="already exists"):
        safe_unpack(data, dest)
    assert [p.name for p in dest.iterdir()] == ["keep"]


def test_limits_apply_to_directories(tmp_path: Path) -> None:
    """Packing a directory above the entry limit is refused."""
    a = make_dir(tmp_path / "a")
    for i in range(30):
        (a / f"f{i}").write_text("x")
    with pytest.raises(BundleError, match="entries"):
        pack(a, limits=SMALL)


# -- sizes: sparse members, hardlink copies, declared sizes, memory --------------------------------


def _member(info: tarfile.TarInfo, data: bytes = b"") -> bytes:
    """One raw PAX tar member (header blocks, data, padding), as tarfile would write it."""
    return info.tobuf(format=tarfile.PAX_FORMAT) + data + b"\0" * (-len(data) % 512)


def archive_of(*members: bytes, manifest: bytes = MANIFEST) -> bytes:
    """A gzipped tar of ``manifest`` then ``members`` (raw), closed by two zero blocks."""
    info = tarfile.TarInfo("fleetwave.toml")
    info.size = len(manifest)
    return _gzip(_member(info, manifest) + b"".join(members) + b"\0" * 1024)


def _num12(n: int) -> bytes:
    """A 12-byte tar number field: octal, or GNU base-256 when octal cannot hold it."""
    return b"%011o\0" % n if n < 8**11 else b"\x80" + n.to_bytes(11, "big")


def gnu_sparse(realsize: int, data: bytes = b"x" * 100) -> bytes:
    """An old-GNU sparse member ('S'): ``data`` at offset 0 of a file of ``realsize`` bytes."""
    info = tarfile.TarInfo("holes.bin")
    info.size = len(data)
    head = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    head[156:157] = tarfile.GNUTYPE_SPARSE
    head[386:398] = _num12(0)  # the first sparse struct: offset 0 ...
    head[398:410] = _num12(len(data))  # ... holding len(data) bytes
    head[483:495] = _num12(realsize)
    chksum = sum(head[:148]) + sum(head[156:512]) + 8 * ord(" ")
    head[148:155] = b"%06o\0" % chksum
    return bytes(head) + data + b"\0" * (-len(data) % 512)


def _pax_sparse(version: str, realsize: int, data: bytes = b"x" * 100) -> bytes:
    """A member in one of GNU tar's PAX sparse formats (0.0, 0.1 or 1.0)."""
    info = tarfile.TarInfo("holes.bin")
    n = len(data)
    if version == "1.0":  # the map sits at the start of the member's data
        sparse_map = b"1\n0\n%d\n" % n
        data = sparse_map + b"\0" * (-len(sparse_map) % 512) + data
        info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                            "GNU.sparse.name": "holes.bin", "GNU.sparse.realsize": str(realsize)}
    elif version == "0.1":
        info.pax_headers = {"GNU.sparse.size": str(realsize), "GNU.sparse.numblocks": "1",
                            "GNU.sparse.map": f"0,{n}"}
    else:
        info.pax_headers = {"GNU.sparse.size": str(realsize), "GNU.sparse.numblocks": "1",
                            "GNU.sparse.offset": "0", "GNU.sparse.numbytes": str(n)}
    info.size = len(data)
    return _member(info, data)


def _sparse_map_off_the_end() -> bytes:
    """A PAX 1.0 sparse member whose map claims far more numbers than the archive holds."""
    info = tarfile.TarInfo("holes.bin")
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                        "GNU.sparse.realsize": "1000"}
    data = b"99999999\n" + b"1\n" * 2000
    info.size = len(data)
    return _member(info, data)


def _many_hardlinks(count: int, size: int) -> bytes:
    """One ``size``-byte file and ``count`` hardlinks to it (each a full copy when unpacked)."""
    big = tarfile.TarInfo("big.bin")
    big.size = size
    links = []
    for i in range(count):
        link = tarfile.TarInfo(f"copy{i}")
        link.type = tarfile.LNKTYPE
        link.linkname = "big.bin"
        links.append(_member(link))
    return archive_of(_member(big, b"\0" * size), *links)


def _declared_size(size: int) -> bytes:
    """A regular member whose PAX header declares ``size`` bytes that are not there."""
    info = tarfile.TarInfo("huge.bin")
    info.size = size
    return archive_of(info.tobuf(format=tarfile.PAX_FORMAT))


def _big_extended_header() -> bytes:
    """A member whose PAX header carries two MiB of made-up records."""
    info = tarfile.TarInfo("a.txt")
    info.pax_headers = {"comment": "x" * (2 * 1024 * 1024)}
    return archive_of(_member(info))


MIB = 1024 * 1024
SIZES: dict[str, tuple[Callable[[], bytes], str]] = {
    "GNU sparse, 50 MiB of holes": (lambda: archive_of(gnu_sparse(50 * MIB)), "sparse"),
    "GNU sparse, 1 TiB of holes": (lambda: archive_of(gnu_sparse(1 << 40)), "sparse"),
    "PAX sparse 0.0": (lambda: archive_of(_pax_sparse("0.0", 50 * MIB)), "sparse"),
    "PAX sparse 0.1": (lambda: archive_of(_pax_sparse("0.1", 50 * MIB)), "sparse"),
    "PAX sparse 1.0": (lambda: archive_of(_pax_sparse("1.0", 50 * MIB)), "sparse"),
    "PAX sparse 1.0, 1 TiB": (lambda: archive_of(_pax_sparse("1.0", 1 << 40)), "sparse"),
    "PAX sparse map off the end": (lambda: archive_of(_sparse_map_off_the_end()), "sparse"),
    "hardlink copies above the limit": (lambda: _many_hardlinks(15, 256 * 1024), "limit"),
    "declared size of 1 TiB": (lambda: _declared_size(1 << 40), "limit"),
    "extended header of 2 MiB": (_big_extended_header, "extended header"),
}
ROOMY = Limits(max_entries=20, max_bytes=4 * MIB)  # room for the 2 MiB header to be read at all


@pytest.mark.parametrize("case", sorted(SIZES))
def test_oversized_members_are_refused_in_bounded_memory(case: str, tmp_path: Path) -> None:
    """Sparse members, hardlink copies above the byte limit and huge declared sizes are refused
    by name before anything is written, and refusing them never allocates the sizes they claim."""
    make, reason = SIZES[case]
    data = make()
    parent = tmp_path / "releases"
    parent.mkdir()
    tracemalloc.start()
    try:
        with pytest.raises(BundleError) as info:
            safe_unpack(data, parent / "rel", limits=ROOMY if "header" in case else SMALL)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert reason in str(info.value), str(info.value)
    assert "\n" not in str(info.value)
    assert peak < MIB // 2, f"{peak} bytes allocated to refuse {case}"
    assert list(parent.iterdir()) == []
    with pytest.raises(BundleError, match=reason):
        inspect(data, limits=ROOMY if "header" in case else SMALL)


def test_hardlinks_within_the_limit_are_counted_and_copied(tmp_path: Path) -> None:
    """Hardlink copies that fit the byte limit together with their file are unpacked as copies."""
    data = _many_hardlinks(3, 200 * 1024)  # 800 KiB written under a 1 MiB limit
    safe_unpack(data, tmp_path / "rel", limits=SMALL)
    assert [(tmp_path / "rel" / f"copy{i}").stat().st_size for i in range(3)] == [200 * 1024] * 3


def test_pack_refuses_hardlink_copies_above_the_limit(tmp_path: Path) -> None:
    """pack() of a .tar.gz counts hardlink copies against the limit before re-packing them."""
    path = tmp_path / "links.tar.gz"
    path.write_bytes(_many_hardlinks(15, 256 * 1024))
    with pytest.raises(BundleError, match="limit"):
        pack(path, limits=SMALL)


def test_large_member_is_unpacked_in_bounded_memory(tmp_path: Path) -> None:
    """A 16 MiB file is unpacked whole and intact while at most a small buffer is held at once."""
    payload = os.urandom(MIB) * 16
    data = tarball([("big.bin", "file", payload)])
    tracemalloc.start()
    try:
        safe_unpack(data, tmp_path / "rel")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (tmp_path / "rel" / "big.bin").read_bytes() == payload
    assert peak < 2 * MIB, f"{peak} bytes allocated to unpack a {len(payload)}-byte file"


def test_repack_is_byte_identical_to_the_whole_buffer_form(tmp_path: Path) -> None:
    """pack() gives the same bytes as gzip of the whole PAX tar at once (stable digests)."""
    a = make_dir(tmp_path / "a")
    (a / "big.bin").write_bytes(os.urandom(300_000))
    data, _ = pack(a)
    raw = gzip.decompress(data)
    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    assert data == comp.compress(raw) + comp.flush()


def test_a_directory_above_the_byte_limit_is_refused_before_reading(tmp_path: Path) -> None:
    """A file above the byte limit (sparse: 8 MiB of holes) is refused by its size, naming it,
    before any of it is read (a review: a 2 GiB file reached 2.1 GB resident first)."""
    a = make_dir(tmp_path / "a")
    with (a / "huge.bin").open("wb") as f:
        f.truncate(8 * MIB)
    tracemalloc.start()
    try:
        with pytest.raises(BundleError, match=r"more than 1048576 bytes of files \(with 'huge"):
            pack(a, limits=SMALL)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MIB // 2, f"{peak} bytes allocated to refuse an 8 MiB file"


def test_a_directory_is_packed_in_bounded_memory(tmp_path: Path) -> None:
    """A 16 MiB file of a directory is streamed into the bundle, never held whole."""
    a = make_dir(tmp_path / "a")
    (a / "big.bin").write_bytes(b"\0" * (16 * MIB))
    tracemalloc.start()
    try:
        data, _ = pack(a)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * MIB, f"{peak} bytes allocated to pack a 16 MiB file"
    safe_unpack(data, tmp_path / "rel")
    assert (tmp_path / "rel" / "big.bin").read_bytes() == b"\0" * (16 * MIB)


def test_a_file_that_changes_while_packed_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A file whose size differs from the one it was listed with is refused, not half packed."""
    import protocol.bundle as bundle

    a = make_dir(tmp_path / "a")
    real = bundle._read_dir

    def read_then_grow(root: Path, limits: Limits) -> object:
        entries = real(root, limits)
        (a / "app.py").write_text("print('grown')\n")
        return entries

    monkeypatch.setattr(bundle, "_read_dir", read_then_grow)
    with pytest.raises(BundleError, match=r"app\.py: changed while it was being packed"):
        pack(a)

