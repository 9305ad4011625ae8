"""A stand-in coordinator for the CLI's unit tests of ``deploy`` and ``remove``: no NATS, the
one connection a followed deploy opens is a dummy, and its requests go to the test's functions."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

import coordinator.cli.client as client
from protocol.errors import NotReachable

Deploy = Callable[..., Any]  # (ctx, verb, body) -> the deploy's answer, or raises
Status = Callable[..., Awaitable[Any]]  # (ctx, verb, body, **kw) -> a status


class Bus:
    """The connection ``client.connected`` yields: it takes subscriptions (noted in ``log``)
    and hears nothing."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def subscribe(self, subject: str, handler: object) -> None:
        self.log.append(f"subscribe {subject}")


def stand_in(monkeypatch: pytest.MonkeyPatch, deploy: Deploy,
             status: Status | None = None, *, unreachable: str = "") -> list[str]:
    """``deploy`` answers the deploy request; ``status`` every other call (a followed one);
    ``unreachable``: connecting fails with NotReachable saying so. Returns what happened in
    order: connections, subscriptions and calls."""
    log: list[str] = []

    @contextlib.asynccontextmanager
    async def connected(ctx: object, **kw: object) -> AsyncIterator[Bus]:
        log.append("connect")
        if unreachable:
            raise NotReachable(unreachable)
        yield Bus(log)

    async def call(ctx: object, verb: str, body: object, **kw: object) -> Any:
        log.append(f"{verb}{' on it' if kw.get('bus') is not None else ''}")
        if verb == "deploy":
            return deploy(ctx, verb, body)
        assert status is not None, f"a {verb} call the test did not expect"
        return await status(ctx, verb, body, **kw)

    monkeypatch.setattr(client, "connected", connected)
    monkeypatch.setattr(client, "call", call)
    return log
