"""A new rollout and cordoned nodes: skipped, named in the report, and told in an event."""

from __future__ import annotations

from coordinator.core.engine import EmitEvent, Rollout, Start, new_record
from protocol.codec import encode
from protocol.messages import NodeView
from protocol.testing import NEW, desired, spec


def test_a_cordoned_node_is_skipped_named_in_the_report_and_told() -> None:
    """node-2 cordoned: the record targets node-1 and node-3 only, its report says
    skipped_cordoned, and the start emits "node-2 cordoned: skipped" for it."""
    nodes = [NodeView(id=f"node-{i}") for i in (1, 2, 3)]
    current = {n.id: desired(n.id) for n in nodes}
    rec = new_record(id="r", spec=spec(batch="1"), release=NEW, nodes=nodes, current=current,
                     now=0.0, who="alice", cordoned={"node-2"})
    assert sorted(rec.nodes) == ["node-1", "node-3"]
    assert rec.report.skipped_cordoned == ["node-2"]
    assert b'"report":{"skipped_cordoned":["node-2"]}' in encode(rec)
    cmds = Rollout(rec, fleet="f").handle(Start(), 0.0)
    told = [(c.kind, c.node, c.message) for c in cmds if isinstance(c, EmitEvent)
            and c.kind == "rollout.node.skipped"]
    assert told == [("rollout.node.skipped", "node-2", "node-2 cordoned: skipped")]


def test_without_cordons_the_report_stays_empty() -> None:
    """No cordoned node selected: the record's report holds no skipped_cordoned part."""
    nodes = [NodeView(id="node-1")]
    rec = new_record(id="r", spec=spec(), release=NEW, nodes=nodes,
                     current={"node-1": desired("node-1")}, now=0.0, cordoned={"node-9"})
    assert b'"report":{}' in encode(rec)
