"""Rollout records persisted by an earlier release of the coordinator (before the re-housing into
core/, runtime/ and strategies/) decode, re-encode byte for byte (plus the fields added since,
at their defaults: ``ADDED``), and are carried on exactly as that release did: the record in KV
is the wire format between coordinator versions.

``data/records_v1.json`` holds, per case, a record as the earlier release wrote it, the observed
states it had, one event, and what that release's engine did with it (the record after, the
commands)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from coordinator.core.engine import (
    Command,
    EngineEvent,
    Persist,
    RollbackRequested,
    Rollout,
    Tick,
    WriteDesired,
)
from protocol.codec import decode, encode
from protocol.messages import ObservedState, RolloutRecord

CASES: dict[str, dict[str, Any]] = json.loads(
    (Path(__file__).parent / "data" / "records_v1.json").read_text())
# Fields added to the record since records_v1 was written, each after the field it follows, with
# the default an old record decodes to: re-encoding writes them, and nothing else may differ.
ADDED = [('"on_failure":"rollback"', '"on_node_lost":"fail"'),
         ('"on_failure":"pause"', '"on_node_lost":"fail"'),
         ('"min_requests":null', '"analysis":"threshold","alpha":0.01'),  # issue 18
         ('"on_node_lost":"fail"', '"cohort_key":"","cohort_fallback":"ip",'  # issue 15
          '"assign_cookie":false,"allow":[],"deny":[],"preview":[]'),
         ('"preview":[]', '"prestage":""')]  # issue 17


# ... and at the end of the record (issue 13): the events not yet acknowledged by the stream
# (the outbox), and the lease term of the coordinator that wrote it; (issue 14) who started,
# paused, aborted or rolled it back.
ADDED_AT_END = ('"outbox":[],"term":0,"started_by":"","paused_by":"","aborted_by":"",'
                '"rollback_by":"","prestage":0,"pages":0,"node_count":0,'  # and (issue 17)
                '"undo":false')
# the waves staged ahead, how many pages hold its node table (none: it is kept whole); whether
# ``rollback SERVICE`` started it


# ... and at the end of every desired state in it (issue 18): the read period a sequential wave
# asks for.
DESIRED_END = re.compile(r'("rollout":"[^"]*","time":[-+.0-9eE]+)}')
ADDED_TO_DESIRED = '"stats_every":0.0'
# ... and at the end of every node's progress (issue 17): its pre-staging.
NODE_END = re.compile(r'("online":(?:true|false))}')
ADDED_TO_NODE = '"staged":"","stage_deadline":0.0'


def upgraded(old: str) -> bytes:
    """``old`` (a record as the earlier release wrote it) as this release writes it: the same
    bytes, with every field added since at its place and its default."""
    for after, field in ADDED:
        old = old.replace(after, f"{after},{field}", 1)
    old = DESIRED_END.sub(rf"\1,{ADDED_TO_DESIRED}}}", old)
    old = NODE_END.sub(rf"\1,{ADDED_TO_NODE}}}", old)
    assert old.endswith("}")
    return f"{old[:-1]},{ADDED_AT_END}}}".encode()
EVENTS: dict[str, EngineEvent] = {"Tick": Tick(), "RollbackRequested":
                                  RollbackRequested(reason="operator")}


def from_one(text: str) -> str:
    """An event's words as this release says them: waves counted from 1 (the file's, from 0)."""
    return re.sub(r"\bwave (\d+)\b", lambda m: f"wave {int(m[1]) + 1}", text)


def success_first(commands: list[list[Any]]) -> list[list[Any]]:
    """``commands`` as this release orders them: the earlier one said ``rollout.succeeded``
    after the writes the last wave leaves behind (the old slots retired, a shadow stopped);
    since session 23 it is said before them (``engine_progress.Progress.succeed``), so that a
    followed deploy returns without waiting for a write to every node."""
    out = list(commands)
    said = [i for i, c in enumerate(out) if c[:2] == ["event", "rollout.succeeded"]]
    writes = [i for i, c in enumerate(out) if c[0] == "write"]
    if said and writes and writes[0] < said[0]:
        out.insert(writes[0], out.pop(said[0]))
    return out


def described(cmds: list[Command]) -> list[list[Any]]:
    """Commands as the file writes them: persist, write (desired state), event (kind, node,
    text)."""
    out: list[list[Any]] = []
    for c in cmds:
        if isinstance(c, Persist):
            out.append(["persist"])
        elif isinstance(c, WriteDesired):
            out.append(["write", json.loads(encode(c.desired))])
        else:
            out.append(["event", c.kind, c.node, c.message])
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_an_old_record_round_trips_byte_for_byte(name: str) -> None:
    """Decoding a record the earlier release wrote and encoding it again gives the same bytes."""
    for key in ("before", "after"):
        old = CASES[name][key]
        assert encode(decode(RolloutRecord, old.encode())) == upgraded(old)


@pytest.mark.parametrize("name", sorted(CASES))
def test_an_old_record_is_carried_on_as_before(name: str) -> None:
    """The engine takes the old record where it was and decides what the earlier one decided:
    the same record after the step and the same commands, in the same order (but for a
    success said before its last writes: ``success_first``)."""
    case = CASES[name]
    r = Rollout(decode(RolloutRecord, case["before"].encode()), fleet="f")
    for seen in case["observed"]:
        r._observed[seen["node"]] = decode(ObservedState, json.dumps(seen).encode())
    cmds = r.handle(EVENTS[case["event"]], case["t"])
    assert described(cmds) == [
        ["write", {**c[1], "stats_every": 0.0}] if c[0] == "write"
        else [*c[:3], from_one(c[3])] if c[0] == "event" else c
        for c in success_first(case["commands"])]
    assert encode(r.record) == upgraded(case["after"])
