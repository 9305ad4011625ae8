"""deploy/prometheus/fleetwave-alerts.yml: Prometheus alerting rules that load (``promtool check
rules``), fire where they should and not where they should not (``promtool test rules`` on
tests/alerts/fleetwave-alerts.test.yml: every alert fires in at least one case there, with the
labels and text an operator gets), and name only metrics that fleetwave serves: the agent's
families (``agent.metrics.families``) and the coordinator's (its gauges, counters and
histograms), sample names as Prometheus stores them.

``promtool`` comes from Debian's prometheus package: ``.ci/run`` fetches it when missing (the
package unpacked aside: no server is installed or started); ``FLEETWAVE_PROMTOOL`` names another.
Without it these tests fail, saying so: a skip would hide a broken rule.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from prometheus_client.metrics_core import Metric

from agent.metrics import AgentFigures, families
from coordinator.http import metrics_map
from coordinator.http.metrics import CoordinatorMetrics, StateCollector

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "fleetwave-alerts.yml"
TESTS = ROOT / "tests" / "alerts" / "fleetwave-alerts.test.yml"
SEVERITIES = {"critical", "warning", "info"}
_NAME = re.compile(r"\bfleetwave_[a-zA-Z0-9_]+")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
            "gauge": ("",), "info": ("_info",)}


def promtool() -> str:
    found = os.environ.get("FLEETWAVE_PROMTOOL") or shutil.which("promtool")
    if not found:
        pytest.fail("promtool not found: .ci/run fetches it (Debian's prometheus package, "
                    "unpacked); or set FLEETWAVE_PROMTOOL to one", pytrace=False)
    return found


def run(*args: str, cwd: Path = ROOT) -> str:
    done = subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def sample_names(fams: list[Metric]) -> set[str]:
    return {f.name + s for f in fams for s in SUFFIXES[f.type]}


def served() -> set[str]:
    """Every sample name an agent's or a coordinator's /metrics may carry."""
    agent = sample_names(families(AgentFigures(node="n")))
    stub = SimpleNamespace(
        pacer=SimpleNamespace(sent=None, rate=2000.0), id="c", fleet_name="f", version="0",
        table=SimpleNamespace(beating=lambda now: 0, view=list), runner=None, heartbeats=0)
    state = sample_names(list(StateCollector(stub).collect()))  # type: ignore[arg-type]
    assert set(metrics_map.GAUGES) <= state
    declared = CoordinatorMetrics(stub)  # type: ignore[arg-type]
    counted = sample_names([m for c in vars(declared).values()
                            if hasattr(c, "collect") and not isinstance(c, StateCollector)
                            for m in c.collect()])
    return agent | state | counted


def test_the_rules_load() -> None:
    """promtool reads every rule, and each alert says how bad it is and what to do."""
    assert "SUCCESS" in run("check", "rules", str(RULES))
    seen = set()
    for r in rules():
        assert r["alert"] not in seen, r["alert"]
        seen.add(r["alert"])
        assert r["labels"]["severity"] in SEVERITIES, r["alert"]
        assert r["annotations"]["summary"].strip(), r["alert"]
        assert r["annotations"]["description"].strip(), r["alert"]


def test_each_alert_fires_where_it_should_and_nowhere_else() -> None:
    """promtool's unit tests of the rules pass, and every alert fires in one of them at least."""
    assert "SUCCESS" in run("test", "rules", TESTS.name, cwd=TESTS.parent)
    cases = yaml.safe_load(TESTS.read_text())["tests"]
    fired = {t["alertname"] for c in cases for t in c["alert_rule_test"] if t.get("exp_alerts")}
    assert fired == {r["alert"] for r in rules()}


def test_the_rules_name_only_metrics_fleetwave_serves() -> None:
    names = {n for r in rules() for n in _NAME.findall(r["expr"])}
    known = served()
    assert "fleetwave_router_requests_total" in known and "fleetwave_nodes" in known
    assert names and names <= known, names - known
