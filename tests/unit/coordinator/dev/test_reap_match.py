"""Which processes ``reap_leftovers`` takes for a directory's: only those naming that directory
or a path under it, never a sibling whose name merely starts the same (tests run side by side in
such directories)."""

from __future__ import annotations

import pytest

from coordinator.dev.devfleet import _names_path_under

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
