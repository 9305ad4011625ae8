"""A hostile bundle written straight into the object store (not through ``release push``, whose
canonical re-pack would refuse it first) fails that node's update with the reason, end to end
through a real agent process, and the agent stays up to converge on a good release next."""

from __future__ import annotations

from coordinator.dev.broker import Broker
from protocol import subjects
from protocol.bundle import digest
from protocol.messages import ReleaseRef
from tests.integration.procs import reaping, wait_until
from tests.integration.test_agent_services import Fleet, _agent, fleet  # noqa: F401 (fixture)
from tests.unit.protocol.test_bundle import archive_of, gnu_sparse


async def _store_hostile(f: Fleet, version: str, data: bytes) -> None:
    """Put ``data`` in the fleet's object store as hello ``version``, as any client could."""
    await f.bus.obj_put(subjects.releases_store("default"), f"hello/{version}", data)
    f.refs[version] = ReleaseRef(
        service="hello", version=version, digest=digest(data), size=len(data)
    )


async def test_sparse_bundle_fails_the_update_with_the_reason_and_the_agent_lives_on(
    fleet: Fleet, broker: Broker  # noqa: F811 (the fixture imported above)
) -> None:
    """A 1 TiB sparse member (a MemoryError on c9cc494) makes the observed state say failed with
    the bundle's reason; the same agent then converges on hello 1.0.0."""
    manifest = b'name = "hello"\nversion = "6.6.6"\ncommand = ["python3", "app.py"]\n'
    await _store_hostile(fleet, "6.6.6", archive_of(gnu_sparse(1 << 40), manifest=manifest))
    async with reaping(_agent(fleet, broker)) as (agent,):
        gen = await fleet.desire({"a": "6.6.6"}, {"a": 100})
        obs = await wait_until(
            fleet.observed,
            lambda o: o is not None and o.generation == gen and o.phase == "failed",
            timeout=40,
            what="phase failed",
        )
        assert obs is not None
        assert "sparse" in obs.error and "holes.bin" in obs.error, obs.error
        assert "\n" not in obs.error

        gen = await fleet.desire({"b": "1.0.0"}, {"b": 100})
        obs = await fleet.converged(gen)
        assert obs.phase == "converged" and obs.slots["b"].status == "healthy"
        assert agent.running and agent.returncode is None
