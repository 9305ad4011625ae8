"""protocol.logs.last_line: the last line of a child's log, read from its tail alone."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

from protocol.logs import WIDTH, last_line


def test_a_huge_log_is_read_from_its_tail_alone(tmp_path: Path) -> None:
    """A log of 512 MiB (sparse here: no disk) costs a few KiB to read its last line; reading it
    whole took an agent to 1.9 GiB and stopped its loop for seconds (a hook that wrote 2 GB)."""
    log = tmp_path / "hook.log"
    with log.open("wb") as f:
        f.truncate(512 * 1024 * 1024)
        f.seek(0, 2)
        f.write(b"\nmigrating\ndb locked\n\n")
    tracemalloc.start()
    try:
        assert last_line(log) == "db locked"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, peak


def test_missing_empty_long_and_blank(tmp_path: Path) -> None:
    """What the caller asks for when there is no file or no line; a long line cut to WIDTH;
    blank lines and surrounding space skipped; undecodable bytes replaced."""
    log = tmp_path / "x.log"
    assert last_line(log, missing="no log") == "no log"
    log.write_bytes(b"\n  \n")
    assert last_line(log, empty="no output") == "no output"
    log.write_bytes(b"first\n" + b"y" * (WIDTH + 50) + b"\n")
    assert last_line(log) == "y" * WIDTH
    log.write_bytes(b"ok\n  boom \xff \n\n   \n")
    assert last_line(log) == "boom \ufffd"
