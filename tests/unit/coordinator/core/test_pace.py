"""The heartbeat pace (``coordinator.core.pace``): the interval, and when the leader says it."""

from __future__ import annotations

import pytest

from coordinator.core import pace
from coordinator.core.fleet import MAX_INTERVAL


def test_the_interval_keeps_the_fleet_at_the_rate() -> None:
    assert pace.interval(3, 2000.0) == 0.002  # a small fleet: far below any agent's own
    assert pace.interval(10_000, 2000.0) == 5.0
    assert pace.interval(50_000, 2000.0) == 25.0
    assert pace.interval(10_000_000, 1.0) == MAX_INTERVAL  # never past what liveness allows


def test_the_first_pace_goes_out_at_once_then_only_when_due() -> None:
    p = pace.Pacer(2.0)
    first = p.due(100.0, 3, newcomers=False)
    assert first is not None and (first.interval, first.nodes, first.rate) == (1.5, 3, 2.0)
    p.published(100.0, first)
    assert p.due(100.5, 3, newcomers=True) is None  # at most once a SETTLE
    assert p.due(110.0, 3, newcomers=False) is None  # nothing moved, nobody new
    assert p.due(110.0, 3, newcomers=True) is not None  # a newcomer beats at its own until told
    again = p.due(100.0 + pace.REPEAT, 3, newcomers=False)
    assert again is not None and again.interval == 1.5  # repeated: a core message is not kept


def test_a_fleet_that_grows_is_told_when_the_interval_moves_past_the_change() -> None:
    p = pace.Pacer(1000.0)
    sent = p.due(0.0, 10_000, newcomers=False)
    assert sent is not None and sent.interval == 10.0
    p.published(0.0, sent)
    assert p.due(5.0, 10_500, newcomers=False) is None  # +5 %: no flood of paces while it grows
    grown = p.due(5.0, 11_500, newcomers=False)
    assert grown is not None and grown.interval == 11.5
    p.published(5.0, grown)
    shrunk = p.due(7.0, 8_000, newcomers=False)
    assert shrunk is not None and shrunk.interval == 8.0


def test_a_useless_rate_is_refused() -> None:
    for rate in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="positive"):
            pace.Pacer(rate)


def test_a_longer_interval_excuses_one_new_interval_of_silence() -> None:
    """The beat that announces a longer interval may be lost: the leader excuses every node for
    one new interval when it lengthens it, and for nothing when it shortens or repeats it."""
    p = pace.Pacer(1000.0)
    first = p.due(0.0, 10_000, newcomers=False)
    assert first is not None and p.grace(first) == 10.0
    p.published(0.0, first)
    assert p.grace(first) == 0.0  # the same again
    grown = p.due(5.0, 20_000, newcomers=False)
    assert grown is not None and p.grace(grown) == 20.0
    p.published(5.0, grown)
    shrunk = p.due(10.0, 5_000, newcomers=False)
    assert shrunk is not None and p.grace(shrunk) == 0.0


def test_a_restarted_coordinator_waits_three_paced_intervals_for_a_first_beat() -> None:
    """It cannot know a node's last beat: it gives each as long as a node gets after one (3
    intervals) before counting it lost, and never less than the runner's own floor."""
    assert pace.startup_grace(3, 2000.0, 10.0) == 10.0
    assert pace.startup_grace(50_000, 2000.0, 10.0) == 75.0
    assert pace.startup_grace(10_000_000, 1.0, 10.0) == 3 * MAX_INTERVAL


def test_the_services_read_go_out_at_once_when_they_change() -> None:
    """A rollout that reads counters starting (or ending) is said at once, even within a
    SETTLE of the last pace (the old release's nodes must report fresh counters before the
    first wave's baseline), the services sorted and once each."""
    p = pace.Pacer(2000.0)
    first = p.due(100.0, 50_000, newcomers=False)
    assert first is not None and first.reading == []
    p.published(100.0, first)
    assert p.due(100.1, 50_000, newcomers=True) is None  # a newcomer waits for the SETTLE
    started = p.due(100.1, 50_000, newcomers=False, reading=["web", "api", "web"])
    assert started is not None and started.reading == ["api", "web"]
    assert started.interval == 25.0
    p.published(100.1, started)
    assert p.due(102.0, 50_000, newcomers=False, reading=["web", "api"]) is None
    ended = p.due(102.1, 50_000, newcomers=False, reading=[])
    assert ended is not None and ended.reading == []


def test_which_rollouts_read_counters() -> None:
    """A bake, sequential analysis or a shadow reads the nodes' counters; a rollout without
    a bake judges no traffic."""
    from protocol.messages import Gates
    from protocol.testing import spec

    assert not pace.reads_counters(spec())
    assert pace.reads_counters(spec(bake=30.0))
    assert pace.reads_counters(spec(gates=Gates(analysis="sequential")))
    assert pace.reads_counters(spec(strategy="shadow"))
    assert not pace.reads_counters(spec(strategy="remove", bake=30.0))  # nothing serves


