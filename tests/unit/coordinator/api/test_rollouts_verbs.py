"""The rollout verbs that act on a live rollout: which rollout, and a repeated rollback."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from coordinator.api.rollouts import RolloutsApi
from coordinator.core.engine import EngineEvent
from coordinator.errors import RemoteError, UsageError
from protocol.messages import (
    ReleaseRef,
    RollbackRequest,
    RolloutRecord,
    RolloutRequest,
    RolloutSpec,
)
from protocol.testing import NEW, OLD, spec
from tests.unit.coordinator.api.test_rollouts_remove import Runner, resolve


@dataclass
class Live:
    id: str
    undo: bool


class Driving(Runner):
    """A runner driving ``live`` (one service's rollout), recording the requests it gets."""

    def __init__(self, past: list[RolloutRecord], live: Live | None = None) -> None:
        super().__init__(past)
        self.live = live
        self.asked: list[tuple[str, EngineEvent]] = []
        self.undos: list[bool] = []

    async def deploy(self, spec: RolloutSpec, release: ReleaseRef, who: str, *,
                     undo: bool = False) -> RolloutRecord:
        self.undos.append(undo)
        return await super().deploy(spec, release, who, undo=undo)

    async def request(self, rollout_id: str, event: EngineEvent) -> RolloutRecord:
        self.asked.append((rollout_id, event))
        return self.past[0]

    def active(self, service: str) -> Any:
        return self.live


def past() -> list[RolloutRecord]:
    return [RolloutRecord(id="r-new", spec=spec(version=NEW.version), release=NEW,
                          from_version=OLD.version, state="succeeded"),
            RolloutRecord(id="r-old", spec=spec(version=OLD.version), release=OLD,
                          state="succeeded")]


@pytest.mark.parametrize("verb", ["pause", "resume", "promote", "abort"])
@pytest.mark.parametrize("rid", ["", "  "])
def test_a_verb_without_a_rollout_id_acts_on_no_rollout(verb: str, rid: str) -> None:
    """An empty id (a script's unset variable) is refused: it acted on the newest rollout,
    of whichever service."""
    runner = Driving(past())
    api = RolloutsApi(runner, resolve=resolve, public_key="K")
    handler = api._verb(lambda r, who: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(UsageError, match="name the rollout"):
        asyncio.run(handler(RolloutRequest(id=rid), "ops"))
    assert runner.asked == []


def test_a_rollback_is_deployed_as_an_undo() -> None:
    runner = Driving(past())
    api = RolloutsApi(runner, resolve=resolve, public_key="K")
    out = asyncio.run(api.rollback(RollbackRequest(service="hello"), "ops"))
    assert out["action"] == f"deploying hello {OLD.version}"
    ((_spec, release),) = runner.deployed
    assert release == OLD and runner.undos == [True]


def test_a_second_rollback_does_not_roll_the_first_back() -> None:
    """While a rollback SERVICE runs, another (a retry, a second operator) is refused: rolling
    the first back deployed the very version it was leaving."""
    runner = Driving(past(), live=Live(id="r-undo", undo=True))
    api = RolloutsApi(runner, resolve=resolve, public_key="K")
    with pytest.raises(RemoteError, match="r-undo already rolls hello back") as err:
        asyncio.run(api.rollback(RollbackRequest(service="hello"), "ops"))
    assert err.value.code == "conflict" and runner.asked == [] and runner.deployed == []


def test_a_rollback_of_a_running_deploy_rolls_it_back() -> None:
    runner = Driving(past(), live=Live(id="r-deploy", undo=False))
    api = RolloutsApi(runner, resolve=resolve, public_key="K")
    out = asyncio.run(api.rollback(RollbackRequest(service="hello"), "ops"))
    assert out == {"id": "r-deploy", "action": "rolling back"}
    assert [rid for rid, _ in runner.asked] == ["r-deploy"]


def test_a_rollback_reuses_a_spec_without_the_settings_its_strategy_ignored() -> None:
    """A canary accepted with --batch and --max-mismatch-rate (before they were refused there):
    its rollback is deployed, without them, rather than refused for a setting that never
    meant anything."""
    old = spec(version=NEW.version, strategy="canary", steps=["1", "100%"], batch="50%")
    old.gates.max_mismatch_rate = 0.01
    runner = Driving([RolloutRecord(id="r-new", spec=old, release=NEW,
                                    from_version=OLD.version, state="succeeded"),
                      past()[1]])
    api = RolloutsApi(runner, resolve=resolve, public_key="K")
    out = asyncio.run(api.rollback(RollbackRequest(service="hello"), "ops"))
    assert out["action"] == f"deploying hello {OLD.version}"
    ((again, _),) = runner.deployed
    assert again.strategy == "canary" and again.steps == ["1", "100%"]
    assert again.batch == "1" and again.gates.max_mismatch_rate is None
