"""Review finding: ``fleetwave-agent --trust-key`` must refuse text that is no coordinator key."""

from __future__ import annotations

import click
import pytest

from agent.main import agent_command
from protocol.errors import ProtocolError
from protocol.signing import check_public_key, generate_seed, public_key


def _parse(*args: str) -> click.Context:
    return agent_command.make_context("fleetwave-agent", ["--node-id", "n1", *args])


def test_a_coordinator_public_key_is_accepted() -> None:
    """The key a coordinator prints is accepted as it is, also with stray spaces."""
    key = public_key(generate_seed())
    assert check_public_key(f" {key} ") == key
    assert _parse("--trust-key", key).params["trust_keys"] == (key,)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        pytest.param("bogus", "not an nkeys", id="garbage"),
        pytest.param("", "empty", id="empty"),
        pytest.param("seed", "seed", id="a-seed"),
        pytest.param("user", "not a coordinator", id="a-user-key"),
        pytest.param("typo", "checksum", id="one-character-off"),
    ],
)
def test_anything_else_is_refused_at_start(text: str, why: str) -> None:
    """A typo, a seed or another kind of nkey is a usage error naming the flag, not an agent that
    silently refuses every desired state."""
    import nkeys

    seed = generate_seed()
    key = public_key(seed)
    text = {
        "seed": seed.decode(),
        "user": nkeys.from_seed(nkeys.encode_seed(b"\1" * 32, nkeys.PREFIX_BYTE_USER))
        .public_key.decode(),
        "typo": key[:-2] + ("A" if key[-2] != "A" else "B") + key[-1],
    }.get(text, text)
    with pytest.raises(ProtocolError, match=why):
        check_public_key(text)
    with pytest.raises(click.BadParameter, match=why) as info:
        _parse("--trust-key", text)
    assert info.value.param is not None and info.value.param.name == "trust_keys"