def test_a_leader_not_ready_says_nothing_of_the_services_read() -> None:
    """Until the leader has resumed its rollouts it does not know which read counters: its
    pace says None (agents keep what they were told), then the list at once when known."""
    p = pace.Pacer(2000.0)
    first = p.due(100.0, 50_000, newcomers=False, reading=None)
    assert first is not None and first.reading is None
    p.published(100.0, first)
    assert p.due(100.5, 50_000, newcomers=False, reading=None) is None
    known = p.due(100.5, 50_000, newcomers=False, reading=["web"])
    assert known is not None and known.reading == ["web"]


def test_a_rollout_reads_counters_while_it_runs_forward_up_to_its_last_gates() -> None:
    """Running forward with a bake: read, between waves too; not paused, not rolling back, not
    once its last wave passed (a blue-green's keep-warm window), not without a bake."""
    from coordinator.core.engine import new_record
    from protocol.messages import NodeView
    from protocol.testing import NEW, spec

    rec = new_record(id="r1", spec=spec(bake=30.0, batch="1"), release=NEW,
                     nodes=[NodeView(id="n1"), NodeView(id="n2")], current={}, now=0.0)
    rec.state = "running"
    assert pace.reads_now(rec)
    rec.waves[0].state = "passed"  # between the two waves
    assert pace.reads_now(rec)
    rec.current_wave = 1
    rec.waves[1].state = "baking"
    assert pace.reads_now(rec)
    rec.waves[1].state = "passed"  # past the last gates
    assert not pace.reads_now(rec)
    rec.waves[1].state = "baking"
    rec.phase = "rollback"
    assert not pace.reads_now(rec)
    rec.phase = "forward"
    rec.state = "paused"
    assert not pace.reads_now(rec)
    rec.state = "running"
    rec.spec.bake = 0.0
    assert not pace.reads_now(rec)


def test_a_burst_of_registrations_is_said_at_once_when_it_begins_and_ends() -> None:
    """Agents that start at once wait for the pace before their first watch: the burst's start
    goes out within a SETTLE of the last pace (not held for it), and so does its end."""
    p = pace.Pacer(2000.0)
    first = p.due(100.0, 20_000, newcomers=False)
    assert first is not None and first.burst is False
    p.published(100.0, first)
    assert p.due(100.1, 20_000, newcomers=True) is None  # newcomers alone wait for the SETTLE
    began = p.due(100.1, 20_000, newcomers=True, burst=True)
    assert began is not None and began.burst is True
    p.published(100.1, began)
    assert p.due(100.2, 20_000, newcomers=True, burst=True) is None
    again = p.due(101.2, 20_000, newcomers=True, burst=True)
    assert again is not None and again.burst is True  # newcomers still told, a SETTLE apart
    p.published(101.2, again)
    ended = p.due(101.3, 20_000, newcomers=False)
    assert ended is not None and ended.burst is False


def test_a_pace_for_newcomers_is_held_a_moment_so_that_a_burst_is_counted_first() -> None:
    """The first look that sees newcomers does not publish: HOLD later it does (a lone
    restart hears its pace that much later). Meanwhile a burst, once the leader has counted it,
    goes out at once, saying so: a fleet started at once is not first told "no burst"."""
    p = pace.Pacer(2000.0)
    first = p.due(100.0, 20_000, newcomers=False)
    assert first is not None
    p.published(100.0, first)
    assert p.due(110.0, 20_000, newcomers=True) is None  # seen, held
    assert p.due(110.0 + pace.HOLD - 0.01, 20_000, newcomers=True) is None
    told = p.due(110.0 + pace.HOLD, 20_000, newcomers=True)
    assert told is not None and told.burst is False
    p.published(110.0 + pace.HOLD, told)
    assert p.due(120.0, 20_000, newcomers=True) is None  # held again after it went out
    burst = p.due(120.1, 20_000, newcomers=True, burst=True)
    assert burst is not None and burst.burst is True


def test_while_newcomers_are_held_not_even_a_repeat_goes_out() -> None:
    """A repeat (or a moved interval) due in the moment newcomers were first seen would tell
    them "no burst" before it is counted: it waits for the hold as well."""
    p = pace.Pacer(2000.0)
    first = p.due(100.0, 20_000, newcomers=False)
    assert first is not None
    p.published(100.0, first)
    at = 100.0 + pace.REPEAT
    assert p.due(at, 20_000, newcomers=True) is None
    assert p.due(at, 30_000, newcomers=True) is None  # the interval moved: held too
    repeat = p.due(at + pace.HOLD, 30_000, newcomers=True)
    assert repeat is not None and repeat.nodes == 30_000
