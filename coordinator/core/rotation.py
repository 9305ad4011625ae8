"""Rotating the coordinator's signing key without an outage: the decisions, as pure functions.

Vocabulary. The *old* key signs the fleet's desired states today; the *new* key will. A
coordinator started with the new key file and the old key as its *previous* key
(``coordinator.runtime.keyfile``: the seed kept as ``KEY.previous``) may lead a fleet whose
fences name the old key; on taking the lease it fences with its own key, lists the old one as
*retired* in its fence markers, and *re-signs* every desired state the old key signed: the same
generation and payload bytes under the new key, which an agent trusting both accepts as the
state it already runs (``protocol.signing.resigns``), so no service on any node moves.

The steps (``fleetwave auth rotate-signing-key``) and what each checks here:

- *begin* makes the new key; every agent is then given it as a second ``--trust-key``;
- *switch* refuses while a registered node does not trust the new key (``untrusting``: agents
  report the keys they trust when they register; one too old to report counts as not trusting);
- the coordinators restarted with the new key: ``lead_refusal`` lets one lead a fleet fenced by
  its previous key, and refuses a key a rotation retired (so an old replica left running can
  never lead again, and two keys never lead by turns); ``plan_resign`` picks what to re-sign;
- *finish* checks that no desired state is left signed by another key (``signed_by_others``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from protocol.codec import decode
from protocol.errors import ProtocolError
from protocol.messages import FenceMarker, NodeInfo, SignedEnvelope
from protocol.signing import verify

Stage = Literal["none", "begun", "switched"]
MAX_RETIRED = 16  # keys a fence marker remembers; a fleet rotating every month keeps 16 months


def short(key: str) -> str:
    """A public key as operators see it in one line."""
    return f"{key[:12]}..."


def named(items: Mapping[str, str], most: int = 10) -> str:
    """``{what: why}`` in one line: the first ``most`` of them, and how many more."""
    shown = [f"{k} ({why})" for k, why in list(items.items())[:most]]
    more = len(items) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


# -- agents' trust ---------------------------------------------------------------------------------


def untrusting(nodes: Iterable[NodeInfo], key: str) -> dict[str, str]:
    """The registered nodes that would refuse states signed by ``key``, each with why, by id."""
    out = {}
    for info in sorted(nodes, key=lambda i: i.id):
        if info.trust_keys is None:
            out[info.id] = "its agent does not report the keys it trusts (upgrade it)"
        elif key not in info.trust_keys:
            out[info.id] = "does not trust it"
    return out


def trusting(nodes: Iterable[NodeInfo], key: str) -> list[str]:
    """The registered nodes that say they trust ``key``."""
    return sorted(i.id for i in nodes if i.trust_keys is not None and key in i.trust_keys)


# -- leading ---------------------------------------------------------------------------------------


def lead_refusal(markers: Sequence[FenceMarker], *, own: str, previous: str | None) -> str | None:
    """Why a coordinator with signing key ``own`` (and ``previous``, the key it takes over from)
    may not lead a fleet whose fence markers are ``markers``; None if it may."""
    retired = {k for m in markers for k in m.retired}
    leaders = [m.key for m in markers if m.key]
    if own in retired:
        now = next((k for k in leaders if k != own), "")
        return (f"this coordinator's signing key {short(own)} was retired by a rotation"
                + (f" (the fleet was last led with {short(now)})" if now else "")
                + "; give it the new key file from the host where 'fleetwave auth "
                "rotate-signing-key switch' ran (with KEY.previous until 'finish')")
    others = sorted(set(leaders) - {own, previous or ""})
    if others:
        return (f"the fleet was led with signing key {short(others[0])}, but this coordinator "
                f"has {short(own)} (agents would refuse its states); give every coordinator of a "
                "fleet the same key file (--key-file / FLEETWAVE_KEY_FILE), or rotate keys with "
                "'fleetwave auth rotate-signing-key'")
    return None


def retired_after(markers: Sequence[FenceMarker], *, own: str,
                  previous: str | None) -> list[str]:
    """The retired keys a leader's fence markers carry on: every marker's, then ``previous``;
    never ``own``, the newest ``MAX_RETIRED`` kept."""
    keys: list[str] = []
    for k in [*(k for m in markers for k in m.retired), *([previous] if previous else [])]:
        if k != own and k not in keys:
            keys.append(k)
    return keys[-MAX_RETIRED:]


# -- re-signing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResignPlan:
    """What a new leader signs again (key → envelope), and what it leaves alone (key → why)."""

    resign: dict[str, SignedEnvelope]
    skipped: dict[str, str]


def plan_resign(entries: Mapping[str, bytes], *, fleet: str, own: str,
                previous: Collection[str]) -> ResignPlan:
    """Of the desired bucket's ``entries`` (key → value), the states signed by a ``previous``
    key that verify under it, to be signed again with ``own``. A state signed by any other key,
    or that does not verify, is left alone and named: re-signing it would launder a forgery."""
    resign: dict[str, SignedEnvelope] = {}
    skipped: dict[str, str] = {}
    for key, value in sorted(entries.items()):
        node, dot, service = key.partition(".")
        if not dot:
            continue  # the bucket's fence marker, not a desired state
        try:
            env = decode(SignedEnvelope, value)
        except ProtocolError as exc:
            skipped[key] = f"malformed: {exc}"
            continue
        if env.key == own:
            continue
        if env.key not in previous:
            skipped[key] = (f"signed by {short(env.key)}, neither this coordinator's key nor its "
                            "previous one")
            continue
        try:
            verify(env, {env.key}, fleet=fleet, node=node, service=service,
                   min_generation=env.generation - 1, min_term=env.term)
        except ProtocolError as exc:
            skipped[key] = str(exc)
            continue
        resign[key] = env
    return ResignPlan(resign=resign, skipped=skipped)


def signed_by_others(entries: Mapping[str, bytes], key: str) -> dict[str, str]:
    """The desired states (key → the key that signed them, short) not signed by ``key``."""
    out = {}
    for k, value in sorted(entries.items()):
        if "." not in k:
            continue
        try:
            env = decode(SignedEnvelope, value)
        except ProtocolError:
            out[k] = "malformed"
            continue
        if env.key != key:
            out[k] = short(env.key)
    return out


# -- where a rotation stands -----------------------------------------------------------------------


@dataclass(frozen=True)
class Status:
    """Where a rotation stands, as ``rotate-signing-key check`` shows it.

    ``stage``: "none" (no rotation on this host), "begun" (``KEY.next`` made) or "switched"
    (``KEY.previous`` kept); ``leader_key``: the key the leading coordinator signs with ("" if
    none leads); ``untrusting``: nodes that would refuse the new key (id → why); ``still_old``:
    nodes that still trust the old key; ``not_resigned``: desired states not signed by the new
    key (key → the key that signed them)."""

    stage: Stage
    old: str
    new: str
    leader_key: str
    nodes: int
    untrusting: dict[str, str]
    still_old: list[str]
    not_resigned: dict[str, str]

    def switch_refusal(self) -> str | None:
        """Why ``switch`` must not run now (``--force`` overrides it), or None."""
        if not self.untrusting:
            return None
        return (f"{len(self.untrusting)} node(s) do not trust the new key {self.new}: "
                f"{named(self.untrusting)}; add it to their FLEETWAVE_TRUST_KEYS and restart "
                "their agents (or --force: they take no new desired state until then)")

    def finish_refusal(self) -> str | None:
        """Why ``finish`` must not run now (``--force`` overrides it), or None."""
        waiting = dict(self.not_resigned)
        if self.leader_key != self.new:
            waiting = {"leader": f"signs with {self.leader_key or 'nothing: none leads'}",
                       **waiting}
        if not waiting:
            return None
        return (f"not yet signed by the new key: {named(waiting)}; restart the coordinators "
                "with the new KEY and KEY.previous and wait for the re-signing (or --force)")

    def next_step(self) -> str:
        """What the operator does next, in one line."""
        if self.stage == "none":
            return "no rotation under way; 'begin' makes the new key"
        if self.stage == "begun":
            if self.untrusting:
                return (f"add {self.new} to FLEETWAVE_TRUST_KEYS (keeping {short(self.old)}) on "
                        f"{', '.join(self.untrusting)} and restart their agents, then check again")
            return ("every node trusts the new key: run 'switch', then copy KEY and "
                    "KEY.previous to every coordinator host and restart the coordinators")
        if self.untrusting:  # switched with --force
            return (f"{', '.join(self.untrusting)} do not trust the new key and take no new "
                    f"desired state: add {self.new} to their FLEETWAVE_TRUST_KEYS and restart "
                    "their agents")
        if self.leader_key != self.new:
            return (f"the leading coordinator signs with "
                    f"{short(self.leader_key) if self.leader_key else 'no key (none leads)'}: "
                    "restart every coordinator with the new KEY and KEY.previous")
        if self.not_resigned:
            return (f"waiting for the leader to re-sign {len(self.not_resigned)} desired "
                    "state(s); see its log if this lasts")
        whom = f" on {', '.join(self.still_old)}" if self.still_old else ""
        return (f"every desired state is signed by the new key: run 'finish', then remove "
                f"{short(self.old)} from FLEETWAVE_TRUST_KEYS{whom} and restart those agents")


def status(*, stage: Stage, old: str, new: str, leader_key: str, nodes: Sequence[NodeInfo],
           desired: Mapping[str, bytes]) -> Status:
    """Where a rotation from ``old`` to ``new`` stands, from the registered ``nodes`` and the
    desired bucket's entries."""
    return Status(
        stage=stage, old=old, new=new, leader_key=leader_key, nodes=len(nodes),
        untrusting=untrusting(nodes, new) if stage != "none" else {},
        still_old=trusting(nodes, old) if stage != "none" else [],
        not_resigned=signed_by_others(desired, new) if stage == "switched" else {},
    )
