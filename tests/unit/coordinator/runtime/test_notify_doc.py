"""The notification document, its signature, the Slack form, the targets and the backoff."""

from __future__ import annotations

import json

import msgspec
import pytest

from coordinator.runtime import notify_doc as doc
from protocol.codec import decode
from protocol.messages import Event
from protocol.notify import Notification
from protocol.schema import wire_schema

FACTS = doc.Facts(from_version="1.0.0", to_version="2.0.0", strategy="canary")


def event(kind: str, message: str = "", **data: object) -> Event:
    return Event(id="e" * 32, time=1_800_000_000.25, fleet="prod", kind=kind, message=message,
                 service="hello", rollout="r-1", data=dict(data), who="alice")


def test_gate_failed_carries_who_versions_reason_and_figures() -> None:
    """A failed gate's document names the rollout, its versions, who and every figure."""
    n = doc.document(event("gate.failed", "wave 1: error rate 0.2 > 0.01", wave=1,
                           error_rate=0.2, p99_ratio=1.1), FACTS)
    assert (n.what, n.severity, n.kind) == ("gate_failed", "critical", "gate.failed")
    assert (n.rollout, n.service, n.fleet, n.who) == ("r-1", "hello", "prod", "alice")
    assert (n.from_version, n.to_version, n.strategy, n.wave) == ("1.0.0", "2.0.0", "canary", 1)
    assert n.figures == {"error_rate": 0.2, "p99_ratio": 1.1}
    assert n.at == "2027-01-15T08:00:00.250000Z"
    assert n.id == "e" * 32


def test_pause_says_why() -> None:
    """A pause (also one after inconclusive gates) carries its reason."""
    n = doc.document(event("rollout.paused", "paused: wave 2 gates inconclusive: 3 requests",
                           wave=2), FACTS)
    assert (n.what, n.severity) == ("paused", "warning")
    assert n.reason == "wave 2 gates inconclusive: 3 requests"


@pytest.mark.parametrize(("message", "what"), [
    ("wave 0 failed: node-1: did not converge within 30s (observed 1)", "progress_deadline"),
    ("wave 0 failed: new slot b is unhealthy during the bake", "wave_failed"),
])
def test_wave_failure_tells_a_missed_deadline_apart(message: str, what: str) -> None:
    """A wave whose nodes did not converge in time is a progress deadline."""
    n = doc.document(event("wave.failed", message, wave=0), FACTS)
    assert n.what == what
    assert n.reason == message


@pytest.mark.parametrize(("kind", "notable"), [
    ("rollout.started", True), ("gate.passed", True), ("rollout.rolled_back", True),
    ("rollout.succeeded", True), ("rollout.aborted", True), ("rollout.failed", True),
    ("gate.inconclusive", False), ("node.updating", False), ("rollout.node.offline", False),
    ("wave.baking", False), ("node.online", False),
])
def test_notable_kinds(kind: str, notable: bool) -> None:
    """People hear of rollout decisions, not of each node's progress."""
    assert doc.notable(event(kind)) is notable


def test_started_takes_the_strategy_from_its_event_when_the_record_is_gone() -> None:
    """Without the rollout's record the started event's own data still names the strategy."""
    n = doc.document(event("rollout.started", "rolling hello", strategy="rolling"), doc.Facts())
    assert n.strategy == "rolling"


def test_document_is_in_the_published_schema() -> None:
    """``fleetwave protocol schema`` lists the Notification, and a document decodes as one."""
    assert "Notification" in wire_schema()["messages"]
    n = doc.document(event("rollout.succeeded", "succeeded"), FACTS)
    assert decode(Notification, msgspec.json.encode(n)) == n


def test_signature_verifies_and_binds_the_timestamp() -> None:
    """The MAC covers timestamp and body: another body, timestamp or secret fails, and an old
    timestamp is refused as a replay."""
    body = b'{"id":"x"}'
    headers = doc.sign(b"s3cret", body, 1000)
    assert headers[doc.SIGNATURE_HEADER].startswith("sha256=")
    assert doc.verify(b"s3cret", body, headers, now=1010)
    assert not doc.verify(b"s3cret", body + b" ", headers, now=1010)
    assert not doc.verify(b"other", body, headers, now=1010)
    assert not doc.verify(b"s3cret", body, headers | {doc.TIMESTAMP_HEADER: "1001"}, now=1010)
    assert not doc.verify(b"s3cret", body, headers, now=1000 + 301)


def test_slack_message_has_text_and_fields() -> None:
    """The Slack form says service, what and versions in one line, the facts as fields."""
    n = doc.document(event("gate.failed", "wave 1: error rate", wave=1, error_rate=0.25), FACTS)
    msg = doc.slack_message(n)
    assert msg["text"].startswith(":red_circle: *hello* gate failed (1.0.0 → 2.0.0)")
    fields = [f["text"] for f in msg["blocks"][1]["fields"]]
    assert "*Who*\nalice" in fields and "*error_rate*\n0.25" in fields
    assert len(fields) <= 10  # Slack's limit per section
    json.dumps(msg)


