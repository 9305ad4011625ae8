"""``fleetwave events``: ``-o json`` is JSON Lines (one event per line), and says so in its help
and in the README; a fleet without an events stream (a wrong --fleet, or no coordinator ever ran)
is one line saying what to check, not the server's error."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

import coordinator.cli.client as client
from coordinator.cli import main
from protocol import subjects
from protocol.codec import encode
from protocol.errors import BusError
from protocol.messages import Event

README = Path(__file__).parents[4] / "README.md"
# What ``protocol.bus.Bus.stream_records`` raises when the stream does not exist (nats-server
# 2.10-2.12, through nats-py).
NO_STREAM = ("cannot read stream FW_typo_EVENTS: nats: NotFoundError: code=404 err_code=10059 "
             "description='stream not found'")


class StreamBus:
    """A connection whose events stream holds ``held`` (fleet "typo"), or raises ``error``."""

    def __init__(self, held: list[Event], error: BusError | None) -> None:
        self.held, self.error = held, error

    async def stream_records(self, stream: str, subject: str, *, follow: bool = False,
                             last: int | None = None,
                             caught_up: Callable[[], None] | None = None,
                             ) -> AsyncIterator[tuple[str, bytes]]:
        assert stream == subjects.events_stream("typo")
        if self.error is not None:
            raise self.error
        for event in self.held:
            yield subjects.event("typo", event.kind), encode(event)
        if caught_up is not None:
            caught_up()


def stream(monkeypatch: pytest.MonkeyPatch, held: list[Event],
           error: BusError | None = None) -> None:
    @contextlib.asynccontextmanager
    async def connected(ctx: object, **kw: object) -> AsyncIterator[StreamBus]:
        yield StreamBus(held, error)

    monkeypatch.setattr(client, "connected", connected)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(["--fleet", "typo", *args])
    out, err = capsys.readouterr()
    assert isinstance(info.value.code, int)
    return info.value.code, out, err


def event(i: int) -> Event:
    return Event(id=f"e{i}", time=float(i), fleet="typo", kind="rollout.started",
                 message=f"m{i}", service="hello", rollout="hello-r1")


def test_json_is_one_event_per_line(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """-o json prints each event as one JSON object on its own line, as scripts read it."""
    stream(monkeypatch, [event(1), event(2), event(3)])
    code, out, _ = run(capsys, "events", "-o", "json", "--last", "2")
    lines = out.splitlines()
    assert code == 0 and [json.loads(line)["id"] for line in lines] == ["e2", "e3"]


def test_json_lines_are_documented_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    """``events --help`` says that -o json is JSON Lines, one event per line."""
    code, out, _ = run(capsys, "events", "--help")
    flat = " ".join(out.split())
    assert code == 0 and "-o json prints JSON Lines: one event per line" in flat, out


def test_json_lines_are_documented_in_the_readme() -> None:
    """The README's CLI table, where it lists ``events``, says -o json is JSON Lines."""
    cli = README.read_text().split("\n## CLI\n", 1)[1].split("\n## ", 1)[0]
    (events_row,) = [line for line in cli.splitlines() if re.search(r"`events \[", line)]
    assert "`events -o json` prints JSON Lines, one event" in events_row, events_row


def test_a_fleet_without_an_events_stream_is_one_line(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """No events stream: one line naming the fleet, what to check and how to start a
    coordinator; exit 1; not nats' NotFoundError."""
    stream(monkeypatch, [], BusError(NO_STREAM))
    code, out, err = run(capsys, "events")
    assert (code, out) == (1, "")
    assert err == ("fleetwave: fleet 'typo' has no events yet (no events stream): check "
                   "--fleet, or start a coordinator ('fleetwave coordinator')\n")


def test_other_stream_errors_are_said_as_they_are(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream that exists but cannot be read is not "no events yet": the bus's own line."""
    said = ("reading stream FW_typo_EVENTS stopped at message 3 of 9: the server sent nothing "
            "for 10s; try again")
    stream(monkeypatch, [], BusError(said))
    code, _, err = run(capsys, "events", "--follow")
    assert code == 1 and err == f"fleetwave: {said}\n"
