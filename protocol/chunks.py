"""Replies larger than one NATS message: split by the responder, joined by the requester.

A NATS server refuses any message over its ``max_payload`` (1 MB by default). Some answers of
the coordinator's API grow with the fleet: ``nodes`` is a row per node (~20 MB at 50,000),
``status`` a row per node of the rollout. Such a reply is sent as up to ``MAX_CHUNKS`` messages
on the requester's reply subject, in order, each with the header ``Fw-Chunk: i/n/token``
(1-based; the token names this one reply); a reply that fits is one message with no header, as
before (``nats req`` still reads it).

NATS delivers one publisher's messages to one subscriber in the order sent, so the requester
joins them as they come. Every coordinator answers a reading verb and the first answer wins
(``coordinator.runtime.daemon``): ``Assembly`` keeps to the token of the first chunk it takes and
drops the others' messages. A chunk that does not come (the responder died, or a server whose
permissions allow it one response: ``allow_responses`` written by an older fleetwave) is a reply
cut short, never a wrong one: chunk i is taken only after chunk i-1 of the same reply.
Pure: ``Bus.serve``/``Bus.respond`` split, ``Bus.request`` joins.
"""

from __future__ import annotations

import secrets

from protocol.errors import ProtocolError

HEADER = "Fw-Chunk"
MAX_CHUNKS = 256  # at the default 1 MB max_payload, a reply of up to ~255 MB
ROOM = 4096  # what a message's subject and headers may take of max_payload


def limit(max_payload: int) -> int:
    """The most reply bytes one message carries on a server taking ``max_payload`` (0:
    unknown, which means no limit: the reply goes whole)."""
    return max(max_payload - ROOM, 1024) if max_payload > 0 else 0


def split(data: bytes, most: int) -> list[tuple[bytes, dict[str, str] | None]]:
    """``data`` as messages of at most ``most`` bytes each (0: one message), with their
    headers; a single message has none. Raises ValueError past ``MAX_CHUNKS``."""
    if most <= 0 or len(data) <= most:
        return [(data, None)]
    n = -(-len(data) // most)
    if n > MAX_CHUNKS:
        raise ValueError(f"a reply of {len(data)} bytes needs {n} messages of {most} bytes, "
                         f"more than {MAX_CHUNKS}")
    token = secrets.token_hex(6)
    view = memoryview(data)
    return [(bytes(view[i * most:(i + 1) * most]), {HEADER: f"{i + 1}/{n}/{token}"})
            for i in range(n)]


def carried(max_payload: int) -> int:
    """The largest reply a server taking ``max_payload`` carries (0: no bound known)."""
    return limit(max_payload) * MAX_CHUNKS


class Assembly:
    """The chunks of one reply, joined as they arrive in order; another responder's messages
    (after the first chunk taken) are dropped."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.total = 0  # chunks the reply has (0: not known yet)
        self.token = ""  # the reply being joined

    @property
    def received(self) -> int:
        return len(self._parts)

    def add(self, data: bytes, headers: dict[str, str] | None) -> bytes | None:
        """Take the next message; the whole reply once it is complete, else None.
        ProtocolError on a header that is malformed, out of order or of another reply."""
        raw = (headers or {}).get(HEADER)
        if raw is None:
            return None if self.token else data  # another responder's whole answer: too late
        index, total, token = _parse(raw)
        if self.token and token != self.token:
            return None  # another responder's
        if (self.token and total != self.total) or index != len(self._parts) + 1:
            raise ProtocolError(f"reply chunk {index}/{total} came after chunk "
                                f"{len(self._parts)} of {self.total or '?'}; the reply is not "
                                "whole")
        self.token, self.total = token, total
        self._parts.append(data)
        if index < total:
            return None
        whole = b"".join(self._parts)
        self._parts = []
        return whole


def _parse(raw: str) -> tuple[int, int, str]:
    index, total, token = [*raw.split("/"), "", ""][:3]
    if not (index.isdigit() and total.isdigit() and token) or raw.count("/") != 2:
        raise ProtocolError(f"malformed {HEADER} header {raw[:60]!r} (expected i/n/token)")
    i, n = int(index), int(total)
    if not 1 <= i <= n <= MAX_CHUNKS:
        raise ProtocolError(f"{HEADER} header {raw[:60]!r} is out of range (1 <= i <= n <= "
                            f"{MAX_CHUNKS})")
    return i, n, token
