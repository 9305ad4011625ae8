"""fleetwave-agent --nats: a malformed URL is refused when the flags are read (exit 2), as the
CLI refuses it (``protocol.urls``)."""

from __future__ import annotations

import pytest

from agent.errors import FlagError
from agent.flags import parse_flags


@pytest.mark.parametrize("url", ["bogus", "nats://127.0.0.1:99999", "http://x", "nats://[::1",
                                 "", "nats://h:abc"])
def test_a_malformed_nats_url_is_a_flag_error(url: str) -> None:
    """One line naming --nats and the value."""
    with pytest.raises(FlagError) as info:
        parse_flags(["--node-id", "n1", "--nats", url], environ={})
    assert str(info.value).startswith("Invalid value for '--nats': the URL ")
    assert "\n" not in str(info.value)


def test_the_env_var_is_checked_too() -> None:
    """FLEETWAVE_NATS gets the same check as the flag."""
    with pytest.raises(FlagError):
        parse_flags(["--node-id", "n1"], environ={"FLEETWAVE_NATS": "nats://h:0"})


def test_a_cluster_list_passes_as_written() -> None:
    """Comma-separated servers reach the agent unchanged."""
    url = "nats://127.0.0.1:4222,nats://127.0.0.1:4223"
    assert parse_flags(["--node-id", "n1", "--nats", url], environ={})["nats_url"] == url
