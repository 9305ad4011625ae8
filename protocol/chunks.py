"""Replies larger than one NATS message: split by the responder, joined by the requester.

A NATS server refuses any message over its ``max_payload`` (1 MB by default). Some answers of
the coordinator's API grow with the fleet: ``nodes`` is a row per node (~12 MB at 50,000),
``status`` a row per node of the rollout. Such a reply is sent as up to ``MAX_CHUNKS`` messages
on the requester's reply subject, in order, each with the header ``Fw-Chunk: i/n/token``
(1-based; the token names this one reply); a reply that fits is one message with no header, as
before (``nats req`` still reads it).

NATS delivers one publisher's messages to one subscriber in the order sent, so the requester
joins each reply's chunks as they come. Every coordinator answers a reading verb
(``coordinator.runtime.daemon``): ``Assembly`` joins every reply it hears, by token, and the
first one complete wins, so one coordinator that stops half-way (it died, it froze) cannot
swallow another's whole answer. A reply whose chunk i does not follow its chunk i-1 is dropped,
never joined wrong; one whose next chunk does not come (its responder stopped, or a server whose
permissions allow one response: ``allow_responses`` written by an older fleetwave) is a reply
cut short. Pure: ``Bus.serve``/``Bus.respond`` split, ``Bus.request`` joins.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

from protocol.errors import ProtocolError

HEADER = "Fw-Chunk"
MAX_CHUNKS = 256  # at the default 1 MB max_payload, a reply of up to ~255 MB
ROOM = 4096  # what a message's subject and headers may take of max_payload


def limit(max_payload: int) -> int:
    """The most reply bytes one message carries on a server taking ``max_payload`` (0:
    unknown, which means no limit: the reply goes whole); never the whole of a small one."""
    if max_payload <= 0:
        return 0
    return max_payload - ROOM if max_payload > 2 * ROOM else max(1, max_payload // 2)


def split(data: bytes, most: int) -> Iterator[tuple[bytes, dict[str, str] | None]]:
    """``data`` as messages of at most ``most`` bytes each (0: one message), with their
    headers; a single message has none. Each message's bytes are cut as it is taken (an answer
    is not held twice). Raises ValueError past ``MAX_CHUNKS``, before any message."""
    if most <= 0 or len(data) <= most:
        return iter([(data, None)])
    n = -(-len(data) // most)
    if n > MAX_CHUNKS:
        raise ValueError(f"a reply of {len(data)} bytes needs {n} messages of {most} bytes, "
                         f"more than {MAX_CHUNKS}")
    token = secrets.token_hex(6)
    view = memoryview(data)
    return ((bytes(view[i * most:(i + 1) * most]), {HEADER: f"{i + 1}/{n}/{token}"})
            for i in range(n))


def carried(max_payload: int) -> int:
    """The largest reply a server taking ``max_payload`` carries (0: no bound known)."""
    return limit(max_payload) * MAX_CHUNKS


class Assembly:
    """The replies to one request, each joined from its chunks as they arrive; the first one
    complete is the answer."""

    def __init__(self) -> None:
        self._parts: dict[str, list[bytes]] = {}  # token -> the chunks of that reply so far
        self._totals: dict[str, int] = {}
        self._broken: set[str] = set()  # replies that came out of order: never joined
        self.problem = ""  # why the last reply dropped was (for the error a timeout raises)

    @property
    def received(self) -> int:
        """Chunks taken of the reply furthest along."""
        return max((len(p) for p in self._parts.values()), default=0)

    @property
    def total(self) -> int:
        """Chunks the reply furthest along has in all (0: none started)."""
        best = max(self._parts, key=lambda t: len(self._parts[t]), default="")
        return self._totals.get(best, 0)

    def add(self, data: bytes, headers: dict[str, str] | None) -> tuple[bytes | None, bool]:
        """Take one message: (the whole answer once a reply is complete, else None; whether a
        reply moved forward). ProtocolError on a malformed header."""
        raw = (headers or {}).get(HEADER)
        if raw is None:
            return data, True  # a whole reply in one message
        index, total, token = _parse(raw)
        if token in self._broken:
            return None, False
        parts = self._parts.setdefault(token, [])
        if total != self._totals.setdefault(token, total) or index != len(parts) + 1:
            self._broken.add(token)
            del self._parts[token]
            self.problem = (f"a reply's chunk {index}/{total} came after its chunk "
                            f"{len(parts)}")
            return None, False
        parts.append(data)
        if index < total:
            return None, True
        return b"".join(self._parts.pop(token)), True


def _parse(raw: str) -> tuple[int, int, str]:
    index, total, token = [*raw.split("/"), "", ""][:3]
    if not (index.isdigit() and total.isdigit() and token) or raw.count("/") != 2:
        raise ProtocolError(f"malformed {HEADER} header {raw[:60]!r} (expected i/n/token)")
    i, n = int(index), int(total)
    if not 1 <= i <= n <= MAX_CHUNKS:
        raise ProtocolError(f"{HEADER} header {raw[:60]!r} is out of range (1 <= i <= n <= "
                            f"{MAX_CHUNKS})")
    return i, n, token
