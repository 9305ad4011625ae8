"""``fleetwave drain --wait``: when a node counts as drained, from its ``nodes -o json`` row;
and its flags checked before anything is asked of the coordinator."""

from __future__ import annotations

from typing import Any

import pytest

import coordinator.cli.client as client
from coordinator.cli import main
from coordinator.cli.node_cmds import drain_pending


def row(online: bool = True, **drains: str) -> dict[str, Any]:
    return {"id": "node-3", "online": online,
            "services": {name: {"service": name, "drain": d} for name, d in drains.items()}}


@pytest.mark.parametrize(("given", "left"), [
    (row(hello="drained", web="drained"), []),
    (row(), []),  # no service: nothing to drain
    (row(hello="drained", web="draining"), ["web (draining)"]),
    (row(hello=""), ["hello (not drained yet)"]),  # its heartbeat predates the drain
    (row(False, hello="drained"), ["the node is offline, so its routers cannot be asked"]),
    ({**row(False, hello="drained"), "unheard": True},
     ["the node is not heard from yet (the coordinator has just started)"]),
    (None, ["no such node in the node table"]),
    ({"id": "node-3", "online": True, "services": {"hello": {"service": "hello"}}},
     ["hello (not drained yet)"]),  # an agent older than the drain phase
])
def test_what_keeps_a_node_from_counting_as_drained(given: dict[str, Any] | None,
                                                    left: list[str]) -> None:
    assert drain_pending(given) == left


@pytest.mark.parametrize(("args", "says"), [
    (["drain", "node-3", "--timeout", "1m"], "--timeout is only for --wait"),
    (["drain", "node-3", "--wait", "--timeout", "soon"], "--timeout"),
])
def test_bad_flags_are_refused_before_any_request(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str],
    says: str,
) -> None:
    asked: list[str] = []
    monkeypatch.setattr(client, "request", lambda ctx, verb, *a, **kw: asked.append(verb))
    with pytest.raises(SystemExit) as info:
        main(["--nats", "nats://127.0.0.1:1", *args])
    err = capsys.readouterr().err
    assert info.value.code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert asked == []  # nothing was drained
