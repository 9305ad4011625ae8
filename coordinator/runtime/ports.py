"""What the runtime needs of the bus: ``protocol.bus.Bus`` fits it, and so does the fake of
``protocol.testing`` that unit tests run on."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from typing import Protocol

from protocol.bus import Entry
from protocol.errors import BusError


class RunnerBus(Protocol):
    """The KV and JetStream calls of the runner, its store and its publisher."""

    fleet: str
    reconnected_at: float | None  # the wall clock at the client's last reconnect; None: never

    @property
    def max_payload(self) -> int: ...  # the largest message the server takes; 0: unknown

    @property
    def connected(self) -> bool: ...

    @property
    def fenced_in_flight(self) -> int: ...  # fenced batches of a bucket awaiting acks at once

    async def kv_get(self, bucket: str, key: str) -> Entry | None: ...
    async def kv_put(self, bucket: str, key: str, value: bytes) -> int: ...
    async def kv_create(self, bucket: str, key: str, value: bytes) -> int: ...
    async def kv_update(self, bucket: str, key: str, value: bytes, last: int) -> int: ...
    async def kv_delete(self, bucket: str, key: str, last: int | None = None) -> None: ...
    async def kv_entries(self, bucket: str, pattern: str = ">") -> list[Entry]: ...
    async def kv_history(self, bucket: str, key: str) -> list[Entry]: ...
    async def kv_purge_keys(self, bucket: str, pattern: str) -> None: ...
    def watch(self, bucket: str, pattern: str, *, verify: float | None = None,
              on_missing: Callable[[], Awaitable[None]] | None = None,
              ) -> AsyncIterator[Entry | None]: ...
    async def ensure_observed(self) -> None: ...
    def kv_scan(self, bucket: str, pattern: str = ">", *,
                page: int = ...) -> AsyncIterator[list[Entry]]: ...
    async def kv_update_all(
        self, bucket: str, writes: Sequence[tuple[str, bytes, int]], *, timeout: float = ...,
    ) -> list[int | BusError]: ...
    async def kv_fenced_all(
        self, bucket: str, writes: Sequence[tuple[str, bytes | None]], fence: int, *,
        timeout: float = ..., rollup: Collection[str] = ..., atomic: bool = ...,
    ) -> list[int | BusError]: ...
    async def js_publish_events(
        self, messages: Sequence[tuple[str, bytes]], *, timeout: float = ...,
    ) -> list[BusError | None]: ...
