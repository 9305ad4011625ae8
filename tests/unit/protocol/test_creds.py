"""protocol.creds: a credentials file says whose it is, and a client refuses one not its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol import creds
from protocol.errors import ProtocolError

SEED = "SU" + "A" * 56


def test_a_rendered_file_parses_back() -> None:
    """render then parse gives the same identity; the inbox prefix is the node's own."""
    c = creds.Creds(fleet="default", role="node", name="node-1", seed=SEED)
    back = creds.parse(creds.render(c), "x")
    assert back == c and back.inbox_prefix == "_INBOX_node-1"
    assert creds.Creds("f", "operator", "alice", SEED).inbox_prefix == "_OPS_alice"


def test_another_nodes_file_is_refused_with_the_fix() -> None:
    """node-1's file given to node-2 names both and the file node-2 needs."""
    c = creds.Creds(fleet="default", role="node", name="node-1", seed=SEED)
    with pytest.raises(ProtocolError, match=r"node 'node-1''s, not node 'node-2''s.*node-2.creds"):
        creds.check_for(c, "f", fleet="default", role="node", name="node-2")
    with pytest.raises(ProtocolError, match="fleet 'default', not 'prod'"):
        creds.check_for(c, "f", fleet="prod")


def test_missing_and_garbage_files_are_one_line(tmp_path: Path) -> None:
    """A missing file and a file without a seed each give one line saying what to pass."""
    with pytest.raises(ProtocolError, match="does not exist"):
        creds.load(tmp_path / "nope.creds")
    bad = tmp_path / "bad.creds"
    bad.write_text("# fleet: default\n# role: node\n# name: n\n")
    with pytest.raises(ProtocolError, match="no seed") as info:
        creds.load(bad)
    assert "\n" not in str(info.value)
