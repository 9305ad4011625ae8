"""Signing-key rotation, the pure parts: re-signatures, the trust check, leading, re-sign plans."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from coordinator.core.rotation import (
    MAX_RETIRED,
    lead_refusal,
    plan_resign,
    retired_after,
    signed_by_others,
    status,
    trusting,
    untrusting,
)
from coordinator.runtime.lease import Deposed, Fence, Fenced, write_fences
from coordinator.runtime.rotation import resign_desired
from protocol import subjects
from protocol.codec import decode, encode
from protocol.errors import ProtocolError
from protocol.messages import DesiredState, FenceMarker, NodeInfo, SignedEnvelope
from protocol.signing import generate_seed, public_key, resign, resigns, sign, verify
from protocol.testing import FLEET, FakeBus, desired

OLD_SEED, NEW_SEED, EVIL_SEED = generate_seed(), generate_seed(), generate_seed()
OLD, NEW, EVIL = public_key(OLD_SEED), public_key(NEW_SEED), public_key(EVIL_SEED)
DESIRED = subjects.desired_bucket(FLEET)


def env_of(seed: bytes, node: str = "node-1", generation: int = 7, term: int = 3) -> SignedEnvelope:
    return sign(seed, desired(node, generation=generation), term=term)


def accept(env: SignedEnvelope, running: SignedEnvelope | None, *, keys: set[str],
           min_generation: int = 7, min_term: int = 3) -> DesiredState:
    return verify(env, keys, fleet=FLEET, node="node-1", service="hello",
                  min_generation=min_generation, min_term=min_term, running=running)


# -- re-signatures (protocol.signing) --------------------------------------------------------------


def test_a_resignature_keeps_generation_and_payload_bytes() -> None:
    """``resign`` changes only key, term and signature: the payload bytes are the very same."""
    old = env_of(OLD_SEED)
    new = resign(NEW_SEED, old, term=4)
    assert (new.key, new.term, new.generation) == (NEW, 4, old.generation)
    assert bytes(new.payload) == bytes(old.payload) and new.sig != old.sig
    assert resigns(new, old)


def test_an_agent_trusting_both_keys_accepts_the_resignature_of_what_it_runs() -> None:
    """The same generation is accepted when it is the running state signed by a trusted key."""
    old = env_of(OLD_SEED)
    new = resign(NEW_SEED, old, term=4)
    assert accept(new, old, keys={OLD, NEW}) == decode(DesiredState, old.payload)


def test_the_same_generation_with_other_content_is_still_a_replay() -> None:
    """A state of the running generation whose payload differs is refused (not a re-signature)."""
    old = env_of(OLD_SEED)
    other = sign(NEW_SEED, msgspec.structs.replace(desired("node-1"), weights={"a": 50}), term=4)
    with pytest.raises(ProtocolError, match="not newer"):
        accept(other, old, keys={OLD, NEW})
    with pytest.raises(ProtocolError, match="not newer"):
        accept(resign(NEW_SEED, old, term=4), None, keys={OLD, NEW})  # nothing runs: no base


def test_a_resignature_needs_a_trusted_key_and_no_lower_term() -> None:
    """An agent that does not trust the new key refuses it; a lower term is refused too."""
    old = env_of(OLD_SEED)
    with pytest.raises(ProtocolError, match="unknown key"):
        accept(resign(NEW_SEED, old, term=4), old, keys={OLD})
    with pytest.raises(ProtocolError, match="lease term"):
        accept(resign(NEW_SEED, old, term=2), old, keys={OLD, NEW})


def test_a_resignature_of_a_generation_below_the_floor_is_refused() -> None:
    """A re-signature of an older state than the floor is a replay."""
    old = env_of(OLD_SEED)
    with pytest.raises(ProtocolError, match="not newer"):
        accept(resign(NEW_SEED, old, term=4), old, keys={OLD, NEW}, min_generation=8)


# -- the trust check -------------------------------------------------------------------------------


def info(node: str, keys: list[str] | None) -> NodeInfo:
    return NodeInfo(id=node, trust_keys=keys)


def test_untrusting_names_nodes_without_the_key_and_agents_that_do_not_say() -> None:
    """A node lacking the key, and one whose agent reports no keys (older), are both named."""
    nodes = [info("n3", [OLD]), info("n1", [OLD, NEW]), info("n2", None), info("n4", [])]
    assert untrusting(nodes, NEW) == {
        "n2": "its agent does not report the keys it trusts (upgrade it)",
        "n3": "does not trust it", "n4": "does not trust it"}
    assert trusting(nodes, OLD) == ["n1", "n3"]


def test_an_older_agents_registration_decodes_as_not_reporting() -> None:
    """A NodeInfo without the field (an older agent) decodes, with trust_keys None."""
    assert decode(NodeInfo, b'{"id": "n1"}').trust_keys is None


# -- who may lead ----------------------------------------------------------------------------------


def marker(key: str, retired: tuple[str, ...] = ()) -> FenceMarker:
    return FenceMarker(term=3, holder="h", key=key, retired=list(retired))


def test_a_coordinator_with_the_previous_key_may_take_over_from_it() -> None:
    """Fences naming the previous key do not stop the new key; without it they do."""
    assert lead_refusal([marker(OLD)] * 3, own=NEW, previous=OLD) is None
    assert "led with signing key" in (lead_refusal([marker(OLD)], own=NEW, previous=None) or "")
    assert lead_refusal([], own=NEW, previous=OLD) is None  # a fresh fleet


def test_a_retired_key_never_leads_again_even_if_told_the_new_one_is_previous() -> None:
    """Two keys never lead by turns: the old key is refused once retired, whatever it claims."""
    fences = [marker(NEW, retired=(OLD,))]
    why = lead_refusal(fences, own=OLD, previous=NEW)
    assert why is not None and "retired" in why and NEW[:12] in why
    assert lead_refusal(fences, own=OLD, previous=None) is not None


def test_a_third_key_is_refused_even_with_a_previous_key() -> None:
    """Only the previous key named may have fenced the fleet."""
    assert lead_refusal([marker(EVIL)], own=NEW, previous=OLD) is not None


def test_retired_keys_carry_on_and_grow_with_the_previous_key_bounded() -> None:
    """The leader keeps every retired key, adds its previous one, never its own, at most 16."""
    assert retired_after([marker(OLD, retired=(EVIL,))], own=NEW, previous=OLD) == [EVIL, OLD]
    assert retired_after([marker(NEW, retired=(OLD,))], own=NEW, previous=None) == [OLD]
    assert retired_after([marker(OLD, retired=(NEW,))], own=NEW, previous=None) == []
    many = tuple(public_key(generate_seed()) for _ in range(MAX_RETIRED + 3))
    kept = retired_after([marker(OLD, retired=many)], own=NEW, previous=OLD)
    assert len(kept) == MAX_RETIRED and kept[-1] == OLD


# -- re-sign planning ------------------------------------------------------------------------------


def test_plan_resigns_states_of_the_previous_key_and_names_the_rest() -> None:
    """Previous-key states are re-signed; own ones skipped; foreign, forged, misplaced named."""
    forged = msgspec.structs.replace(env_of(OLD_SEED, "node-5"), generation=99)
    entries = {
        "node-1.hello": encode(env_of(OLD_SEED, "node-1")),
        "node-2.hello": encode(env_of(NEW_SEED, "node-2")),
        "node-3.hello": encode(env_of(EVIL_SEED, "node-3")),
        "node-4.hello": encode(env_of(OLD_SEED, "node-9")),  # another node's state, moved here
        "node-5.hello": encode(forged),
        "node-6.hello": b"{not json",
        subjects.FENCE_KEY: encode(marker(OLD)),
    }
    plan = plan_resign(entries, fleet=FLEET, own=NEW, previous={OLD})
    assert list(plan.resign) == ["node-1.hello"]
    assert set(plan.skipped) == {"node-3.hello", "node-4.hello", "node-5.hello", "node-6.hello"}
    assert "neither" in plan.skipped["node-3.hello"]
    assert "bad signature" in plan.skipped["node-5.hello"]


def test_signed_by_others_lists_what_finish_waits_for() -> None:
    """``finish`` waits for every desired state signed by another key than the new one."""
    entries = {"node-1.hello": encode(env_of(NEW_SEED)), "node-2.hello": encode(env_of(OLD_SEED)),
               subjects.FENCE_KEY: b"x"}
    assert signed_by_others(entries, NEW) == {"node-2.hello": OLD[:12] + "..."}


def test_status_says_the_next_step_at_each_stage() -> None:
    """Each stage of a rotation names what the operator does next."""
    nodes = [info("n1", [OLD, NEW]), info("n2", [OLD])]
    begun = status(stage="begun", old=OLD, new=NEW, leader_key=OLD, nodes=nodes, desired={})
    assert "n2" in begun.next_step() and "FLEETWAVE_TRUST_KEYS" in begun.next_step()
    ready = status(stage="begun", old=OLD, new=NEW, leader_key=OLD, nodes=nodes[:1], desired={})
    assert "'switch'" in ready.next_step()
    left = {"node-1.hello": encode(env_of(OLD_SEED))}
    forced = status(stage="switched", old=OLD, new=NEW, leader_key=NEW, nodes=nodes, desired={})
    assert forced.next_step().startswith("n2 do not trust the new key")
    both = [info("n1", [OLD, NEW]), info("n2", [OLD, NEW])]
    waiting = status(stage="switched", old=OLD, new=NEW, leader_key=OLD, nodes=both, desired=left)
    assert "restart every coordinator" in waiting.next_step()
    resigning = status(stage="switched", old=OLD, new=NEW, leader_key=NEW, nodes=both,
                       desired=left)
    assert "re-sign 1 desired state" in resigning.next_step()
    done = status(stage="switched", old=OLD, new=NEW, leader_key=NEW, nodes=both,
                  desired={"node-1.hello": encode(env_of(NEW_SEED))})
    assert "'finish'" in done.next_step() and "n1, n2" in done.next_step()


def test_switch_is_refused_while_a_node_does_not_trust_the_new_key() -> None:
    """``switch`` is refused naming every node that would refuse the new key, and only then."""
    nodes = [info("n1", [OLD, NEW]), info("n2", [OLD]), info("n3", None)]
    st = status(stage="begun", old=OLD, new=NEW, leader_key=OLD, nodes=nodes, desired={})
    why = st.switch_refusal()
    assert why is not None and why.startswith("2 node(s)") and "n2 (" in why and "n3 (" in why
    ok = status(stage="begun", old=OLD, new=NEW, leader_key=OLD, nodes=nodes[:1], desired={})
    assert ok.switch_refusal() is None


def test_finish_is_refused_until_the_leader_and_every_state_use_the_new_key() -> None:
    """``finish`` waits for a new-key leader and for every state signed anew, naming what's left."""
    nodes = [info("n1", [OLD, NEW])]
    left = {"node-1.hello": encode(env_of(OLD_SEED))}
    st = status(stage="switched", old=OLD, new=NEW, leader_key="", nodes=nodes, desired=left)
    why = st.finish_refusal()
    assert why is not None and "leader (signs with nothing" in why and "node-1.hello" in why
    done = status(stage="switched", old=OLD, new=NEW, leader_key=NEW, nodes=nodes,
                  desired={"node-1.hello": encode(env_of(NEW_SEED))})
    assert done.finish_refusal() is None


