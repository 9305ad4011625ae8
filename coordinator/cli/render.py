"""How rollouts look to people: rich tables for a terminal, plain lines for logs and CI.

Everything here is pure: it takes the status dict of ``coordinator.api.rollouts.status_dict`` (or
rows, or Events) and returns text or rich renderables; the commands print them. Following a
rollout without a terminal prints only what changed since the last poll (``progress_lines``), so
a CI log reads as a story, not as a screen redrawn every half second.

Much of what is shown was written by nodes (their ids, labels, reasons, mismatch samples, event
messages), and a node may be hostile: every line and cell made here passes through ``safe``,
which shows control characters as escapes, and table cells are ``Text`` (``cell``), never rich
markup. JSON output (``-o json``) does not come through here and stays exact.

rich is imported where a renderable is made, not with this module: ``deploy -o json`` and the
plain lines of a CI log need none of it (~20 ms of every such command's start).
"""

from __future__ import annotations

import io
import time
from typing import TYPE_CHECKING, Any

from protocol.messages import WAVE_IDS, Event
from protocol.subjects import COORDINATOR_CALLER

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.table import Table
    from rich.text import Text

# What a terminal would act on rather than show: C0 controls (ESC starts every escape sequence;
# line breaks could forge a line of output), DEL, C1 controls (0x9b is a one-byte CSI), and the
# bidi controls that reorder what is shown (Trojan Source), with the line/paragraph separators.
_UNSAFE: dict[int, str] = {
    c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))
} | {
    c: f"\\u{c:04x}"
    for c in (0x061C, 0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F),
              *range(0x2066, 0x206A))
}


def safe(text: object) -> str:
    """``text`` with every character a terminal would act on shown as an escape (``\\x1b``)."""
    return str(text).translate(_UNSAFE)


def cell(text: object, style: str = "") -> Text:
    """A table cell that shows ``text`` as it is: escaped by ``safe``, never read as markup."""
    from rich.text import Text

    return Text(safe(text), style=style)


STATE_STYLE = {
    "pending": "dim", "running": "cyan", "paused": "yellow", "succeeded": "green",
    "rolled_back": "magenta", "failed": "red", "aborted": "red",
    "waiting": "dim", "updating": "cyan", "baking": "blue", "passed": "green",
    "inconclusive": "yellow", "done": "green", "rolling_back": "magenta",
}


def headline(st: dict[str, Any]) -> str:
    """One line: which rollout, what to what, and where it is."""
    waves = st.get("waves") or []
    where = (f"wave {st.get('current_wave', 0) + 1}/{len(waves)}"
             if waves and st.get("state") == "running" else "")
    if st.get("phase") == "rollback" and st.get("state") == "running":
        where = "rolling back"
    parts = [
        f"rollout {st.get('id')}: {st.get('service')} {st.get('from_version') or '(nothing)'} -> "
        f"{st.get('version') or '(removed)'} ({st.get('strategy')})",
        str(st.get("state", "?")).replace("_", " "),
    ]
    if where:
        parts.append(where)
    if st.get("reason"):
        parts.append(str(st["reason"]))
    return safe("  ".join(parts[:1]) + ": " + ", ".join(parts[1:]))


def policy_line(st: dict[str, Any]) -> str:
    """The rollout's policies that differ from the defaults, as one line ("" if none does)."""
    bits = []
    if st.get("on_node_lost", "fail") != "fail":
        bits.append(f"on node lost: {st['on_node_lost']} (a lost node holds its wave until the "
                    "progress deadline)")
    if st.get("on_failure", "rollback") != "rollback":
        bits.append(f"on failure: {st['on_failure']}")
    return safe("; ".join(bits))


def who_line(st: dict[str, Any]) -> str:
    """Who started the rollout, and who paused (while paused), aborted or rolled it back, as
    one line ("" for a record from before ``who`` was kept)."""
    said = [("started", "started_by"), ("aborted", "aborted_by"),
            ("rollback asked", "rollback_by")]
    if st.get("state") == "paused":
        said.insert(1, ("paused", "paused_by"))
    return safe("; ".join(f"{what} by {st[key]}" for what, key in said if st.get(key)))


def _pct(x: Any) -> str:
    return f"{x:.2%}" if isinstance(x, (int, float)) else "-"


