"""protocol.bus's first-connect grace: an unknown key is retried for a bounded time (said
once), and nothing else is: a TLS refusal or the end of the grace is final."""

from __future__ import annotations

import logging

import pytest

from protocol.bus import _Grace
from protocol.creds import Creds

NODE = Creds(fleet="default", role="node", name="node-4", seed="SU" + "A" * 56)
UNKNOWN = Exception("nats: 'Authorization Violation'")


def test_an_unknown_key_is_retried_until_the_grace_ends(caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    """Within the grace an authorization violation waits (one warning naming the node);
    at its end it no longer does."""
    grace = _Grace(until=130.0, seconds=30.0, where="nats://b:4222", creds=NODE)
    with caplog.at_level(logging.WARNING):
        assert grace.waits(UNKNOWN, 100.0) and grace.waits(UNKNOWN, 129.9)
    assert not grace.waits(UNKNOWN, 130.0)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "node 'node-4' key" in said[0] and "30s" in said[0]


def test_other_refusals_and_no_grace_are_final() -> None:
    """A certificate refusal never waits, and a grace of 0 (the default) waits for nothing."""
    grace = _Grace(until=130.0, seconds=30.0, where="nats://b:4222", creds=NODE)
    assert not grace.waits(Exception("certificate verify failed"), 100.0)
    assert not _Grace(until=100.0, seconds=0.0, where="x", creds=None).waits(UNKNOWN, 100.0)
