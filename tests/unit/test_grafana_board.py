"""deploy/grafana/fleetwave.json: a Grafana board that loads (valid JSON, schema 39, a Prometheus
datasource variable and a service variable), whose every query names metrics that exist. The
agent's names are checked against a real agent's scrape in
tests/integration/test_agent_metrics.py; here, that each name is either the agent's (prefix) or
in the coordinator's list (tests/board.py)."""

from __future__ import annotations

from tests import board as b

AGENT_PREFIXES = ("fleetwave_router_", "fleetwave_slot_", "fleetwave_agent_",
                  "fleetwave_node_label_info", "fleetwave_service_")


def test_the_board_is_a_grafana_dashboard() -> None:
    """Valid JSON; schemaVersion 39; ${datasource} and $service variables; unique panel ids;
    every panel with a query reads the ${datasource} variable."""
    board = b.load()
    assert board["schemaVersion"] == 39 and board["uid"] == "fleetwave"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["service"]["type"] == "query" and variables["service"]["includeAll"]
    ids = [p["id"] for p in b.panels(board)]
    assert len(ids) == len(set(ids))
    for p in b.panels(board):
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]


def test_the_board_shows_red_per_version_rollouts_and_the_fleet() -> None:
    """RED per version (rate, error ratio, p50/p99 by version), the rollout timeline (state, wave,
    weight) and the fleet map (node up, labels) are all there."""
    text = "\n".join(b.exprs(b.load()))
    for needle in ("sum by (version) (rate(fleetwave_router_requests_total",
                   'code="5xx"', "histogram_quantile(0.99, sum by (version, le)",
                   "histogram_quantile(0.5, sum by (version, le)", "fleetwave_rollout_info",
                   "fleetwave_rollout_wave", "fleetwave_rollout_weight", "fleetwave_node_up",
                   "fleetwave_node_label_info"):
        assert needle in text, needle


def test_every_name_is_the_agents_or_the_coordinators() -> None:
    """No query names a metric that nobody serves: each is an agent name (checked against a real
    scrape elsewhere) or one of the coordinator's, and the service filter is on every RED query."""
    names = b.names(b.load())
    unknown = {n for n in names if not n.startswith(AGENT_PREFIXES) and not b.coordinator_name(n)}
    assert not unknown, unknown
    assert {n for n in names if b.coordinator_name(n)}, "the board shows no rollout at all"
    for e in b.exprs(b.load()):
        if "fleetwave_router_requests_total{" in e:
            assert 'service=~"$service"' in e, e
