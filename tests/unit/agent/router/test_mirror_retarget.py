"""A mirror whose shadow changes drops the copies still queued for the old one, so a hanging
shadow's backlog never delays the next shadow's copies."""

from __future__ import annotations

from agent.router.mirror import Answer, Mirror, MirrorJob
from agent.router.stats import MirrorCounters
from agent.router.upstream import Pool

LIVE = Answer(status=200, headers=[], digest="", body=b"", truncated=False, latency_ms=1.0)


def job(port: int) -> MirrorJob:
    return MirrorJob(host="127.0.0.1", port=port, method="GET", target="/", head=b"", body=b"",
                     live=LIVE, ignore_headers=frozenset(), ignore_json_fields=())


def mirror(counters: MirrorCounters, queue_size: int = 8) -> Mirror:
    # The workers are not started: the queue is looked at as it stands.
    return Mirror(counters, lambda host, port: Pool(host, port), queue_size=queue_size)


async def test_copies_for_another_shadow_are_dropped_and_counted() -> None:
    """Queued copies for port 1 go when the target becomes port 2; port 2's stay, in order."""
    counters = MirrorCounters()
    m = mirror(counters)
    for port in (1, 2, 1, 2, 1):
        m.offer(job(port))
    assert m.discard_stale(("127.0.0.1", 2)) == 3
    assert (counters.mirrored, counters.dropped) == (5, 3)
    # Room again for new copies: two kept of eight.
    for _ in range(6):
        m.offer(job(2))
    assert counters.dropped == 3
    m.offer(job(2))
    assert counters.dropped == 4  # full again: dropped, as ever


async def test_mirror_off_drops_the_whole_backlog() -> None:
    """With no shadow any more every queued copy is dropped; an empty queue drops nothing."""
    counters = MirrorCounters()
    m = mirror(counters)
    for _ in range(4):
        m.offer(job(1))
    assert m.discard_stale(None) == 4
    assert m.discard_stale(None) == 0
    assert counters.dropped == 4
