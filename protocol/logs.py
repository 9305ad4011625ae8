"""The last line of a child process's log file, for the one-line reasons the agent, the router's
starter and the dev broker give when a child fails (a hook's status, a crash loop, a router or
nats-server that would not start).

Only the file's last ``TAIL_BYTES`` are read: a log may hold gigabytes (a hook or a
crash-looping service that wrote without end) and the readers run on an event loop; reading it
whole made a failing hook that wrote 2 GB take an agent to 1.9 GiB and stop its loop for 7 s.
"""

from __future__ import annotations

import os
from pathlib import Path

TAIL_BYTES = 4096
WIDTH = 200  # characters of the line kept: it goes into a status and an event


def last_line(path: Path, *, missing: str = "", empty: str = "") -> str:
    """The last non-blank line of the log at ``path`` (at most ``WIDTH`` characters, stripped):
    ``missing`` when it cannot be read, ``empty`` when its tail holds no line."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - TAIL_BYTES))
            tail = f.read(TAIL_BYTES)
    except OSError:
        return missing
    lines = [line for line in tail.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1].strip()[:WIDTH] if lines else empty
