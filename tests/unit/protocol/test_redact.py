"""protocol.bus.redact: credentials in a NATS URL never reach a log or a message."""

import pytest

from protocol.bus import redact


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
        ("nats://node-1:pw@h:4222", "nats://node-1:***@h:4222"),
        ("nats://t0ken@h:4222", "nats://***@h:4222"),
        ("tls://u:p%40ss@h", "tls://u:***@h"),
        ("u:pw@h:4222", "u:***@h:4222"),
        ("nats://a:1@h1:4222, nats://b:2@h2:4222", "nats://a:***@h1:4222,nats://b:***@h2:4222"),
        ("nats://h:4222/path@x", "nats://h:4222/path@x"),
        ("nats://u:p:q@h", "nats://u:***@h"),
    ],
)
def test_redact_hides_passwords_and_tokens(url: str, shown: str) -> None:
    """Passwords and tokens become ***; user names, hosts and ports stay for debugging."""
    assert redact(url) == shown