def _limit(thresholds: dict[str, Any], key: str, text: str) -> str:
    """`` (text)`` when the threshold ``key`` is set, so each figure sits next to its bound."""
    return f" ({text})" if thresholds.get(key) is not None else ""


def gates_text(gates: dict[str, Any]) -> str:
    """The figures of a wave's last gate evaluation, each next to its threshold; "" if never
    evaluated. Figures without a threshold are shown only when there is something to show."""
    if not gates:
        return ""
    if gates.get("outcome") == "promoted":
        return "promoted (gates skipped)"
    if gates.get("outcome") == "unchanged":
        return "unchanged (every node already ran the release)"
    th: dict[str, Any] = gates.get("thresholds") or {}
    bits = [str(gates.get("outcome", ""))]
    if "healthy" in gates:
        bits.append(f"healthy {gates['healthy']}/{gates.get('nodes', '?')}"
                    + _limit(th, "min_healthy", f"min {_pct(th.get('min_healthy'))}"))
    traffic = any(th.get(k) is not None for k in ("max_error_rate", "max_p99_ratio",
                                                   "min_requests"))
    if "requests" in gates and (gates["requests"] or traffic):
        bits.append(f"req {gates['requests']}"
                    + _limit(th, "min_requests", f"min {th.get('min_requests')}"))
        if gates["requests"] or th.get("max_error_rate") is not None:
            bits.append(f"err {gates.get('errors', 0)} = {_pct(gates.get('error_rate'))}"
                        + _limit(th, "max_error_rate", f"max {_pct(th.get('max_error_rate'))}"))
    if gates.get("p99_new_ms") is not None or th.get("max_p99_ratio") is not None:
        ratio = gates.get("p99_ratio")
        bits.append(f"p99 {_ms(gates.get('p99_new_ms'))} vs {_ms(gates.get('p99_old_ms'))}"
                    + (f" = x{ratio:.2f}" if isinstance(ratio, (int, float)) else "")
                    + _limit(th, "max_p99_ratio", f"max x{th.get('max_p99_ratio'):g}"
                             if th.get("max_p99_ratio") is not None else ""))
    if "users_new" in gates:  # a cohort rule (issue 15): who the two sides were
        bits.append(f"users ~{gates['users_new']} new / ~{gates.get('users_old', 0)} old, "
                    f"{gates.get('fallback_requests', 0)} req without the key")
    if gates.get("compared") or th.get("max_mismatch_rate") is not None:
        bits.append(f"mirror {gates.get('mismatched', 0)}/{gates.get('compared', 0)} mismatched"
                    + _limit(th, "max_mismatch_rate",
                             f"max {_pct(th.get('max_mismatch_rate'))}"))
    if th.get("analysis") == "sequential":
        bits.append(f"sequential, alpha {th.get('alpha')}")
    reasons = gates.get("reasons") or []
    if reasons:
        bits.append("; ".join(str(r) for r in reasons))
    elif gates.get("evidence"):  # a pass, or the evidence so far during the bake
        bits.append("; ".join(str(e) for e in gates["evidence"]))
    return safe(", ".join(b for b in bits if b))


def _ms(x: Any) -> str:
    return f"{x:g}ms" if isinstance(x, (int, float)) else "-"


def pending_gates_text(st: dict[str, Any]) -> str:
    """What the current wave will be judged on after its bake (``status_dict``'s ``gates`` and
    ``bake``), for a wave not evaluated yet; "" if no gate is set."""
    th: dict[str, Any] = st.get("gates") or {}
    bits = []
    if th.get("min_healthy") is not None:
        bits.append(f"healthy min {_pct(th['min_healthy'])}")
    if th.get("min_requests") is not None:
        bits.append(f"req min {th['min_requests']}")
    if th.get("max_error_rate") is not None:
        bits.append(f"err max {_pct(th['max_error_rate'])}")
    if th.get("max_p99_ratio") is not None:
        bits.append(f"p99 max x{th['max_p99_ratio']:g}")
    if th.get("max_mismatch_rate") is not None:
        bits.append(f"mirror max {_pct(th['max_mismatch_rate'])}")
    if bits and th.get("analysis") == "sequential":
        bits.append(f"sequential, alpha {th.get('alpha')}")
    if not bits:
        return ""
    bake = st.get("bake")
    return (f"after a {bake:g}s bake: " if isinstance(bake, (int, float)) and bake else
            "gates: ") + ", ".join(bits)


