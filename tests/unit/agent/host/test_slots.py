"""agent.host.slots, the pure parts: the crash policy, exit descriptions, log capping.

The supervision of real processes is in tests/integration/test_agent_slots.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.host.slots import CrashPolicy, SlotSpec, cap_log, describe_exit
from protocol.errors import ProtocolError
from protocol.manifest import Manifest


def test_crash_policy_backs_off_then_fails_a_crash_loop() -> None:
    """Delays double up to the cap; one crash more than allowed within the window fails."""
    p = CrashPolicy(max_restarts=3, window=10, first=1, cap=3)
    assert [p.on_crash(t) for t in (0, 1, 2)] == [1, 2, 3]
    assert p.on_crash(3) is None


def test_crash_policy_forgets_old_crashes() -> None:
    """Crashes older than the window do not count towards a crash loop."""
    p = CrashPolicy(max_restarts=2, window=10, first=1, cap=8)
    assert p.on_crash(0) == 1 and p.on_crash(1) == 2
    assert p.on_crash(20) == 1


def test_describe_exit() -> None:
    """Exit statuses and signals are named the way an operator reads them."""
    assert describe_exit(3) == "exited with status 3"
    assert describe_exit(-9) == "killed by signal SIGKILL"


def test_cap_log_keeps_the_tail_and_truncates(tmp_path: Path) -> None:
    """A log past the cap keeps its last half in .1 and starts again empty."""
    log = tmp_path / "x.log"
    log.write_bytes(b"a" * 60 + b"b" * 40)
    assert not cap_log(log, 200)
    assert cap_log(log, 80)
    assert log.read_bytes() == b""
    assert (tmp_path / "x.log.1").read_bytes() == b"b" * 40


def test_a_slot_gets_the_same_variables_in_its_env_and_its_argv() -> None:
    """PORT and FLEETWAVE_* are set in the environment and fill ``${NAME}`` in argv, with the
    same values; the manifest's env cannot override them; a worker has no PORT."""
    manifest = Manifest(name="web", version="2.0.0", port=8080,
                        command=["uvicorn", "--port", "${PORT}"],
                        env={"PORT": "1", "GREETING": "hi"})
    spec = SlotSpec(service="web", slot="b", node="web-7", release_dir=Path("/r"),
                    manifest=manifest, digest="sha256:x", port=41234, log_dir=Path("/l"))
    env = spec.env()
    assert spec.variables() == {"PORT": "41234", "FLEETWAVE_NODE": "web-7",
                                "FLEETWAVE_SLOT": "b", "FLEETWAVE_VERSION": "2.0.0"}
    assert {k: env[k] for k in spec.variables()} == spec.variables() and env["GREETING"] == "hi"
    # Where it starts, in its environment only: a command line is every local user's to read.
    assert env["FLEETWAVE_RELEASE_DIR"] == "/r"
    with pytest.raises(ProtocolError, match="FLEETWAVE_RELEASE_DIR"):
        spec.argv(["app", "${FLEETWAVE_RELEASE_DIR}/x"])
    assert spec.argv(manifest.command) == ["uvicorn", "--port", "41234"]
    worker = SlotSpec(service="web", slot="a", node="n", release_dir=Path("/r"),
                      manifest=manifest, digest="sha256:x", port=None, log_dir=Path("/l"))
    assert "PORT" not in worker.variables()
