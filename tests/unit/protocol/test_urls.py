"""protocol.urls: a NATS server URL nats-py could not use is refused in one line, before any
connect; what nats-py takes passes unchanged."""

from __future__ import annotations

import pytest

from protocol.errors import ProtocolError
from protocol.urls import check_servers


@pytest.mark.parametrize(("text", "why"), [
    pytest.param("bogus", "has no scheme and no port", id="bare-word"),
    pytest.param("nats://127.0.0.1:99999", "Port out of range", id="port-past-65535"),
    pytest.param("nats://127.0.0.1:0", "port 0", id="port-0"),
    pytest.param("http://x", "the scheme must be one of nats://", id="http"),
    pytest.param("nats://[::1", "Invalid IPv6 URL", id="open-bracket"),
    pytest.param("", "is empty", id="empty"),
    pytest.param(" , ", "is empty", id="only-commas"),
    pytest.param("nats://h:abc", "could not be cast to integer", id="port-not-a-number"),
    pytest.param("nats://:4222", "names no host", id="no-host"),
    pytest.param("nats://a:4222,nats://b:99999", "'nats://b:99999'", id="second-of-a-list"),
    pytest.param("ws://a:80,nats://b:4222", "mixes websocket", id="mixed-kinds"),
])
def test_a_bad_url_is_one_line_naming_it(text: str, why: str) -> None:
    """What is wrong, the value given, and an example, on one line."""
    with pytest.raises(ProtocolError) as info:
        check_servers(text)
    message = str(info.value)
    assert message.startswith("--nats ") and why in message and "\n" not in message
    assert "e.g. nats://127.0.0.1:4222" in message or "one kind" in message


def test_a_password_is_not_repeated() -> None:
    """A bad URL with credentials is shown with them hidden."""
    with pytest.raises(ProtocolError) as info:
        check_servers("nats://node:secret@h:99999")
    assert "secret" not in str(info.value) and "nats://***@h:99999" in str(info.value)


def test_a_long_value_is_cut() -> None:
    """A very long bad value is cut in the message."""
    with pytest.raises(ProtocolError) as info:
        check_servers("x" * 5000)
    assert len(str(info.value)) < 300


@pytest.mark.parametrize(("text", "servers"), [
    ("nats://127.0.0.1:4222", ["nats://127.0.0.1:4222"]),
    ("127.0.0.1:4222", ["127.0.0.1:4222"]),
    ("tls://nats.example.com", ["tls://nats.example.com"]),
    ("nats://u:p@[::1]:4222", ["nats://u:p@[::1]:4222"]),
    ("wss://a,ws://b:8080", ["wss://a", "ws://b:8080"]),
    (" nats://a:1 , nats://b:2 ,", ["nats://a:1", "nats://b:2"]),
])
def test_what_nats_py_takes_passes(text: str, servers: list[str]) -> None:
    """Each scheme nats-py connects with, a port-only address, a cluster list."""
    assert check_servers(text) == servers
