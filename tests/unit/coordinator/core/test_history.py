"""The rollout history's pure core: summaries, retention, rollback's choice, the limits parsed."""

from __future__ import annotations

import msgspec
import pytest

from coordinator.api.rollouts import summary as api_summary
from coordinator.core import history
from coordinator.core.history import Retention
from protocol.history import RolloutSummary
from protocol.messages import Event, RolloutRecord
from protocol.testing import NEW, spec


def s(i: int, state: str = "succeeded", *, whole: bool = True, settled: bool | None = None,
      service: str = "hello", from_version: str = "") -> RolloutSummary:
    """Rollout number ``i`` of a service (created at ``i``)."""
    done = state in ("succeeded", "rolled_back", "failed", "aborted")
    return RolloutSummary(id=f"{service}-{i:06d}", service=service, version=f"{i}.0.0",
                          from_version=from_version, state=state, created=float(i),
                          whole=whole, settled=done if settled is None else settled)


def test_a_summary_is_the_row_the_api_listed_from_a_record() -> None:
    """``row(summarise(record))`` is exactly the old ``rollouts`` row of that record."""
    rec = RolloutRecord(id="hello-1", spec=spec(), release=NEW, from_version="1.0.0",
                        state="succeeded", created=5.0, finished=9.0, started_by="alice")
    assert history.row(history.summarise(rec)) == api_summary(rec)
    assert set(history.row(history.summarise(rec))) == {
        "id", "service", "version", "from_version", "strategy", "state", "reason", "created",
        "finished", "nodes", "waves", "current_wave", "started_by"}


@pytest.mark.parametrize(("state", "outbox", "settled"), [
    ("succeeded", False, True),
    ("succeeded", True, False),   # its last events may not be in the stream yet
    ("running", False, False),
    ("paused", False, False),
])
def test_settled_means_terminal_with_nothing_left_to_publish(state: str, outbox: bool,
                                                             settled: bool) -> None:
    """Only a terminal record with an empty outbox is settled."""
    events = [Event(id="e", time=1.0, fleet="f", kind="k")] if outbox else []
    rec = RolloutRecord(id="hello-1", spec=spec(), release=NEW, state=state,  # type: ignore[arg-type]
                        outbox=events)
    assert history.summarise(rec).settled is settled


def test_the_newest_keep_stay_whole_and_older_settled_ones_are_reduced() -> None:
    """keep=3 of 6 settled rollouts: the 3 oldest are reduced, and say so in the index."""
    out = history.retain([s(i) for i in range(6)], Retention(keep=3))
    assert [e.id for e in out.entries] == [s(i).id for i in (5, 4, 3, 2, 1, 0)]
    assert [e.id for e in out.reduce] == [s(i).id for i in (2, 1, 0)]
    assert [e.whole for e in out.entries] == [True, True, True, False, False, False]


def test_an_unsettled_rollout_is_never_reduced_whatever_its_age() -> None:
    """A paused old rollout and a terminal one with events unpublished stay whole."""
    entries = [s(0, "paused"), s(1, settled=False), *[s(i) for i in range(2, 5)]]
    out = history.retain(entries, Retention(keep=1))
    assert {e.id for e in out.reduce} == {s(i).id for i in (2, 3)}
    assert {e.id for e in out.entries if e.whole} == {s(i).id for i in (0, 1, 4)}


def test_retention_is_idempotent() -> None:
    """Retaining what was retained reduces nothing more."""
    once = history.retain([s(i) for i in range(10)], Retention(keep=2))
    again = history.retain(once.entries, Retention(keep=2))
    assert again.reduce == [] and again.entries == once.entries


def test_the_index_is_capped_but_never_drops_a_whole_or_unsettled_rollout() -> None:
    """Past ``cap`` only reduced, settled summaries leave the index."""
    entries = [s(i) for i in range(150)] + [s(-1, "running")]
    out = history.retain(entries, Retention(keep=0))
    assert len(out.entries) == history.LIST_MIN + 1  # the 100 newest, and the live one
    assert out.entries[-1].state == "running"
    big = history.retain([s(i) for i in range(300)], Retention(keep=200))
    assert len(big.entries) == 200 + 0 and all(e.whole for e in big.entries[:200])


def test_a_new_summary_replaces_its_old_one_and_keeps_whether_it_is_whole() -> None:
    """Putting a rollout's newer summary in replaces the entry, not adds one."""
    entries = [s(2, "running"), s(1, whole=False)]
    out = history.with_summary(entries, s(2), Retention(keep=5))
    assert [e.state for e in out.entries] == ["succeeded", "succeeded"]
    assert [e.whole for e in out.entries] == [True, False]
    assert history.without(out.entries, s(2).id) == [out.entries[1]]


def test_a_summary_differing_only_in_whole_is_the_same() -> None:
    """``same`` ignores the index's own ``whole`` flag (no rewrite for it)."""
    assert history.same(s(1), msgspec.structs.replace(s(1), whole=False))
    assert not history.same(s(1), s(1, "failed"))


