"""agent.host.slots, the pure parts: the crash policy, exit descriptions, log capping.

The supervision of real processes is in tests/integration/test_agent_slots.py."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import pytest

from agent.host.slots import (
    EPHEMERAL_RANGE,
    SLOT_PORTS,
    CrashPolicy,
    SlotSpec,
    _bindable,
    _ephemeral,
    cap_log,
    describe_exit,
    free_port,
)
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
    assert spec.argv(manifest.command) == ["uvicorn", "--port", "41234"]
    worker = SlotSpec(service="web", slot="a", node="n", release_dir=Path("/r"),
                      manifest=manifest, digest="sha256:x", port=None, log_dir=Path("/l"))
    assert "PORT" not in worker.variables()


def test_a_slots_port_is_never_one_the_kernel_gives_outgoing_connections() -> None:
    """Ports come from SLOT_PORTS, outside this host's ephemeral range: an outgoing connection
    cannot take one between the check and the slot's bind (the kernel's own pick, port 0,
    comes from that range, which is what this failed on)."""
    taken = _ephemeral(EPHEMERAL_RANGE)
    assert taken is not None  # Linux
    for _ in range(200):
        port = free_port("127.0.0.1")
        assert SLOT_PORTS[0] <= port <= SLOT_PORTS[1]
        assert not taken[0] <= port <= taken[1]


def test_a_port_held_or_avoided_is_not_given() -> None:
    """A listening socket's port, or one of ``avoid``, is skipped for another of the range."""
    with socket.socket() as held:
        while True:  # a held port whose second neighbour is free now
            busy = free_port("127.0.0.1")
            if SLOT_PORTS[0] <= busy <= SLOT_PORTS[1] - 2 and _bindable("127.0.0.1", busy + 2):
                break
        held.bind(("127.0.0.1", busy))
        held.listen()
        got = {free_port("127.0.0.1", frozenset({busy + 1}), ports=(busy, busy + 2),
                         rng=random.Random(seed)) for seed in range(30)}
    assert got == {busy + 2}


@pytest.mark.parametrize("text", ["25000 40000\n", "1024 65535\n", "garbage", None])
def test_the_ephemeral_range_is_left_out_or_the_kernel_picks(tmp_path: Path,
                                                             text: str | None) -> None:
    """An ephemeral range covering part of SLOT_PORTS leaves the rest; covering all of it, the
    kernel picks (as before); an unreadable range file leaves SLOT_PORTS whole."""
    ranges = tmp_path / "range"
    if text is not None:
        ranges.write_text(text)
    port = free_port("127.0.0.1", ephemeral=ranges)
    if text == "25000 40000\n":
        assert SLOT_PORTS[0] <= port < 25000
    if text in ("garbage", None):
        assert SLOT_PORTS[0] <= port <= SLOT_PORTS[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # and it is free
