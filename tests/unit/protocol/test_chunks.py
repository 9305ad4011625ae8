"""Answers in chunks (``protocol.chunks``): split by the responder, joined by the requester."""

from __future__ import annotations

import pytest

from protocol import chunks
from protocol.errors import ProtocolError


def join(messages: list[tuple[bytes, dict[str, str] | None]]) -> bytes | None:
    """The first whole answer the messages make, as ``Bus.request`` takes it."""
    a = chunks.Assembly()
    for data, headers in messages:
        out = a.add(data, headers)
        if out is not None:
            return out
    return None


def test_an_answer_that_fits_is_one_message_without_a_header() -> None:
    assert chunks.split(b"abc", 3) == [(b"abc", None)]
    assert chunks.split(b"abc" * 1000, 0) == [(b"abc" * 1000, None)]  # limit unknown
    assert join(chunks.split(b"abc", 3)) == b"abc"


@pytest.mark.parametrize("size", [4, 9, 10, 11, 700])
def test_a_larger_answer_round_trips_in_order(size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    parts = chunks.split(data, 3)
    assert len(parts) == -(-size // 3) and all(len(p) <= 3 for p, _ in parts)
    headers = [h for _, h in parts]
    assert all(h is not None for h in headers)
    assert len({h[chunks.HEADER].rsplit("/", 1)[1] for h in headers if h}) == 1  # one token
    a = chunks.Assembly()
    for data_, h in parts[:-1]:
        assert a.add(data_, h) is None
    assert a.add(*parts[-1]) == data


def test_the_first_responders_answer_is_taken_and_the_others_dropped() -> None:
    """Every coordinator answers a read: two answers interleave on one inbox."""
    a, b = chunks.split(b"A" * 10, 4), chunks.split(b"B" * 10, 4)
    mixed = [a[0], b[0], (b"B" * 10, None), b[1], a[1], b[2], a[2]]
    assert join(mixed) == b"A" * 10
    assert join([(b"whole", None), *a]) == b"whole"


@pytest.mark.parametrize("order", [[1, 0, 2], [0, 2], [0, 1, 1, 2]])
def test_a_chunk_out_of_order_or_missing_is_refused(order: list[int]) -> None:
    parts = chunks.split(b"x" * 10, 4)
    a = chunks.Assembly()
    with pytest.raises(ProtocolError, match="not whole"):
        for i in order:
            a.add(*parts[i])


@pytest.mark.parametrize("value", ["", "1", "1/2", "a/2/t", "1/b/t", "0/2/t", "3/2/t",
                                   f"1/{chunks.MAX_CHUNKS + 1}/t", "1/2/t/x", "1/2/"])
def test_a_malformed_header_is_refused(value: str) -> None:
    with pytest.raises(ProtocolError, match=chunks.HEADER):
        chunks.Assembly().add(b"x", {chunks.HEADER: value})


def test_a_reply_past_max_chunks_is_not_split() -> None:
    assert len(chunks.split(b"x" * chunks.MAX_CHUNKS, 1)) == chunks.MAX_CHUNKS
    with pytest.raises(ValueError, match=str(chunks.MAX_CHUNKS)):
        chunks.split(b"x" * (chunks.MAX_CHUNKS + 1), 1)


def test_limits_follow_the_servers_max_payload() -> None:
    assert chunks.limit(1 << 20) == (1 << 20) - chunks.ROOM
    assert chunks.limit(0) == 0 and chunks.carried(0) == 0
    assert chunks.carried(1 << 20) == chunks.limit(1 << 20) * chunks.MAX_CHUNKS