@pytest.mark.parametrize(("url", "shown", "slack"), [
    ("http://127.0.0.1:8080/hook?token=abc", "http://127.0.0.1:8080/hook", False),
    ("https://user:pw@example.com/x", "https://example.com/x", False),
    ("slack+https://hooks.slack.com/services/T0/B0/SECRET", "slack+https://hooks.slack.com/...",
     True),
])
def test_targets_are_shown_without_secrets(url: str, shown: str, slack: bool) -> None:
    """Logs name a target without user info, query or Slack token."""
    t = doc.parse_target(url)
    assert (t.shown, t.slack) == (shown, slack)
    assert t.url == url.removeprefix("slack+")
    assert t.consumer.startswith("notify-") and t.consumer == doc.parse_target(url).consumer


@pytest.mark.parametrize("url", ["ftp://host/x", "slack+http://hooks.slack.com/x", "hooks/x",
                                 "http://", "http://host:99999/x",
                                 # found by a review: accepted, then every event a traceback,
                                 # or posted to port 80 while the logs said :0
                                 "http://hooks..example.com/x", "http://" + "a" * 64 + ".io/x",
                                 "http://host:0/x"])
def test_bad_targets_are_refused_in_one_line(url: str) -> None:
    """A URL that is not http(s) or slack+https is refused with what to give instead."""
    with pytest.raises(doc.BadTarget, match="give") as info:
        doc.parse_target(url)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("url", "secret"), [
    ("slack+http://hooks.slack.com/services/T0/B0/SLACKTOKEN", "SLACKTOKEN"),
    ("slack+https://hooks.slack.com:99999/services/T0/B0/SLACKTOKEN", "SLACKTOKEN"),
    ("https://bob:s3cr?et@hooks.example.com/x", "s3cr"),
    ("https://bob:pa/ss@hooks.example.com/x", "pa"),
])
def test_a_refused_target_does_not_show_its_secrets(url: str, secret: str) -> None:
    """The error names the scheme and host only: a Slack URL's path is its token, userinfo and
    query may hold passwords (the review saw them in the message, urlsplit quoting them)."""
    with pytest.raises(doc.BadTarget) as info:
        doc.parse_target(url)
    assert secret not in str(info.value), info.value


def test_slack_text_is_escaped_and_cut_to_slacks_limits() -> None:
    """A service's log line in a reason (an agent's failure) can say <!channel> or carry a
    disguised link: escaped as Slack asks. A reason naming forty nodes is over Slack's 3,000
    characters a section and 2,000 a field, which it refuses with a 400 (the alert lost): cut."""
    hostile = "db down <!channel> see <https://evil.example/login|runbook> & more"
    n = doc.document(event("gate.failed", hostile + " x" * 3000, wave=1, reason=hostile * 60),
                     FACTS)
    msg = doc.slack_message(n)
    head = msg["blocks"][0]["text"]["text"]
    assert "<!channel>" not in head and "&lt;!channel&gt;" in head and "&amp; more" in head
    assert len(head) <= 3000 and msg["text"] == head
    for f in msg["blocks"][1]["fields"]:
        assert len(f["text"]) <= 2000 and "<https://evil" not in f["text"], f["text"][:80]


def test_backoff_doubles_and_stays_near_a_minute() -> None:
    """1, 2, 4, 8, 16 s between the six attempts: with their timeouts about a minute."""
    delays = [doc.backoff(n) for n in range(1, doc.ATTEMPTS)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert 45 <= sum(delays) + doc.ATTEMPTS * doc.POST_TIMEOUT <= 75


@pytest.mark.parametrize(("status", "retried", "delivered"), [
    (None, True, False), (200, False, True), (204, False, True), (500, True, False),
    (503, True, False), (429, True, False), (408, True, False), (400, False, False),
    (404, False, False),
])
def test_which_answers_are_retried(status: int | None, retried: bool, delivered: bool) -> None:
    """No answer, 408, 429 and 5xx are retried; other answers are final."""
    assert doc.retried(status) is retried
    assert doc.delivered(status) is delivered


def test_a_refused_deploy_is_notable_without_a_rollout() -> None:
    """rollout.refused names no rollout (none was made) and is notified all the same, with
    who asked, the version and why; any other event without a rollout is not."""
    refused = msgspec.structs.replace(
        event("rollout.refused", "deploy of hello 2.0.0 refused: no node matches zone=x",
              verb="deploy", version="2.0.0", strategy="canary", code="usage",
              reason="no node matches zone=x"), rollout="")
    assert doc.notable(refused)
    assert not doc.notable(msgspec.structs.replace(event("rollout.paused"), rollout=""))
    n = doc.document(refused, doc.facts_of_refusal(refused))
    assert (n.what, n.severity, n.rollout, n.who) == ("refused", "warning", "", "alice")
    assert (n.to_version, n.strategy) == ("2.0.0", "canary")
    assert n.reason == "no node matches zone=x"
