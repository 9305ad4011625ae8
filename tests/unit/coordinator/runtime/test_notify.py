"""The notifier's deliveries: retried with backoff on the answers worth it, signed, each
attempt logged, given up after the last; without sockets (a fake POST and a fake sleep)."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import msgspec
import pytest

from coordinator.runtime import notify_doc as doc
from coordinator.runtime.notify import Notifier, post
from protocol.codec import encode
from protocol.messages import Event, ReleaseRef, RolloutRecord, RolloutSpec

EVENT = Event(id="ab" * 16, time=1000.0, fleet="prod", kind="gate.failed",
              message="wave 1: error rate 0.2", service="hello", rollout="r-1",
              data={"wave": 1, "error_rate": 0.2}, who="coordinator")
FACTS = doc.Facts(from_version="1", to_version="2", strategy="canary")


class Receiver:
    """Answers each POST with the next of ``answers`` (an int status, or an exception)."""

    def __init__(self, *answers: int | BaseException) -> None:
        self.answers = list(answers)
        self.posts: list[tuple[str, bytes, dict[str, str]]] = []

    async def __call__(self, url: str, body: bytes, headers: dict[str, str],
                       timeout: float) -> int:
        self.posts.append((url, body, headers))
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


def notifier(receiver: Receiver, slept: list[float], secret: bytes | None = None) -> Notifier:
    async def sleep(seconds: float) -> None:
        slept.append(seconds)
    return Notifier([], secret=secret, post=receiver, sleep=sleep, clock=lambda: 1000.0)


async def test_500_then_200_is_retried_with_backoff(caplog: pytest.LogCaptureFixture) -> None:
    """Two 500s and a refused connection are retried after 1, 2 and 4 s; the 200 delivers;
    every attempt is a log line naming the target without its query."""
    receiver, slept = Receiver(500, 503, ConnectionRefusedError(111, "refused"), 200), list[float]()
    target = doc.parse_target("http://127.0.0.1:9/hook?token=SECRET")
    with caplog.at_level(logging.INFO, "fleetwave.notify"):
        assert await notifier(receiver, slept).deliver(target, EVENT, FACTS)
    assert slept == [1.0, 2.0, 4.0]
    assert len(receiver.posts) == 4
    lines = [r.getMessage() for r in caplog.records]
    assert [f"attempt {n}/6" in line for n, line in enumerate(lines, 1)] == [True] * 4
    assert "HTTP 500" in lines[0] and "cannot connect" in lines[2] and "delivered" in lines[3]
    assert all("SECRET" not in line and "127.0.0.1:9/hook" in line for line in lines)


async def test_a_refusal_is_not_retried(caplog: pytest.LogCaptureFixture) -> None:
    """A 404 is the receiver's final answer: one attempt, an error line, given up."""
    receiver, slept = Receiver(404), list[float]()
    with caplog.at_level(logging.INFO, "fleetwave.notify"):
        assert not await notifier(receiver, slept).deliver(
            doc.parse_target("http://127.0.0.1:9/"), EVENT, FACTS)
    assert slept == []
    assert "NOT delivered" in caplog.records[-1].getMessage()


async def test_gives_up_after_the_last_attempt() -> None:
    """A receiver that never answers gets six attempts, then the delivery is given up."""
    receiver, slept = Receiver(*[TimeoutError()] * 6), list[float]()
    assert not await notifier(receiver, slept).deliver(
        doc.parse_target("http://127.0.0.1:9/"), EVENT, FACTS)
    assert len(receiver.posts) == doc.ATTEMPTS
    assert slept == [1.0, 2.0, 4.0, 8.0, 16.0]


async def test_the_document_is_signed_and_named() -> None:
    """With a secret each POST carries a signature that verifies, and the event's id."""
    receiver, slept = Receiver(200), list[float]()
    await notifier(receiver, slept, secret=b"k").deliver(
        doc.parse_target("http://127.0.0.1:9/"), EVENT, FACTS)
    [(_, body, headers)] = receiver.posts
    assert doc.verify(b"k", body, headers, now=1000.0)
    assert headers["X-Fleetwave-Event"] == EVENT.id
    sent = json.loads(body)
    assert (sent["what"], sent["to_version"], sent["figures"]) == (
        "gate_failed", "2", {"error_rate": 0.2})


async def test_slack_targets_get_slacks_format() -> None:
    """A slack+https target is POSTed Slack's JSON at the https URL behind it."""
    receiver, slept = Receiver(200), list[float]()
    await notifier(receiver, slept).deliver(
        doc.parse_target("slack+https://hooks.slack.com/services/T/B/X"), EVENT, FACTS)
    [(url, body, _)] = receiver.posts
    assert url == "https://hooks.slack.com/services/T/B/X"
    assert "gate failed" in json.loads(body)["text"]


