"""Which reply subjects a responder of ours answers (``Bus._answerable``): the server checks
none against the asker's permissions, and the answer goes out with the responder's rights."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from protocol.bus import Bus


class Client:
    def jetstream(self, timeout: float) -> Any:
        return None


@pytest.mark.parametrize("reply", ["_INBOX.abc.1", "_FWO.alice.xyz", "_OPS_alice.xyz",
                                   "_R_.abc.def"])
def test_an_askers_inbox_is_answered(reply: str) -> None:
    assert Bus(Client(), "f")._answerable("fw.f.api.alice.status", reply)  # type: ignore[arg-type]


@pytest.mark.parametrize("reply", [
    "$KV.fw-f-lease.leader",  # would write the lease
    "$KV.fw-f-desired.node-1.web",
    "$O.fw-f-releases.C.x",
    "fw.f.hb.node-1",  # would speak as node-1
    "fw.f.evt.rollout.succeeded",
    "_FWN.node-2.wZ3",  # a node's watch delivers there; no node asks
    "_INBOX_node-2.wZ3",  # the same, as a node of an earlier release names it
    "",
])
def test_no_other_subject_is_answered_and_it_is_said_once(
        reply: str, caplog: pytest.LogCaptureFixture) -> None:
    bus = Bus(Client(), "f")  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING):
        assert not bus._answerable("fw.f.api.alice.status", reply)
        assert not bus._answerable("fw.f.api.alice.status", reply)
    assert caplog.text.count("not answering") == 1, caplog.text
