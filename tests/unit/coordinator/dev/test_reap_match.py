"""Which processes ``reap_leftovers`` takes for a directory's: only those naming that directory
or a path under it, never a sibling whose name merely starts the same (tests run side by side in
such directories)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.manager.routing import router_socket
from coordinator.dev.devfleet import _names_path_under, _router_socket_dirs

ROOT = "/tmp/pytest-of-root/pytest-7/popen-gw1/test_a1"


@pytest.mark.parametrize(
    ("text", "under"),
    [
        (ROOT, True),  # a cwd that is the directory itself
        (ROOT + "/fleet/node-1", True),
        ("--data-dir=" + ROOT + "/node-2", True),
        (ROOT + ",other", True),  # a path list
        (ROOT + "0", False),  # test_a10: a sibling of test_a1
        (ROOT + "0/fleet", False),
        (ROOT + "_x/fleet", False),
        (ROOT + ".d", False),
        (ROOT + "0:" + ROOT + "/sock", True),  # the second mention is under it
        ("/tmp/pytest-of-root/pytest-7/popen-gw10/test_a1/fleet", False),
        ("", False),
    ],
)
def test_only_the_directory_and_paths_under_it_match(text: str, under: bool) -> None:
    """A mention of the directory counts when a path separator or the end follows it."""
    assert _names_path_under(text, ROOT) is under


def test_routers_with_their_socket_in_the_temp_dir_are_found(tmp_path: Path) -> None:
    """A data dir too deep for ``<data dir>/run/router-*.sock`` has its routers' sockets in a
    temp dir named after it; that dir is searched too (a router's argv names nothing else),
    whatever the service's name (a short name may fit where a longer one falls back)."""
    deep = tmp_path / ("d" * 60) / "fleet" / "node-1"
    deep.mkdir(parents=True)
    border = tmp_path / ("b" * (80 - len(str(tmp_path)) - 1))  # 80 bytes: "x" fits, "hello" not
    border.mkdir()
    assert len(str(border)) == 80
    assert router_socket(border, "x").parent == border / "run"
    found = _router_socket_dirs(tmp_path)
    for data_dir in (deep, border):
        sock = router_socket(data_dir, "hello")
        assert not str(sock).startswith(str(tmp_path))  # the agent's fallback
        assert str(sock.parent) in found
    assert str(router_socket(deep, "hello").parent) not in _router_socket_dirs(tmp_path, depth=2)
