"""``Bus.observer``: the one seam where the coordinator's bus latency is measured; told of each
timed call with its duration and whether it failed, and never in the call's way."""

from __future__ import annotations

from typing import Any

import pytest

from protocol.bus import Bus
from protocol.errors import NotReachable


class Client:
    """A stand-in for nats-py's client: requests (an inbox subscribed, a publish, the answer
    read off the inbox) answer ``reply`` or raise ``error``."""

    def __init__(self, reply: bytes = b"ok", error: BaseException | None = None) -> None:
        self.reply, self.error = reply, error

    def jetstream(self, timeout: float) -> Any:
        return None

    def new_inbox(self) -> str:
        return "_INBOX.test"

    async def publish(self, subject: str, data: bytes, reply: str = "") -> None:
        pass

    async def subscribe(self, subject: str, **_: Any) -> Any:
        client = self

        class Msg:
            data, headers = client.reply, None

        class Sub:
            async def next_msg(self, timeout: float) -> Any:
                if client.error is not None:
                    raise client.error
                return Msg()

            async def unsubscribe(self) -> None:
                pass

        sub = Sub()
        sub.subject = subject  # type: ignore[attr-defined]
        return sub


async def test_each_call_is_told_with_its_op_and_outcome() -> None:
    """A request that answers and one that times out: two observations, the second failed;
    the caller still gets the answer and the error it would without an observer."""
    seen: list[tuple[str, float, bool]] = []
    bus = Bus(Client(), "f")  # type: ignore[arg-type]
    bus.observer = lambda op, seconds, failed: seen.append((op, seconds, failed))
    assert await bus.request("s", b"") == b"ok"
    bus.nc = Client(error=TimeoutError())  # type: ignore[assignment]
    with pytest.raises(NotReachable):
        await bus.request("s", b"", timeout=0.1)
    assert [(op, failed) for op, _, failed in seen] == [("request", False), ("request", True)]
    assert all(seconds >= 0 for _, seconds, _ in seen)


async def test_a_failing_observer_never_fails_the_call(caplog: pytest.LogCaptureFixture) -> None:
    """An observer that raises is logged; the call's own answer stands."""
    def broken(op: str, seconds: float, failed: bool) -> None:
        raise RuntimeError("metrics bug")

    bus = Bus(Client(), "f")  # type: ignore[arg-type]
    bus.observer = broken
    assert await bus.request("s", b"") == b"ok"
    assert "bus observer failed" in caplog.text


async def test_without_an_observer_nothing_is_timed() -> None:
    """The agent's bus has none: calls go straight through."""
    bus = Bus(Client(), "f")  # type: ignore[arg-type]
    assert bus.observer is None
    assert await bus.request("s", b"") == b"ok"


async def test_a_refused_subscription_says_what_to_do(caplog: pytest.LogCaptureFixture) -> None:
    """The server's asynchronous permissions violation for a subscription (a node whose
    users.conf predates the heartbeat pace, as measured on a secure dev fleet): one line naming
    the subscription and 'fleetwave auth prune'; any other asynchronous error as before."""
    import nats.errors

    bus = Bus(Client(), "f")  # type: ignore[arg-type]
    with caplog.at_level("WARNING", logger="fleetwave.bus"):
        bus._async_error(nats.errors.Error(
            'nats: permissions violation for subscription to "fw.default.pace"'))
        bus._async_error(nats.errors.NoRespondersError())
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2, said
    assert '"fw.default.pace"' in said[0] and "fleetwave auth prune DIR" in said[0], said
    assert said[1].startswith("NATS client error (asynchronous): NoRespondersError"), said


async def test_a_server_gone_mid_read_is_no_warning_of_its_own(
        caplog: pytest.LogCaptureFixture) -> None:
    """UnexpectedEOF (the server went away mid-read: every restart) and a stale connection come
    with the disconnect, which the "lost the connection" line says: at debug level, not a second
    warning for the same event."""
    import nats.errors

    bus = Bus(Client(), "f")  # type: ignore[arg-type]
    with caplog.at_level("WARNING", logger="fleetwave.bus"):
        bus._async_error(nats.errors.UnexpectedEOF())
        bus._async_error(nats.errors.StaleConnectionError())
    assert [r.getMessage() for r in caplog.records] == []