def _wave_gates(st: dict[str, Any], w: dict[str, Any]) -> str:
    """A wave's gate figures, or for the current wave still to be judged, its thresholds."""
    done = gates_text(w.get("gates") or {})
    if done:
        return done
    if w["index"] == st.get("current_wave") and w["state"] in ("updating", "baking"):
        return pending_gates_text(st)
    return ""


def shadow_report_lines(report: dict[str, Any]) -> list[str]:
    """The shadow's report (``record.report["shadow"]``) as lines; [] if there is none."""
    sh = report.get("shadow")
    if not isinstance(sh, dict) or not sh:
        return []

    def rate(key: str) -> str:
        value = sh.get(key)
        return f"{value:.2%}" if isinstance(value, (int, float)) else "-"

    methods = ",".join(str(m) for m in sh.get("methods") or [])
    lines = [
        f"shadow report: {sh.get('outcome', '?')} ({sh.get('mirror_percent', 0):g}% of "
        f"{methods or 'GET,HEAD'} mirrored to {sh.get('healthy', 0)}/{sh.get('nodes', 0)} "
        "healthy shadows)",
        f"  mirrored {sh.get('mirrored', 0)}, compared {sh.get('compared', 0)}, mismatched "
        f"{sh.get('mismatched', 0)} ({rate('mismatch_rate')}), shadow errors "
        f"{sh.get('shadow_errors', 0)} ({rate('error_rate')}), dropped {sh.get('dropped', 0)}",
        f"  p99 shadow {_ms(sh.get('p99_shadow_ms'))} vs live {_ms(sh.get('p99_live_ms'))}"
        + (f" (x{sh['p99_ratio']:.2f})" if isinstance(sh.get("p99_ratio"), float) else ""),
    ]
    lines += [f"  gate: {r}" for r in sh.get("reasons") or []]
    for x in sh.get("samples") or []:
        lines.append(f"  mismatch on {x.get('node', '?')}: {x.get('method', '')} "
                     f"{x.get('path', '')}: {x.get('what', '')}")
        lines.append(f"    live:   {x.get('live', '')}")
        lines.append(f"    shadow: {x.get('shadow', '')}")
    return [safe(line) for line in lines]


def skipped_lines(report: dict[str, Any]) -> list[str]:
    """The selected nodes a rollout left out at its start, one line each: cordoned
    (``fleetwave cordon``) or offline."""
    return ([f"{n} cordoned: skipped" for n in report.get("skipped_cordoned") or []]
            + [f"{n} offline: skipped" for n in report.get("skipped_offline") or []])


def bluegreen_lines(report: dict[str, Any]) -> list[str]:
    """The blue-green switch (``record.report["switch"]``), its warm window and the switch back
    (``report["switch_back"]``) as lines; a switch not yet seen on every node says nothing."""

    def ms(x: Any) -> str:
        return f"{x * 1000:.1f}ms" if isinstance(x, (int, float)) else "n/a"

    out: list[str] = []
    switch, back = report.get("switch"), report.get("switch_back")
    if isinstance(switch, dict) and isinstance(switch.get("spread"), (int, float)):
        out.append(f"switched {len(switch.get('nodes') or {})} nodes at once: spread "
                   f"{ms(switch['spread'])} (first to last), lag {ms(switch.get('lag'))} after "
                   "the decision")
        until = switch.get("warm_until")
        if isinstance(until, (int, float)):
            out.append(f"old slots stay warm until "
                       f"{time.strftime('%H:%M:%S', time.localtime(until))}: a rollback before "
                       "then is an instant switch back")
    if isinstance(back, dict) and isinstance(back.get("spread"), (int, float)):
        out.append(f"switched {len(back.get('nodes') or {})} nodes back at once: spread "
                   f"{ms(back['spread'])}, lag {ms(back.get('lag'))} after the decision")
    return out


def _styled(state: str) -> Text:
    return cell(state.replace("_", " "), STATE_STYLE.get(state, ""))


