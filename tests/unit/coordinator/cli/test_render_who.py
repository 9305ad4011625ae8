"""Who asked, as people read it: ``status`` says who started, paused (while paused), aborted or
rolled back a rollout, ``rollouts`` who started each, an event line who asked for it (not what
the coordinator decided by itself)."""

from __future__ import annotations

from typing import Any

from coordinator.cli import render
from protocol.messages import Event


def st(**fields: Any) -> dict[str, Any]:
    base = {"id": "r1", "service": "hello", "version": "2.0.0", "strategy": "rolling",
            "state": "running", "waves": [], "nodes": {}}
    return {**base, **fields}


def test_status_says_who_started_paused_and_aborted() -> None:
    """paused_by shows only while paused; a record from before who was kept says nothing."""
    assert render.who_line(st(started_by="alice", paused_by="bob", state="paused")) == \
        "started by alice; paused by bob"
    assert render.who_line(st(started_by="alice", paused_by="bob")) == "started by alice"
    assert render.who_line(st(started_by="alice", aborted_by="bob", state="aborted")) == \
        "started by alice; aborted by bob"
    assert render.who_line(st()) == ""
    assert "rollback asked by coordinator" in render.status_text(
        st(started_by="alice", rollback_by="coordinator"))


def test_an_event_line_names_who_asked_not_the_coordinator() -> None:
    """An operator's event ends "(by NAME)"; the coordinator's own and agents' do not."""
    def line(who: str) -> str:
        return render.event_line(Event(id="e", time=0.0, fleet="f", kind="rollout.aborted",
                                       message="aborted", who=who))
    assert line("bob").endswith("aborted (by bob)")
    assert line("coordinator").endswith("aborted") and line("").endswith("aborted")


def test_a_who_is_printed_escaped() -> None:
    """A name nothing vouches for (an open bus) reaches the terminal escaped like node text."""
    assert "\x1b" not in render.who_line(st(started_by="\x1b[2Jx"))