class Pulled:
    """One message of a durable consumer, remembering what was done with it."""

    def __init__(self, event: Event | bytes) -> None:
        self.subject = f"fw.prod.evt.{event.kind if isinstance(event, Event) else 'x'}"
        self.data = encode(event) if isinstance(event, Event) else event
        self.done: list[str] = []

    async def ack(self) -> None:
        self.done.append("ack")

    async def nak(self) -> None:
        self.done.append("nak")

    async def working(self) -> None:
        self.done.append("working")


class Store:
    """The rollout records a notifier reads versions from."""

    fleet = "prod"

    def __init__(self) -> None:
        self.loads = 0

    async def load(self, rollout_id: str) -> RolloutRecord | None:
        self.loads += 1
        spec = RolloutSpec(service="hello", version="2", strategy="canary")
        return RolloutRecord(id=rollout_id, spec=spec, from_version="1",
                             release=ReleaseRef(service="hello", version="2", digest="d", size=1))


TARGET = doc.parse_target("http://127.0.0.1:9/")


async def test_each_event_is_acknowledged_after_its_delivery() -> None:
    """A notable event is POSTed once, with the record's versions, then acknowledged; the
    record is read once per rollout."""
    receiver, store = Receiver(200, 200), Store()
    n = notifier(receiver, [])
    for _ in range(2):
        pulled = Pulled(EVENT)
        await n._handle(store, TARGET, pulled)  # type: ignore[arg-type]
        assert pulled.done == ["ack"]
    assert len(receiver.posts) == 2 and store.loads == 1
    assert json.loads(receiver.posts[0][1])["from_version"] == "1"


@pytest.mark.parametrize("data", [
    msgspec.structs.replace(EVENT, kind="node.updating"), b"not an event",
])
async def test_other_and_malformed_events_are_acknowledged_unsent(data: Event | bytes) -> None:
    """Events no one is told of, and bytes that are no event, are acknowledged and not sent."""
    receiver, pulled = Receiver(), Pulled(data)
    await notifier(receiver, [])._handle(Store(), TARGET, pulled)  # type: ignore[arg-type]
    assert pulled.done == ["ack"] and receiver.posts == []


async def test_a_failure_of_ours_skips_the_event_instead_of_looping() -> None:
    """An error inside a delivery is logged and the event acknowledged: a poison event is not
    handed back forever."""
    receiver, pulled = Receiver(RuntimeError("bug")), Pulled(EVENT)
    await notifier(receiver, [])._handle(Store(), TARGET, pulled)  # type: ignore[arg-type]
    assert pulled.done == ["ack"]


async def test_an_event_cut_off_mid_delivery_is_handed_back() -> None:
    """Cancelled mid-delivery (the leadership ended), the event is given back at once (nak),
    not acknowledged."""
    pulled, posting = Pulled(EVENT), asyncio.Event()

    async def hang(url: str, body: bytes, headers: dict[str, str], timeout: float) -> int:
        posting.set()
        await asyncio.Event().wait()
        return 200
    n = Notifier([], post=hang)
    task = asyncio.create_task(n._handle(Store(), TARGET, pulled))  # type: ignore[arg-type]
    await posting.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pulled.done == ["nak"]


async def test_a_tls_receiver_that_answers_and_holds_the_connection_is_delivered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over TLS, closing waits for the peer's close_notify; a receiver that answered 200 and
    then held the connection had its answer thrown away as "no answer" (the close ran inside
    the answer's timeout: six POSTs, six 200s, NOT delivered, in the review's run)."""
    import datetime as dt
    import socket
    import ssl
    import threading

    from coordinator.auth import pki

    now = dt.datetime.now(dt.UTC)
    ca = pki.make_ca("test", now)
    server = pki.make_server(ca, pki.server_names(("localhost",)), now)
    (tmp_path / "ca.pem").write_bytes(ca.cert)
    (tmp_path / "s.pem").write_bytes(server.cert)
    (tmp_path / "s-key.pem").write_bytes(server.key)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "s.pem", tmp_path / "s-key.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    done = threading.Event()

    def answer_and_hold() -> None:  # a blocking receiver: it reads nothing after answering
        conn, _ = listener.accept()
        with ctx.wrap_socket(conn, server_side=True) as tls:
            data = b""
            while b"\r\n\r\n" not in data:
                data += tls.recv(65536)
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            done.wait(10)  # held until the test ends

    receiver = threading.Thread(target=answer_and_hold, daemon=True)
    receiver.start()
    try:
        status = await asyncio.wait_for(
            post(f"https://localhost:{port}/hook", b"{}", {}, 2.0), 10)
    finally:
        done.set()
        receiver.join(10)
        listener.close()
    assert status == 200
