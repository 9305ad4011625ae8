"""Reading one subject's messages from a stream with batched direct gets: no consumer.

The agents' fetch of a release larger than one object-store chunk (``Bus.obj_get_into``) went
through an ordered consumer: one made and removed on the server per node. When a release goes
to a whole fleet at once (``--prestage all``, a wave of thousands), that is thousands of
consumers asked for at once, and past what the server makes in its API timeout they time out,
are tried again while the abandoned ones still stand, and the server falls behind for good (the
restart storm of ``tests/perf/bench_restart.py``): 20,000 fetches of a 3-chunk object at once
(``tests/perf/bench_fetch.py``) took 43.1 s, 19,998 attempts timed out and the server spent
39.7 CPU-s; in batched direct gets, 11.6 s, none failed, 2.1 CPU-s.

A direct get (nats-server 2.11+, ADR-31; the object store's stream allows them) is a request
answered from the stream's store by any of its servers, with no state kept on the server:
``{"seq", "next_by_subj", "batch", "max_bytes"}`` is answered by up to ``batch`` messages of
that subject from ``seq`` on, until about ``max_bytes`` of them are sent, then an end-of-batch
marker (status 204 "EOB", with how many are left); the next request starts after the last
sequence received, so what is in flight is bounded by ``max_bytes`` (the flow control the
consumer had). A server older than batches answers one message a request (no
``Nats-Num-Pending`` header): the loop then asks for each next one.

Failure modes, each a ``BusError`` (the caller names the object): the subject holds fewer
messages than asked (404, or the end of the subject before ``count``: the object was replaced or
deleted meanwhile, or a replica that answered has not yet stored what its leader has); a refused
request (408 and any other status, no responder: a stream without direct gets); no message for
``idle`` seconds; a message without a sequence; a batch ended with none (asked again, it would
loop). ``write`` may raise to stop the transfer: its exception propagates. The reply inbox is
unsubscribed whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import nats.errors

from protocol.errors import BusError

# What one batch may carry (the server stops once it has sent this much): 32 chunks of the
# object store's 128 KiB. Bounds what a node holds in flight and the server sends unasked.
BATCH_BYTES = 4 * 1024**2
IDLE = 15.0  # seconds without any message of a batch: the fetch fails (transient, retried)


@dataclass(frozen=True)
class Reply:
    """What one message on the reply inbox is."""

    kind: Literal["message", "end", "absent", "refused"]
    seq: int = 0  # message: its stream sequence
    batched: bool = False  # message: the server answers batches (it says what is pending)
    pending: int = 0  # end: messages of the subject after this batch
    reason: str = ""  # refused: the server's status and description


def classify(headers: Mapping[Any, str] | None) -> Reply:
    """A direct get's reply by its headers (nats-py keys a status's description by an enum)."""
    h = {str(getattr(k, "value", k)): v for k, v in (headers or {}).items()}
    status = h.get("Status", "")
    if not status:
        try:
            seq = int(h["Nats-Sequence"])
        except (KeyError, ValueError):
            return Reply("refused", reason="a message without its stream sequence")
        return Reply("message", seq=seq, batched="Nats-Num-Pending" in h)
    if status == "204":
        try:
            return Reply("end", pending=int(h.get("Nats-Num-Pending", "0")))
        except ValueError:
            return Reply("refused", reason="an end of batch without a count")
    if status == "404":
        return Reply("absent")
    described = f"{status} {h.get('Description', '')}".strip()
    if status == "503":
        described += " (no responder: does the stream allow direct gets?)"
    return Reply("refused", reason=described)


async def read_subject(
    nc: Any, stream: str, subject: str, count: int, write: Callable[[bytes], object], *,
    batch_bytes: int = BATCH_BYTES, idle: float = IDLE,
) -> None:
    """Hand the first ``count`` messages of ``subject`` in ``stream`` to ``write``, in order."""
    replies: asyncio.Queue[Any] = asyncio.Queue()
    sub = await nc.subscribe(nc.new_inbox(), cb=replies.put)
    got, seq = 0, 1
    try:
        while got < count:
            asked_at = got
            ask = {"seq": seq, "next_by_subj": subject, "batch": count - got,
                   "max_bytes": batch_bytes}
            await nc.publish(f"$JS.API.DIRECT.GET.{stream}", json.dumps(ask).encode(),
                             reply=sub.subject)
            while got < count:
                try:
                    async with asyncio.timeout(idle):
                        msg = await replies.get()
                except TimeoutError:
                    raise BusError(f"no answer from {stream} for {idle:g}s "
                                   f"({got} of {count} chunks read)") from None
                reply = classify(msg.headers)
                if reply.kind == "message":
                    write(msg.data)
                    got, seq = got + 1, reply.seq + 1
                    if not reply.batched:
                        break  # a server before batches: one message a request
                elif reply.kind == "end" and reply.pending and got > asked_at:
                    break  # the batch's bytes are sent: ask for the next
                elif reply.kind == "end" and reply.pending:
                    raise BusError("the server ended a batch without a message "
                                   f"({reply.pending} pending): asking again would loop")
                elif reply.kind in ("end", "absent"):
                    raise BusError(f"only {got} of its {count} chunks are stored (the object was "
                                   "replaced or deleted meanwhile, or a replica lags)")
                else:
                    raise BusError(f"the direct get was refused: {reply.reason}")
    finally:
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await sub.unsubscribe()
