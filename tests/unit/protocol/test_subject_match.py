"""protocol.bus.subject_matches (NATS subscription patterns) and the events' subject check."""

from __future__ import annotations

import pytest

from protocol.bus import subject_matches
from protocol.codec import encode
from protocol.errors import ProtocolError
from protocol.events import received
from protocol.messages import Event


@pytest.mark.parametrize(("pattern", "subject", "match"), [
    ("fw.f.pace", "fw.f.pace", True),
    ("fw.f.pace", "$O.fw-f-releases.C.x", False),
    ("fw.f.pace", "fw.f.pace.x", False),
    ("fw.f.hb.*", "fw.f.hb.n1", True),
    ("fw.f.hb.*", "fw.f.hb", False),
    ("fw.f.hb.*", "fw.f.hb.n1.x", False),
    ("fw.f.evt.>", "fw.f.evt.rollout.started", True),
    ("fw.f.evt.>", "fw.f.evt", False),
    ("fw.f.evt.>", "$KV.fw-f-release-index.zz", False),
    ("fw.*.api.>", "fw.f.api.alice.deploy", True),
])
def test_subject_matches_as_nats_does(pattern: str, subject: str, match: bool) -> None:
    assert subject_matches(pattern, subject) is match


def test_an_event_stored_under_another_subject_is_refused() -> None:
    """What a consumer delivered into the events stream keeps its own subject: not an event,
    whatever its body says (here the coordinator's, with a ``who``)."""
    body = encode(Event(id="e" * 32, time=1.0, fleet="f", kind="rollout.aborted", who="bob"))
    assert received("f", "fw.f.evt.rollout.aborted", body).who == "bob"
    with pytest.raises(ProtocolError, match="not an events subject"):
        received("f", "$KV.fw-f-release-index.zz", body)
    with pytest.raises(ProtocolError, match="not an events subject"):
        received("f", "fw.f.evt.", body)
