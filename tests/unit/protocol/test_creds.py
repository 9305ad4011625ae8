"""protocol.creds: a credentials file says whose it is, and a client refuses one not its own."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest

from protocol import creds
from protocol.errors import ProtocolError

SEED = "SU" + "A" * 56


def test_a_rendered_file_parses_back() -> None:
    """render then parse gives the same identity; the inbox prefix is the node's own."""
    c = creds.Creds(fleet="default", role="node", name="node-1", seed=SEED)
    back = creds.parse(creds.render(c), "x")
    assert back == c and back.inbox_prefix == "_FWN.node-1"
    assert creds.Creds("f", "operator", "alice", SEED).inbox_prefix == "_FWO.alice"


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


NOON = dt.datetime(2027, 1, 1, 12, 0, tzinfo=dt.UTC)


def test_an_expiry_is_written_in_the_header_and_read_back() -> None:
    """A file with an expiry carries it as RFC 3339 UTC and parses back to the same moment."""
    c = creds.Creds(fleet="default", role="node", name="node-3", seed=SEED, expires=NOON)
    text = creds.render(c)
    assert "# expires: 2027-01-01T12:00:00Z\n" in text
    assert creds.parse(text, "x") == c


def test_an_expired_file_is_refused_with_how_to_renew(tmp_path: Path) -> None:
    """At its expiry (clock given) load refuses the file in one line naming the node, the time
    and the renew command; a second before, it loads."""
    path = tmp_path / "node-3.creds"
    path.write_text(creds.render(creds.Creds("default", "node", "node-3", SEED, expires=NOON)))
    assert creds.load(path, now=NOON - dt.timedelta(seconds=1)).expires == NOON
    with pytest.raises(creds.CredsExpired) as info:
        creds.load(path, now=NOON)
    msg = str(info.value)
    assert "node-3 expired at 2027-01-01T12:00:00Z" in msg and "auth renew DIR node-3" in msg
    assert "\n" not in msg and SEED not in msg


def test_a_bad_expiry_is_one_line() -> None:
    """An expiry that is not an RFC 3339 time with a zone is refused, naming the file."""
    for bad in ("tomorrow", "2027-01-01T12:00:00"):
        text = f"# fleet: f\n# role: node\n# name: n\n# expires: {bad}\n{SEED}\n"
        with pytest.raises(ProtocolError, match="x: expires"):
            creds.parse(text, "x")


def test_credentials_near_their_expiry_get_a_warning() -> None:
    """Within two weeks of the expiry there is a one-line warning with the time left and the
    renew command; earlier, later, or without an expiry there is none."""
    c = creds.Creds("default", "node", "node-3", SEED, expires=NOON)
    assert creds.expiring(c, NOON - dt.timedelta(days=15)) is None
    warn = creds.expiring(c, NOON - dt.timedelta(days=5))
    assert warn is not None and "(in 5 days)" in warn and "auth renew DIR node-3" in warn
    assert "(in 3 hours)" in str(creds.expiring(c, NOON - dt.timedelta(hours=3)))
    assert creds.expiring(c, NOON) is None
    assert creds.expiring(creds.Creds("default", "node", "n", SEED), NOON) is None


@pytest.mark.parametrize(("text", "why"), [
    ("# fleet: default\n# role: node\n# name: ../../etc/x.>\n{seed}", "name '../../etc/x.>'"),
    ("# fleet: a.b\n# role: node\n# name: n1\n{seed}", "fleet name 'a.b'"),
    ("# fleet: default\n# role: node\n# name: n1\n{seed}# role: coordinator\n", "after the seed"),
    ("# fleet: default\n# role: node\n# name: n1\n# name: n2\n{seed}", "a second '# name:'"),
])
def test_a_header_that_is_no_identity_is_refused(text: str, why: str) -> None:
    """A name or fleet no subject may hold, a header line after the seed or a repeated one is
    one line naming the file: the agent takes its node id from the header."""
    armoured = f"{creds.BEGIN}\n{SEED}\n{creds.END}\n"
    with pytest.raises(ProtocolError, match=f"^x: .*{re.escape(why)}"):
        creds.parse(text.format(seed=armoured), "x")