def summarised_lines(st: dict[str, Any]) -> list[str]:
    """A rollout that retention reduced: its headline, who, and what is left of it."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(st.get("finished") or 0))
    lines = [headline(st)]
    if who_line(st):
        lines.append(f"  {who_line(st)}")
    lines.append(f"  summarised: {st.get('node_count', 0)} nodes in {st.get('wave_count', 0)} "
                 f"waves, finished {when} UTC; only this summary is kept (its waves and nodes "
                 "are past 'fleetwave coordinator --keep-rollouts'; 'fleetwave events --rollout "
                 f"{st.get('id')}' has its events while the stream keeps them)")
    return [safe(line) for line in lines]


def _weight(w: dict[str, Any]) -> str:
    """A wave's weight: a share of requests ("20%"), or of users under a cohort rule ("20 % of
    users (header X-User; no key: client IP)")."""
    return str(w.get("share") or f"{w['weight']}%")


def status_renderable(st: dict[str, Any]) -> RenderableType:
    """The people's view of one rollout: a headline, its waves and its nodes."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    if st.get("summarised"):
        return Text("\n".join(summarised_lines(st)))
    waves = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("WAVE", "STATE", "WEIGHT", "NODES", "GATES"):
        waves.add_column(col)
    for w in st.get("waves") or []:
        waves.add_row(str(w["index"] + 1), _styled(w["state"]), cell(_weight(w)),
                      cell(wave_nodes(w)), cell(_wave_gates(st, w) or "-"))
    nodes = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("NODE", "STATE", "VERSION", "HEALTHY", "ONLINE", "GEN", "REASON"):
        nodes.add_column(col)
    for node, p in (st.get("nodes") or {}).items():
        nodes.add_row(cell(node), _styled(p["state"]), cell(p.get("version") or "-"),
                      "yes" if p.get("healthy") else "no", "yes" if p.get("online") else "no",
                      cell(p.get("generation", "")), cell(p.get("reason") or ""))
    report = (skipped_lines(st.get("report") or {}) + bluegreen_lines(st.get("report") or {})
              + shadow_report_lines(st.get("report") or {}))
    tail = [Text(""), Text("\n".join(safe(line) for line in report))] if report else []
    hidden = hidden_line(st)
    if hidden:
        tail.insert(0, Text(hidden))
    policies, who = policy_line(st), who_line(st)
    head = ([Text(headline(st), style="bold")] + ([Text(who)] if who else [])
            + ([Text(policies)] if policies else []))
    return Group(*head, Text(""), waves, Text(""), nodes, *tail)


def status_text(st: dict[str, Any]) -> str:
    """The same view as plain lines (no terminal)."""
    if st.get("summarised"):
        return "\n".join(summarised_lines(st))
    lines = [headline(st)]
    if who_line(st):
        lines.append(f"  {who_line(st)}")
    if policy_line(st):
        lines.append(f"  {policy_line(st)}")
    for w in st.get("waves") or []:
        g = _wave_gates(st, w)
        lines.append(f"  wave {w['index'] + 1}: {w['state']} at {_weight(w)} on "
                     f"{wave_nodes(w)}" + (f" [{g}]" if g else ""))
    for node, p in (st.get("nodes") or {}).items():
        lines.append(f"  {node}: {p['state']} {p.get('version') or '-'} "
                     f"{'healthy' if p.get('healthy') else 'unhealthy'}"
                     + ("" if p.get("online", True) else " offline")
                     + (f" ({p['reason']})" if p.get("reason") else ""))
    if hidden_line(st):
        lines.append(f"  {hidden_line(st)}")
    lines += [f"  {line}" for line in skipped_lines(st.get("report") or {})]
    lines += bluegreen_lines(st.get("report") or {})
    lines += shadow_report_lines(st.get("report") or {})
    return "\n".join(safe(line) for line in lines)


def progress_lines(before: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """What changed between two polls of a rollout's status, one line per change."""
    if before is None:  # the headline is safe already
        return [headline(now), *(safe(line) for line in skipped_lines(now.get("report") or {}))]
    out: list[str] = []
    stamp = time.strftime("%H:%M:%S")
    old_waves = {w["index"]: w for w in before.get("waves") or []}
    for w in now.get("waves") or []:
        prev = old_waves.get(w["index"])
        if prev is None or prev["state"] != w["state"]:
            g = _wave_gates(now, w)
            share = f" ({w['share']})" if w.get("share") and w["state"] == "updating" else ""
            out.append(f"{stamp} wave {w['index'] + 1}: {w['state']}{share}"
                       + (f" [{g}]" if g else ""))
    old_nodes = before.get("nodes") or {}
    shortened = brief(now)
    if shortened and before.get("node_states") != now.get("node_states"):
        out.append(f"{stamp} nodes: {_counts(now)}")
    for node, p in (now.get("nodes") or {}).items():
        prev = old_nodes.get(node) or {}
        if shortened and p["state"] not in ("failed", "rolling_back", "rolled_back") \
                and p.get("online", True):
            continue  # counted above; a line each for 50,000 nodes is no one's reading
        if (prev.get("state"), prev.get("online")) != (p["state"], p.get("online")):
            out.append(f"{stamp} {node}: {p['state']}"
                       + (f" {p['version']}" if p.get("version") else "")
                       + ("" if p.get("online", True) else " (offline)")
                       + (f": {p['reason']}" if p.get("reason") else ""))
    said = bluegreen_lines(before.get("report") or {})
    out += [f"{stamp} {line}" for line in bluegreen_lines(now.get("report") or {})
            if line not in said]
    if (before.get("state"), before.get("phase")) != (now.get("state"), now.get("phase")):
        out.append(f"{stamp} {headline(now)}")
    return [safe(line) for line in out]


