"""The wave and node state tables: every row is a legal move, anything else raises and changes
nothing (after h11's tests of its state table)."""

from __future__ import annotations

from typing import get_args, get_type_hints

import msgspec
import pytest

from coordinator.core.engine_types import (
    NODE_MOVES,
    WAVE_MOVES,
    IllegalTransition,
    NodeState,
    WaveState,
    move_node,
    move_wave,
)
from protocol.messages import NodeProgress, WaveRecord

WAVE_STATES: tuple[WaveState, ...] = get_args(WaveState)
NODE_STATES: tuple[NodeState, ...] = get_args(NodeState)


def test_the_tables_name_every_state_of_the_wire_records() -> None:
    """Each table has one row per state the persisted record may hold, and moves only to such
    states, so a record written by any version is covered."""
    assert set(WAVE_STATES) == set(get_args(get_type_hints(WaveRecord)["state"]))
    assert set(NODE_STATES) == set(get_args(get_type_hints(NodeProgress)["state"]))
    for table, states in ((WAVE_MOVES, WAVE_STATES), (NODE_MOVES, NODE_STATES)):
        assert set(table) == set(states)
        for targets in table.values():
            assert targets <= set(states)


@pytest.mark.parametrize(("frm", "to"), [(f, t) for f in WAVE_STATES for t in WAVE_STATES])
def test_wave_moves(frm: WaveState, to: WaveState) -> None:
    """A wave moves along a row of WAVE_MOVES; any other move raises and leaves it as it was."""
    wave = WaveRecord(index=2, nodes=["node-1"], state=frm, started=5.0)
    before = msgspec.structs.replace(wave)
    if to in WAVE_MOVES[frm]:
        move_wave(wave, to)
        assert wave == msgspec.structs.replace(before, state=to)
    else:
        with pytest.raises(IllegalTransition, match=f"wave 2: no move from {frm} to {to}"):
            move_wave(wave, to)
        assert wave == before


@pytest.mark.parametrize(("frm", "to"), [(f, t) for f in NODE_STATES for t in NODE_STATES])
def test_node_moves(frm: NodeState, to: NodeState) -> None:
    """A node moves along a row of NODE_MOVES; any other move raises and leaves it as it was."""
    node = NodeProgress(node="node-1", wave=1, state=frm, reason="why", generation=3)
    before = msgspec.structs.replace(node)
    if to in NODE_MOVES[frm]:
        move_node(node, to)
        assert node == msgspec.structs.replace(before, state=to)
    else:
        with pytest.raises(IllegalTransition, match=f"node node-1: no move from {frm} to {to}"):
            move_node(node, to)
        assert node == before


def test_finished_states_are_final() -> None:
    """A passed wave and a rolled-back node never move again."""
    assert WAVE_MOVES["passed"] == frozenset()
    assert NODE_MOVES["rolled_back"] == frozenset()
