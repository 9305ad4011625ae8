"""The Grafana board ``deploy/grafana/fleetwave.json`` as the tests read it: its queries and the
metric names they use, and the coordinator's metric names, kept here in one place.

The agent's names are checked against a real agent's scrape
(``tests/integration/test_agent_metrics.py``); the coordinator's against ``COORDINATOR`` below,
the contract its ``--http`` /metrics is built to, and against a real coordinator's scrape during
a canary (``tests/integration/test_coordinator_metrics.py``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "fleetwave.json"

# The coordinator's metric families (histograms by family name: their samples are _bucket, _sum
# and _count; counters by sample name, with _total).
COORDINATOR = frozenset({
    "fleetwave_rollouts", "fleetwave_rollout_info", "fleetwave_rollout_wave",
    "fleetwave_rollout_waves", "fleetwave_rollout_nodes", "fleetwave_rollout_weight",
    "fleetwave_gate_decisions_total", "fleetwave_gate_error_ratio", "fleetwave_gate_p99_ratio",
    "fleetwave_nodes", "fleetwave_node_up", "fleetwave_coordinator_leader",
})
COORDINATOR_HISTOGRAMS = frozenset({
    "fleetwave_bus_request_duration_seconds", "fleetwave_rollout_duration_seconds",
    "fleetwave_rollback_duration_seconds",
})
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

_NAME = re.compile(r"\bfleetwave_[a-zA-Z0-9_]+")


def load() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(BOARD.read_text())
    return board


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested ones included."""
    for p in board["panels"]:
        yield p
        yield from p.get("panels", [])


def exprs(board: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the board: its panels' targets and its query variables."""
    out = [t["expr"] for p in panels(board) for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]
            out.append(q["query"] if isinstance(q, dict) else q)
    return out


def names(board: dict[str, Any]) -> set[str]:
    """The sample names the board's expressions use."""
    return {m for e in exprs(board) for m in _NAME.findall(e)}


def coordinator_name(name: str) -> bool:
    """Whether ``name`` is a sample name of the coordinator's metrics."""
    if name in COORDINATOR:
        return True
    return any(name.endswith(s) and name[: -len(s)] in COORDINATOR_HISTOGRAMS
               for s in HISTOGRAM_SUFFIXES)