def wave_nodes(w: dict[str, Any]) -> str:
    """A wave's node ids, or its first ones and how many in all: a wave of 5,000 nodes on one
    line is no one's reading (``fleetwave status ID -o json`` lists them)."""
    ids = w["nodes"][:WAVE_IDS]
    count = max(int(w.get("node_count") or 0), len(w["nodes"]))
    more = count - len(ids)
    return ",".join(ids) + (f",... (+{more}, {count} nodes)" if more > 0 else "")


def brief(st: dict[str, Any]) -> bool:
    """Whether ``st`` shows fewer nodes than its rollout has (``status_dict``'s max_nodes)."""
    return int(st.get("node_count") or 0) > len(st.get("nodes") or {})


def _counts(st: dict[str, Any]) -> str:
    states = st.get("node_states") or {}
    return (", ".join(f"{k} {v}" for k, v in sorted(states.items()))
            + f" (of {st.get('node_count', 0)})")


def hidden_line(st: dict[str, Any]) -> str:
    """What a brief status leaves out, in one line ("" when it shows every node)."""
    if not brief(st) or st.get("summarised"):
        return ""
    hidden = int(st["node_count"]) - len(st.get("nodes") or {})
    return (f"... {hidden} more nodes not shown; all {_counts(st)}; 'fleetwave status "
            f"{st.get('id', 'ID')}' lists every node")


def rollouts_table(rows: list[dict[str, Any]]) -> Table:
    """The people's view of ``fleetwave rollouts``, at its natural width (``unclipped``)."""
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("ROLLOUT", "SERVICE", "FROM", "TO", "STRATEGY", "STATE", "NODES", "CREATED",
                "BY", "REASON"):
        table.add_column(col, no_wrap=True)
    for r in rows:
        table.add_row(cell(r["id"]), cell(r["service"]), cell(r.get("from_version") or "-"),
                      cell(r["version"] or "(removed)"), cell(r["strategy"]),
                      _styled(r["state"]),
                      cell(r.get("nodes", "")),
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(r.get("created", 0))),
                      cell(r.get("started_by") or "-"), cell(r.get("reason") or ""))
    return unclipped(table)


def unclipped(table: Table) -> Table:
    """``table`` fixed at its natural width: kubectl's rule, what people copy into the next
    command (a rollout id, a node, a version) is never cut to fit a narrow terminal or a pipe's
    80 columns; a long line runs on (a terminal wraps it, ``grep`` sees it whole). Print it with
    a ``soft_wrap`` console, which does not crop."""
    from rich.console import Console
    from rich.measure import Measurement

    measuring = Console(file=io.StringIO(), width=1 << 16)
    table.width = Measurement.get(measuring, measuring.options, table).maximum
    return table


def event_line(e: Event) -> str:
    """One event as a log line: time, kind, where, message, and who asked for it (not said of
    what the coordinator decided by itself: most lines, and ``-o json`` has every ``who``)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.time))
    where = " ".join(x for x in (e.rollout, e.node) if x)
    by = f" (by {e.who})" if e.who and e.who != COORDINATOR_CALLER else ""
    return safe(f"{stamp} {e.kind:<22} {where + ' ' if where else ''}{e.message}{by}")
