"""Text that nodes supply (ids, labels, reasons, mismatch samples, event messages) reaches the
operator's terminal escaped: no escape sequence, control character, bidi override or rich markup
of theirs is ever acted on; ``-o json`` stays exact."""

from __future__ import annotations

import io
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from click.testing import CliRunner
from rich.console import Console, RenderableType

from coordinator.cli import render
from coordinator.cli.base import cli
from coordinator.cli.fleet_cmds import render_table
from protocol import subjects
from protocol.codec import decode, encode
from protocol.messages import Cordon, Event, NodeView

HOSTILE = "\x1b]0;pwned\x07\x1b[2J"
ESCAPED = "\\x1b]0;pwned\\x07\\x1b[2J"
MARKUP = "[link=https://evil.example]click[/link] [/oops]"


def shown(renderable: RenderableType) -> str:
    """What a colour terminal receives for ``renderable``."""
    out = io.StringIO()
    Console(file=out, force_terminal=True, width=400, color_system="standard").print(renderable)
    return out.getvalue()


def assert_inert(text: str) -> None:
    """Only rich's own colour codes (``ESC[...m``) are left: no OSC (titles, hyperlinks), no
    screen clear, no bell, no C1 control, no bidi override."""
    rest = re.sub(r"\x1b\[[0-9;]*m", "", text)
    assert "\x1b" not in rest and "\x07" not in rest and "\x9b" not in rest, repr(rest)
    assert "\u202e" not in rest


def event(**kw: Any) -> Event:
    base: dict[str, Any] = {"id": "e1", "time": 0.0, "fleet": "f", "kind": "gate.failed"}
    return Event(**(base | kw))


def status(reason: str = "", node: str = "node-1", **extra: Any) -> dict[str, Any]:
    return {
        "id": "r1", "service": "hello", "version": "2.0.0", "from_version": "1.0.0",
        "strategy": "rolling", "state": "paused", "phase": "forward", "reason": reason,
        "current_wave": 0,
        "waves": [{"index": 0, "state": "inconclusive", "weight": 100, "nodes": [node],
                   "gates": {"outcome": "inconclusive", "reasons": [reason]}}],
        "nodes": {node: {"state": "failed", "version": "2.0.0", "healthy": False,
                         "online": True, "generation": 8, "reason": reason}},
        **extra,
    }


def test_an_event_reason_is_printed_escaped() -> None:
    """The line ``fleetwave events`` prints shows a hostile message's escapes as text."""
    line = render.event_line(event(message=f"wave 1: {HOSTILE}", node=f"node-3{HOSTILE}"))
    assert ESCAPED in line and "\x1b" not in line and "\x07" not in line


@pytest.mark.parametrize(
    ("text", "seen"),
    [
        pytest.param("a\nb\rc\td", "a\\x0ab\\x0dc\\x09d", id="line-breaks-and-tabs"),
        pytest.param("\x9b2J", "\\x9b2J", id="c1-csi"),
        pytest.param("\x7f\x00", "\\x7f\\x00", id="del-and-nul"),
        pytest.param("abc\u202edef\u2066x\u2069", "abc\\u202edef\\u2066x\\u2069", id="bidi"),
        pytest.param("node-1 ok é 名前", "node-1 ok é 名前", id="plain-text-unchanged"),
    ],
)
def test_safe_table(text: str, seen: str) -> None:
    """Every C0 and C1 control, DEL and bidi control is shown as an escape; the rest is kept."""
    assert render.safe(text) == seen
    assert render.safe(render.safe(text)) == seen


def test_events_command_escapes_and_json_stays_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """``fleetwave events`` escapes node text; ``-o json`` prints the event exactly."""
    hostile = event(message=HOSTILE, node="node-3", kind="slot.crashed")  # an agent's kind

    class FakeBus:
        def stream_records(self, *_: Any, **__: Any) -> AsyncIterator[tuple[str, bytes]]:
            async def gen() -> AsyncIterator[tuple[str, bytes]]:
                yield subjects.agent_event("default", "node-3", hostile.kind), encode(hostile)
            return gen()

    @asynccontextmanager
    async def connected(*_: Any, **__: Any) -> AsyncIterator[FakeBus]:
        yield FakeBus()

    monkeypatch.setattr("coordinator.cli.client.connected", connected)
    runner = CliRunner()
    plain = runner.invoke(cli, ["events"])
    assert plain.exit_code == 0, plain.output
    assert ESCAPED in plain.output and "\x1b" not in plain.output
    as_json = runner.invoke(cli, ["events", "-o", "json"])
    assert as_json.exit_code == 0, as_json.output
    assert decode(Event, as_json.output.strip()).message == HOSTILE
    assert json.loads(as_json.output)["message"] == HOSTILE


def test_status_on_a_terminal_shows_node_text_escaped_and_no_markup() -> None:
    """Node ids and reasons in the rich view are text: escapes shown, markup not parsed (a
    stray closing tag would otherwise raise, and a link tag would make a hyperlink)."""
    out = shown(render.status_renderable(status(f"{HOSTILE} {MARKUP}", node="n\u202e1")))
    assert_inert(out)
    assert ESCAPED in out and MARKUP in out and "n\\u202e1" in out


def test_status_text_and_progress_lines_escape_node_text() -> None:
    """Without a terminal, ``status`` and a followed ``deploy`` print the same text escaped."""
    st = status(HOSTILE, report={"shadow": {"outcome": "fail", "samples": [
        {"node": "node-1", "method": "GET", "path": f"/x{HOSTILE}", "what": "body digest",
         "live": f"ok{HOSTILE}", "shadow": "line1\nline2"}]}})
    text = render.status_text(st)
    assert ESCAPED in text and "\x1b" not in text and "line1\\x0aline2" in text
    lines = render.progress_lines({}, st)
    assert lines and all("\x1b" not in line and "\x07" not in line for line in lines)
    assert any(ESCAPED in line for line in lines)