def test_the_rebuild_groups_by_service_and_retains_each() -> None:
    """Records of two services: each gets its own index, each retained on its own."""
    found = [s(i, service="a") for i in range(5)] + [s(i, service="b") for i in range(2)]
    built = history.rebuild(found, Retention(keep=2))
    assert set(built) == {"a", "b"}
    assert len(built["a"].reduce) == 3 and built["b"].reduce == []


def test_newest_merges_services_newest_first_up_to_the_limit() -> None:
    """The fleet's list is the newest of every service's index, merged."""
    a = [s(i, service="a") for i in (9, 5, 1)]
    b = [s(i, service="b") for i in (8, 7, 2)]
    assert [e.created for e in history.newest([a, b], 4)] == [9, 8, 7, 5]


@pytest.mark.parametrize(("entries", "to", "version", "base"), [
    ([s(3, from_version="2.0.0"), s(2, from_version="1.0.0")], "", "2.0.0", "hello-000003"),
    ([s(3, "rolled_back"), s(2, from_version="1.0.0")], "", "1.0.0", "hello-000002"),
    ([s(3, "failed")], "", "", "hello-000003"),
    ([s(3, "failed")], "0.9.0", "0.9.0", "hello-000003"),
])
def test_rollback_goes_to_the_version_before_the_last_success(
        entries: list[RolloutSummary], to: str, version: str, base: str) -> None:
    """The version before the last succeeded rollout, with that rollout's settings."""
    choice = history.rollback_choice(entries, to)
    assert (choice.version, choice.base, choice.running) == (version, base, None)


def test_rollback_names_a_rollout_still_running() -> None:
    """A rollout not terminal stops the choice."""
    choice = history.rollback_choice([s(3, "paused"), s(2)])
    assert choice.running is not None and choice.running.state == "paused"


def test_keep_is_bounded() -> None:
    """keep outside 0-KEEP_MAX is refused (an index must fit in one message)."""
    with pytest.raises(ValueError, match="keep"):
        Retention(keep=history.KEEP_MAX + 1)


@pytest.mark.parametrize(("text", "size"), [
    ("8GiB", 8 * 2**30), ("8G", 8 * 2**30), ("500MB", 500 * 10**6), ("16MiB", 2**24),
    ("20000000", 20_000_000), ("2tb", 2 * 10**12),
])
def test_sizes_parse(text: str, size: int) -> None:
    """Binary and decimal units, a plain number of bytes."""
    assert history.parse_size(text, what="--events-max-bytes") == size


@pytest.mark.parametrize(("text", "why"), [
    ("8 gallons", "not a size"), ("-1", "not a size"), ("1KB", "outside"), ("2PiB", "outside"),
])
def test_bad_sizes_say_what_to_write(text: str, why: str) -> None:
    """One message naming the flag and the fix."""
    with pytest.raises(ValueError, match=why) as err:
        history.parse_size(text, what="--events-max-bytes")
    assert str(err.value).startswith("--events-max-bytes:")


@pytest.mark.parametrize(("text", "seconds"), [("90d", 90 * 86400.0), ("12h", 43200.0),
                                               ("1h30m", 5400.0), ("400d", 400 * 86400.0)])
def test_ages_parse(text: str, seconds: float) -> None:
    """Durations as elsewhere, and days."""
    assert history.parse_age(text, what="--events-max-age") == seconds


@pytest.mark.parametrize(("text", "why"), [("5", "not a duration"), ("1m", "outside"),
                                           ("4000d", "outside"), ("soon", "not a duration")])
def test_bad_ages_say_what_to_write(text: str, why: str) -> None:
    """A bare number, too short or too long: refused with the fix."""
    with pytest.raises(ValueError, match=why):
        history.parse_age(text, what="--events-max-age")


def test_a_summarised_status_has_every_key_of_a_whole_one() -> None:
    """``status`` of a reduced rollout keeps the answer's shape: every key of a whole rollout's
    status, with ``summarised`` true, no waves and no nodes."""
    from coordinator.api.rollouts import status_dict, summarised_dict
    from protocol.history import SummarisedRollout

    rec = RolloutRecord(id="hello-1", spec=spec(), release=NEW, from_version="1.0.0",
                        state="succeeded", created=5.0, finished=9.0, started_by="alice")
    whole = status_dict(rec)
    reduced = summarised_dict(SummarisedRollout(summary=history.summarise(rec), spec=rec.spec))
    assert set(whole) <= set(reduced) and reduced["summarised"] is True
    assert (reduced["waves"], reduced["nodes"]) == ([], {})
    for key in ("id", "service", "version", "from_version", "strategy", "state", "created",
                "finished", "bake", "gates", "on_failure", "started_by"):
        assert reduced[key] == whole[key], key
