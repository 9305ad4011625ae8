"""The readiness path: which requests ask it, and what it answers (pure)."""

from __future__ import annotations

import pytest

from agent.router.health import READY_PATH, is_ready_probe, ready_response
from agent.router.http11 import parse_request


@pytest.mark.parametrize(
    ("name", "head", "probe"),
    [
        ("GET", f"GET {READY_PATH} HTTP/1.1\r\nHost: x\r\n\r\n", True),
        ("HEAD", f"HEAD {READY_PATH} HTTP/1.1\r\nHost: x\r\n\r\n", True),
        ("query ignored", f"GET {READY_PATH}?from=lb HTTP/1.1\r\nHost: x\r\n\r\n", True),
        ("POST goes to the service", f"POST {READY_PATH} HTTP/1.1\r\nHost: x\r\n"
         "Content-Length: 1\r\n\r\n", False),
        ("a longer path", f"GET {READY_PATH}/x HTTP/1.1\r\nHost: x\r\n\r\n", False),
        ("the app's own health", "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", False),
    ],
)
def test_which_requests_ask_the_readiness_path(name: str, head: str, probe: bool) -> None:
    """Only GET or HEAD of exactly the path (any query) is the router's; the rest is the app's."""
    assert is_ready_probe(parse_request(head.encode())) is probe, name


def test_ready_and_not_ready_answers() -> None:
    """200 "ready" when there is no reason, else 503 with it; HEAD gets the head only."""
    ok = ready_response("", head_only=False, keep_alive=True)
    assert ok.startswith(b"HTTP/1.1 200 OK\r\n") and ok.endswith(b"\r\n\r\nready\n")
    assert b"Connection: close" not in ok
    down = ready_response("drained for maintenance", head_only=True, keep_alive=False)
    assert down.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"Content-Length: 24\r\n" in down and b"Connection: close\r\n" in down
    assert down.endswith(b"\r\n\r\n")
