"""The API's side of a removal: a deploy that resolves no release, and a rollback after it."""

from __future__ import annotations

import asyncio
from typing import Any

from coordinator.api.rollouts import RolloutsApi, removal_ref, undo_removal
from coordinator.core.engine import EngineEvent
from coordinator.core.history import summarise
from protocol.history import RolloutSummary
from protocol.messages import (
    DeployRequest,
    ReleaseRef,
    RollbackRequest,
    RolloutRecord,
    RolloutSpec,
)
from protocol.testing import NEW, OLD, spec


class Runner:
    """Records what is deployed; ``past`` is the rollouts known (newest first), read as the
    history's summaries and records."""

    fleet = "f"

    def __init__(self, past: list[RolloutRecord]) -> None:
        self.past = past
        self.deployed: list[tuple[RolloutSpec, ReleaseRef]] = []

    async def deploy(self, spec: RolloutSpec, release: ReleaseRef, who: str, *,
                     undo: bool = False) -> RolloutRecord:
        self.deployed.append((spec, release))
        return RolloutRecord(id=f"r{len(self.deployed)}", spec=spec, release=release, undo=undo)

    async def request(self, rollout_id: str, event: EngineEvent) -> RolloutRecord:
        raise AssertionError("no live rollout here")

    async def find(self, rollout_id: str, *, whole: bool = True,
                   seen: bool = False) -> RolloutRecord | None:
        return next((r for r in self.past if r.id == rollout_id), None)

    async def latest(self, *, seen: bool = False) -> RolloutRecord | None:
        return self.past[0] if self.past else None

    async def history(self, service: str = "", limit: int = 50) -> list[RolloutSummary]:
        return [summarise(r) for r in self.past if not service or r.spec.service == service]

    def active(self, service: str) -> Any:
        return None


async def resolve(service: str, version: str) -> ReleaseRef:
    return {OLD.version: OLD, NEW.version: NEW}[version]


def removal(**fields: Any) -> RolloutSpec:
    return spec(strategy="remove", version="", **fields)


def test_a_removal_is_deployed_without_resolving_a_release() -> None:
    """A remove spec goes to the runner with the service's removal ref (no version, digest)."""
    runner = Runner([])
    api = RolloutsApi(runner, resolve=resolve, public_key="K")
    assert asyncio.run(api.deploy(DeployRequest(spec=removal()), "ops")) == {"id": "r1"}
    ((sent, release),) = runner.deployed
    assert sent.strategy == "remove" and release == removal_ref("hello")
    assert (release.version, release.digest) == ("", "")


def test_rollback_after_a_finished_removal_deploys_what_it_removed_where() -> None:
    """The removed version, rolling, at the removal's selector and pace."""
    gone = RolloutRecord(id="rm", spec=removal(selector={"zone": "b"}, batch="2"),
                         release=removal_ref("hello"), from_version=NEW.version,
                         state="succeeded")
    deployed = RolloutRecord(id="d", spec=spec(strategy="canary", steps=["1", "100%"]),
                             release=NEW, from_version=OLD.version, state="succeeded")
    runner = Runner([gone, deployed])
    api = RolloutsApi(runner, resolve=resolve, public_key="K")
    answer = asyncio.run(api.rollback(RollbackRequest(service="hello"), "ops"))
    assert answer["action"] == f"deploying hello {NEW.version}"
    ((sent, release),) = runner.deployed
    assert sent == undo_removal(gone.spec, NEW.version) and release == NEW
    assert (sent.strategy, sent.selector, sent.batch, sent.steps) == (
        "rolling", {"zone": "b"}, "2", [])


def test_rollback_to_a_version_after_a_removal() -> None:
    """``--to`` after a removal deploys that version the same way."""
    gone = RolloutRecord(id="rm", spec=removal(), release=removal_ref("hello"),
                         from_version=NEW.version, state="succeeded")
    runner = Runner([gone])
    api = RolloutsApi(runner, resolve=resolve, public_key="K")
    asyncio.run(api.rollback(RollbackRequest(service="hello", to_version=OLD.version), "ops"))
    ((sent, release),) = runner.deployed
    assert (sent.strategy, sent.version, release) == ("rolling", OLD.version, OLD)


def test_rollback_after_an_aborted_removal_undoes_it_not_the_deploy_before() -> None:
    """An aborted removal left some nodes without the service: rollback deploys what it
    removed, not the version before the last successful deploy."""
    gone = RolloutRecord(id="rm", spec=removal(), release=removal_ref("hello"),
                         from_version=NEW.version, state="aborted")
    deployed = RolloutRecord(id="d", spec=spec(), release=NEW, from_version=OLD.version,
                             state="succeeded")
    runner = Runner([gone, deployed])
    api = RolloutsApi(runner, resolve=resolve, public_key="K")
    asyncio.run(api.rollback(RollbackRequest(service="hello"), "ops"))
    ((sent, release),) = runner.deployed
    assert (sent.strategy, sent.version, release) == ("rolling", NEW.version, NEW)


def test_rollback_after_a_rolled_back_removal_is_the_usual_one() -> None:
    """A removal that rolled back changed nothing: rollback goes before the last deploy."""
    gone = RolloutRecord(id="rm", spec=removal(), release=removal_ref("hello"),
                         from_version=NEW.version, state="rolled_back")
    deployed = RolloutRecord(id="d", spec=spec(), release=NEW, from_version=OLD.version,
                             state="succeeded")
    runner = Runner([gone, deployed])
    api = RolloutsApi(runner, resolve=resolve, public_key="K")
    asyncio.run(api.rollback(RollbackRequest(service="hello"), "ops"))
    ((sent, release),) = runner.deployed
    assert (sent.version, release) == (OLD.version, OLD)