# -- re-signing against an in-memory bus -----------------------------------------------------------


def test_a_new_leader_resigns_every_previous_key_state_with_its_term() -> None:
    """After fencing, every old-key state is written again: new key and term, same bytes."""
    bus = FakeBus()
    for i in (1, 2):
        bus.set("put", DESIRED, f"node-{i}.hello", encode(env_of(OLD_SEED, f"node-{i}")))
    bus.set("put", DESIRED, "node-3.hello", encode(env_of(EVIL_SEED, "node-3")))

    async def lead() -> None:
        fence = await write_fences(bus, term=5, holder="me", now=1.0, key=NEW, retired=[OLD])
        plan = await resign_desired(bus, Fenced(bus, fence), seed=NEW_SEED, previous={OLD})
        assert sorted(plan.resign) == ["node-1.hello", "node-2.hello"]
        again = await resign_desired(bus, Fenced(bus, fence), seed=NEW_SEED, previous={OLD})
        assert again.resign == {}  # level-triggered: a second pass finds nothing to do

    asyncio.run(lead())
    for i in (1, 2):
        entry = bus.live(DESIRED, f"node-{i}.hello")
        assert entry is not None and entry.value is not None
        env = decode(SignedEnvelope, entry.value)
        assert (env.key, env.term, env.generation) == (NEW, 5, 7)
        assert resigns(env, env_of(OLD_SEED, f"node-{i}"))
    evil = bus.live(DESIRED, "node-3.hello")
    assert evil is not None and evil.value is not None
    assert decode(SignedEnvelope, evil.value).key == EVIL  # never laundered


def test_a_deposed_leader_resigns_nothing() -> None:
    """Re-signing goes through the fence: once another leader fenced, it raises and writes none."""
    bus = FakeBus()
    bus.set("put", DESIRED, "node-1.hello", encode(env_of(OLD_SEED)))

    async def lead() -> None:
        fence = await write_fences(bus, term=5, holder="me", now=1.0, key=NEW)
        await write_fences(bus, term=6, holder="other", now=2.0, key=NEW)
        with pytest.raises(Deposed):
            await resign_desired(bus, Fenced(bus, Fence(term=5, seqs=fence.seqs)),
                                 seed=NEW_SEED, previous={OLD})

    asyncio.run(lead())
    entry = bus.live(DESIRED, "node-1.hello")
    assert entry is not None and entry.value is not None
    assert decode(SignedEnvelope, entry.value).key == OLD
