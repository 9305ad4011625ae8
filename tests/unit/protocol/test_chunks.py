"""Answers in chunks (``protocol.chunks``): split by the responder, joined by the requester."""

from __future__ import annotations

import pytest

from protocol import chunks
from protocol.errors import ProtocolError

Message = tuple[bytes, dict[str, str] | None]


def parts(data: bytes, most: int) -> list[Message]:
    return list(chunks.split(data, most))


def join(messages: list[Message]) -> bytes | None:
    """The first whole answer the messages make, as ``Bus.request`` takes it."""
    a = chunks.Assembly()
    for data, headers in messages:
        whole, _ = a.add(data, headers)
        if whole is not None:
            return whole
    return None


def test_an_answer_that_fits_is_one_message_without_a_header() -> None:
    assert parts(b"abc", 3) == [(b"abc", None)]
    assert parts(b"abc" * 1000, 0) == [(b"abc" * 1000, None)]  # limit unknown
    assert join(parts(b"abc", 3)) == b"abc"


@pytest.mark.parametrize("size", [4, 9, 10, 11, 700])
def test_a_larger_answer_round_trips_in_order(size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    messages = parts(data, 3)
    assert len(messages) == -(-size // 3) and all(len(p) <= 3 for p, _ in messages)
    headers = [h for _, h in messages]
    assert all(h is not None for h in headers)
    assert len({h[chunks.HEADER].rsplit("/", 1)[1] for h in headers if h}) == 1  # one token
    a = chunks.Assembly()
    for data_, h in messages[:-1]:
        assert a.add(data_, h) == (None, True)
    assert a.add(*messages[-1]) == (data, True)


def test_the_first_answer_complete_wins_and_one_stopped_half_way_swallows_nothing() -> None:
    """Every coordinator answers a read: answers interleave on one inbox. One that stops after
    its first chunk (it died, it froze) does not keep another's whole answer out."""
    a, b = parts(b"A" * 10, 4), parts(b"B" * 10, 4)
    assert join([a[0], b[0], b[1], a[1], b[2], a[2]]) == b"B" * 10  # b was whole first
    assert join([a[0], b[0], a[1], a[2], b[1], b[2]]) == b"A" * 10
    assert join([a[0], (b"whole", None), *a[1:]]) == b"whole"
    assert join([a[0], *b]) == b"B" * 10  # a stopped after its first chunk


@pytest.mark.parametrize("order", [[1, 0, 2], [0, 2], [0, 1, 1, 2]])
def test_a_reply_out_of_order_is_dropped_never_joined_wrong(order: list[int]) -> None:
    messages = parts(b"x" * 10, 4)
    a = chunks.Assembly()
    got = [a.add(*messages[i]) for i in order]
    assert all(whole is None for whole, _ in got)
    assert not got[-1][1] and "came after" in a.problem


def test_progress_and_what_a_cut_answer_reports() -> None:
    messages = parts(b"x" * 10, 4)
    a = chunks.Assembly()
    assert (a.received, a.total) == (0, 0)
    a.add(*messages[0])
    assert (a.received, a.total) == (1, 3)


@pytest.mark.parametrize("value", ["", "1", "1/2", "a/2/t", "1/b/t", "0/2/t", "3/2/t",
                                   f"1/{chunks.MAX_CHUNKS + 1}/t", "1/2/t/x", "1/2/"])
def test_a_malformed_header_is_refused(value: str) -> None:
    with pytest.raises(ProtocolError, match=chunks.HEADER):
        chunks.Assembly().add(b"x", {chunks.HEADER: value})


def test_a_reply_past_max_chunks_is_not_split() -> None:
    assert len(parts(b"x" * chunks.MAX_CHUNKS, 1)) == chunks.MAX_CHUNKS
    with pytest.raises(ValueError, match=str(chunks.MAX_CHUNKS)):
        chunks.split(b"x" * (chunks.MAX_CHUNKS + 1), 1)


def test_limits_follow_the_servers_max_payload() -> None:
    assert chunks.limit(1 << 20) == (1 << 20) - chunks.ROOM
    assert chunks.limit(0) == 0 and chunks.carried(0) == 0
    assert chunks.carried(1 << 20) == chunks.limit(1 << 20) * chunks.MAX_CHUNKS
    assert 0 < chunks.limit(1000) < 1000  # a tiny server: still a part of its max_payload