def test_rollouts_table_escapes_reasons() -> None:
    """A rollout's reason (which quotes nodes) is shown escaped in ``fleetwave rollouts``."""
    row = {"id": "r1", "service": "hello", "from_version": "1", "version": "2",
           "strategy": "rolling", "state": "paused", "nodes": 1, "created": 0.0,
           "reason": f"{HOSTILE}{MARKUP}"}
    out = shown(render.rollouts_table([row]))
    assert_inert(out)
    assert ESCAPED in out and MARKUP in out


def test_nodes_table_escapes_ids_labels_and_services() -> None:
    """``fleetwave nodes`` shows what a node registered (id, labels, services) escaped."""
    row = NodeView(id=f"node-1{HOSTILE}", labels={"zone": f"a{HOSTILE}", "x": MARKUP},
                   online=True, services={f"web{HOSTILE}": {"version": MARKUP, "healthy": True}})
    out = shown(render_table([row], 0.0))
    assert_inert(out)
    assert out.count(ESCAPED) == 3 and out.count(MARKUP) == 2


def test_nodes_table_shows_who_cordoned_or_drained_escaped() -> None:
    """The CORDON column says cordoned or drained and by whom (a caller's name, escaped), "-"
    for a node in no cordon."""
    rows = [NodeView(id="node-1", online=True),
            NodeView(id="node-2", online=True, cordon=Cordon(node="node-2", by="alice")),
            NodeView(id="node-3", cordon=Cordon(node="node-3", by=f"bob{HOSTILE}", drain=True))]
    out = shown(render_table(rows, 0.0))
    assert_inert(out)
    assert "cordoned by alice" in out and f"drained by bob{ESCAPED}" in out


def test_nodes_table_says_online_offline_or_not_heard_yet() -> None:
    """STATUS: a node a coordinator that has just started has not heard from yet is neither."""
    rows = [NodeView(id="node-1", online=True), NodeView(id="node-2"),
            NodeView(id="node-3", unheard=True)]
    out = re.sub(r"\x1b\[[0-9;]*m", "", shown(render_table(rows, 0.0))).splitlines()
    assert [line.split()[1:3] for line in out[1:]] == [
        ["online", "-"], ["offline", "-"], ["not", "heard"]]


def test_sequential_gates_show_the_analysis_and_the_evidence_in_words() -> None:
    """A sequential wave's gates say the analysis and alpha, and the evidence when no reason
    does (a pass, or the evidence so far while baking); pending gates name the analysis too."""
    th = {"max_error_rate": 0.05, "analysis": "sequential", "alpha": 0.01}
    words = "errors 0/200 on 2.0.0 vs 0/600 on 1.0.0: e-value 9.2e-4, rise at most +2.61%"
    text = render.gates_text({"outcome": "baking", "requests": 200, "errors": 0, "error_rate": 0.0,
                       "thresholds": th, "evidence": [words]})
    assert text.startswith("baking, req 200, err 0 = 0.00% (max 5.00%)")
    assert "sequential, alpha 0.01" in text and words in text
    failed = render.gates_text({"outcome": "fail", "thresholds": th, "evidence": [words],
                         "reasons": ["errors 31/60 ...: fail"]})
    assert failed.endswith("sequential, alpha 0.01, errors 31/60 ...: fail")
    assert render.pending_gates_text({"gates": th, "bake": 30}) == \
        "after a 30s bake: err max 5.00%, sequential, alpha 0.01"


@pytest.mark.parametrize("width", [80, 60])
def test_rollouts_table_never_truncates_ids_or_names(width: int) -> None:
    """At 80 columns (a pipe's default) or fewer, no cell is cut (kubectl's rule: the id people
    copy into the next command is whole); the line runs on past the edge instead."""
    row = {"id": "checkout-service-20261202-074512-ab12", "service": "checkout-service",
           "from_version": "2026.12.01-rc.1", "version": "2026.12.02-rc.3",
           "strategy": "blue-green", "state": "rolled_back", "nodes": 120,
           "created": 1_800_000_000.0, "started_by": "alice-operator",
           "reason": "analysis failed: error rate 4.1% > 1% on 3 of 3 windows"}
    out = io.StringIO()
    Console(file=out, width=width, soft_wrap=True).print(render.rollouts_table([row]))
    text = out.getvalue()
    for whole in ("checkout-service-20261202-074512-ab12", " checkout-service ",
                  "2026.12.01-rc.1", "2026.12.02-rc.3", "blue-green", "rolled back", " 120 ",
                  "alice-operator", row["reason"]):
        assert whole in text, text
    assert "…" not in text and len(text.splitlines()) == 2


def test_nodes_table_never_truncates_node_ids() -> None:
    """``fleetwave nodes`` at 80 columns shows a long node id (what ``status`` and the other
    commands take) and its labels whole."""
    row = NodeView(id="web-eu-west-1a-rack17-host042.example.internal", online=True,
                   labels={"zone": "eu-west-1a", "rack": "rack17", "tier": "frontend"},
                   services={"checkout-service": {"version": "2026.12.02-rc.3", "healthy": True}})
    out = io.StringIO()
    Console(file=out, width=80, soft_wrap=True).print(render_table([row], 0.0))
    text = out.getvalue()
    assert "web-eu-west-1a-rack17-host042.example.internal" in text, text
    assert "rack=rack17,tier=frontend,zone=eu-west-1a" in text and "…" not in text, text
