"""Direct gets' replies (``protocol.direct.classify``) and the read loop against a server that
answers no batches (a replica of a version before 2.11, mid-upgrade). Real servers, batches,
missing chunks and refusals: ``tests/integration/test_releases.py``."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from nats.js.api import Header

from protocol import direct
from protocol.errors import BusError

SEQ = {"Nats-Stream": "OBJ_x", "Nats-Subject": "$O.x.C.n", "Nats-Sequence": "7"}


def test_a_message_of_a_batch_and_one_of_a_server_without_batches() -> None:
    assert direct.classify({**SEQ, "Nats-Num-Pending": "2", "Nats-Last-Sequence": "6"}) == \
        direct.Reply("message", seq=7, batched=True)
    assert direct.classify(SEQ) == direct.Reply("message", seq=7, batched=False)


def test_the_end_of_a_batch_says_how_many_are_left() -> None:
    eob = {"Status": "204", Header.DESCRIPTION: "EOB", "Nats-Num-Pending": "3",
           "Nats-Last-Sequence": "9"}
    assert direct.classify(eob) == direct.Reply("end", pending=3)
    assert direct.classify({**eob, "Nats-Num-Pending": "0"}) == direct.Reply("end", pending=0)


def test_absent_refused_and_malformed_replies() -> None:
    assert direct.classify({"Status": "404", Header.DESCRIPTION: "Message Not Found"}).kind == \
        "absent"
    bad = direct.classify({"Status": "408", Header.DESCRIPTION: "Bad Request"})
    assert (bad.kind, bad.reason) == ("refused", "408 Bad Request")
    none = direct.classify({"Status": "503"})
    assert none.kind == "refused" and "allow direct gets" in none.reason
    assert direct.classify(None).kind == "refused"  # no headers: not a stored message
    assert direct.classify({"Nats-Sequence": "x"}).reason == \
        "a message without its stream sequence"
    assert direct.classify({"Status": "204", "Nats-Num-Pending": "?"}).kind == "refused"


@dataclass
class _Msg:
    data: bytes
    headers: dict[str, str] | None


class _Sub:
    def __init__(self, subject: str) -> None:
        self.subject = subject
        self.unsubscribed = False

    async def unsubscribe(self) -> None:
        self.unsubscribed = True


class _OldServer:
    """A client whose server answers each direct get with one message, ignoring ``batch``."""

    def __init__(self, stored: list[bytes]) -> None:
        self.stored = stored  # the subject's messages at sequences 1, 3, 5, ... (interleaved)
        self.asked: list[dict[str, Any]] = []
        self.cb: Callable[[_Msg], Awaitable[None]] | None = None
        self.sub: _Sub | None = None

    def new_inbox(self) -> str:
        return "_INBOX.test"

    async def subscribe(self, subject: str, cb: Callable[[_Msg], Awaitable[None]]) -> _Sub:
        self.cb, self.sub = cb, _Sub(subject)
        return self.sub

    async def publish(self, subject: str, payload: bytes, reply: str) -> None:
        assert subject == "$JS.API.DIRECT.GET.OBJ_x" and reply == "_INBOX.test"
        ask = json.loads(payload)
        self.asked.append(ask)
        assert self.cb is not None
        index = (ask["seq"]) // 2  # the first stored sequence >= seq is 2 * index + 1
        if index < len(self.stored):
            await self.cb(_Msg(self.stored[index], {**SEQ, "Nats-Sequence": str(2 * index + 1)}))
        else:
            await self.cb(_Msg(b"", {"Status": "404"}))


async def test_a_server_without_batches_is_asked_for_each_next_message() -> None:
    server = _OldServer([b"a", b"b", b"c"])
    got: list[bytes] = []
    await direct.read_subject(server, "OBJ_x", "$O.x.C.n", 3, got.append, idle=1)
    assert got == [b"a", b"b", b"c"]
    assert [a["seq"] for a in server.asked] == [1, 2, 4]  # after each sequence received
    assert server.sub is not None and server.sub.unsubscribed


async def test_fewer_messages_than_asked_fail_and_a_write_error_stops_the_read() -> None:
    server = _OldServer([b"a", b"b"])
    with pytest.raises(BusError, match="only 2 of its 3 chunks are stored"):
        await direct.read_subject(server, "OBJ_x", "$O.x.C.n", 3, lambda _: None, idle=1)
    assert server.sub is not None and server.sub.unsubscribed

    def full(_: bytes) -> None:
        raise OSError("disk full")

    server = _OldServer([b"a", b"b"])
    with pytest.raises(OSError, match="disk full"):
        await direct.read_subject(server, "OBJ_x", "$O.x.C.n", 2, full, idle=1)
    assert len(server.asked) == 1 and server.sub is not None and server.sub.unsubscribed


async def test_no_answer_within_idle_fails_the_read() -> None:
    class Silent(_OldServer):
        async def publish(self, subject: str, payload: bytes, reply: str) -> None:
            self.asked.append(json.loads(payload))

    server = Silent([])
    with pytest.raises(BusError, match=r"no answer from OBJ_x for 0.05s \(0 of 2 chunks read\)"):
        await direct.read_subject(server, "OBJ_x", "$O.x.C.n", 2, lambda _: None, idle=0.05)
    assert server.sub is not None and server.sub.unsubscribed


async def test_a_batch_ended_without_a_message_fails_instead_of_looping() -> None:
    class Empty(_OldServer):
        async def publish(self, subject: str, payload: bytes, reply: str) -> None:
            self.asked.append(json.loads(payload))
            assert self.cb is not None
            await self.cb(_Msg(b"", {"Status": "204", "Nats-Num-Pending": "5"}))

    server = Empty([])
    with pytest.raises(BusError, match="ended a batch without a message"):
        await direct.read_subject(server, "OBJ_x", "$O.x.C.n", 2, lambda _: None, idle=1)
    assert len(server.asked) == 1 and server.sub is not None and server.sub.unsubscribed
