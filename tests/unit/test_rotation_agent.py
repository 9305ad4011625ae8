"""Signing-key rotation at the agent: a re-signature of the state it runs is taken without a
move, also after a restart that no longer trusts the old key; never by an agent that does not
trust the new key, and never with other content."""

from __future__ import annotations

from pathlib import Path

import msgspec

from agent.host.state import AgentState, ServiceRecord, save_state
from protocol.codec import decode, encode
from protocol.messages import DesiredState
from protocol.signing import generate_seed, public_key, resign, sign
from tests.unit.agent.manager.test_desired import NODE, SERVICE, _env, _manager

OLD_SEED, NEW_SEED = generate_seed(), generate_seed()
OLD, NEW = public_key(OLD_SEED), public_key(NEW_SEED)
KEY = f"{NODE}.{SERVICE}"


async def test_an_agent_trusting_both_keys_takes_the_resignature_as_the_same_state(
    tmp_path: Path,
) -> None:
    """Running generation 7 under the old key, the new key's re-signature is accepted: the same
    desired state, now held with the new envelope; offered again it is a no-op."""
    mgr = _manager(tmp_path, [OLD, NEW])
    running = _env(OLD_SEED, 7, term=3)
    await mgr.desired.offer(KEY, encode(running))
    before = mgr.services[SERVICE].desired
    again = resign(NEW_SEED, running, term=4)
    await mgr.desired.offer(KEY, encode(again))
    await mgr.desired.offer(KEY, encode(again))
    svc = mgr.services[SERVICE]
    assert svc.desired == before and svc.envelope == again and mgr.desired.refused == 0


async def test_a_restarted_agent_trusting_only_the_new_key_takes_the_resignature(
    tmp_path: Path,
) -> None:
    """Restarted trusting only the new key before the re-signing, the agent holds no desired
    state (the remembered one is refused) and acts on nothing; the re-signature of the state it
    remembers brings it back; another state of that generation is still a replay."""
    running = _env(OLD_SEED, 7, term=3)
    mgr = _manager(tmp_path, [NEW])
    save_state(mgr.restorer.state_path, AgentState(services={
        SERVICE: ServiceRecord(service=SERVICE, envelope=running, generation=7)}))
    await mgr.restorer.restore(lambda *_: None)
    assert mgr.services[SERVICE].desired is None
    await mgr.desired.offer(KEY, encode(running))  # the old key's: refused, once
    assert mgr.desired.refused == 1
    state = decode(DesiredState, running.payload)
    other = sign(NEW_SEED, msgspec.structs.replace(state, weights={"a": 100}), term=4)
    await mgr.desired.offer(KEY, encode(other))
    assert mgr.services[SERVICE].desired is None and mgr.desired.refused == 2
    await mgr.desired.offer(KEY, encode(resign(NEW_SEED, running, term=4)))
    assert mgr.services[SERVICE].desired == state


async def test_an_agent_that_does_not_trust_the_new_key_refuses_it_and_keeps_running(
    tmp_path: Path,
) -> None:
    """An agent left on the old key refuses the re-signature (one event) and keeps its state."""
    mgr = _manager(tmp_path, [OLD])
    running = _env(OLD_SEED, 7, term=3)
    await mgr.desired.offer(KEY, encode(running))
    await mgr.desired.offer(KEY, encode(resign(NEW_SEED, running, term=4)))
    assert mgr.services[SERVICE].envelope == running and mgr.desired.refused == 1

