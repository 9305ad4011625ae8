"""The agent's local state file: what it must remember across its own restarts.

It holds, per service, the last accepted desired envelope (so a restarted agent keeps converging
without the bus and refuses replays of older generations), each slot's process (pid and psutil
create_time, for adoption that never mistakes a recycled pid), and the router's pid and socket.

Writes are atomic: a temp file in the same directory, rename over the old file; a reader sees the
old file or the new one, never half of one. A *durable* write (``write_atomic(durable=True)``,
``save_state``) is also flushed to the disk (fsync of the file before the rename, of the directory
after), and ``flush_state`` flushes a file written without: what must survive the host's power
loss, not only the agent's crash or restart (which the page cache survives). The manager writes
without and flushes when the generations accepted change (``Restorer``). A missing file is an
empty state. A corrupt file is refused: it is kept beside as ``<name>.corrupt`` for a person to
look at, one log line says so, and the agent starts from an empty state (it converges again from
the desired states on the bus).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from pathlib import Path

import msgspec

from protocol.errors import ProtocolError
from protocol.messages import SignedEnvelope

log = logging.getLogger("fleetwave.agent.state")

STATE_NAME = "state.json"


class SlotRecord(msgspec.Struct, kw_only=True):
    """One slot as remembered: what runs there and how to find its process again."""

    slot: str
    status: str = "empty"
    digest: str = ""
    version: str = ""
    pid: int | None = None
    create_time: float | None = None
    port: int | None = None
    since: float = 0.0
    restarts: int = 0
    reason: str = ""
    generation: int = 0
    last_exit: int | None = None
    # Self-healing's restarts of this slot with this release (their times): so that a restarted
    # agent keeps the restart budget instead of starting a fresh one.
    heals: list[float] = []


class ServiceRecord(msgspec.Struct, kw_only=True):
    """One service as remembered."""

    service: str
    envelope: SignedEnvelope | None = None  # the last accepted desired state, as signed
    generation: int = 0
    observed_generation: int = 0
    slots: dict[str, SlotRecord] = {}
    router_pid: int | None = None
    router_create_time: float | None = None
    router_socket: str = ""
    router_weights: dict[str, int] = {}


class AgentState(msgspec.Struct, kw_only=True):
    schema: int = 1
    # The node and fleet that wrote the file ("": an older agent's file, which named no fleet):
    # a data dir reused under another name (a cloned VM image) holds another node's state.
    node: str = ""
    fleet: str = ""
    services: dict[str, ServiceRecord] = {}
    # The fleet's size as the leader's last pace said it, rounded up (``desired.size_step``;
    # 0: none heard): a restarted agent's first watch asks for the heartbeat, and backs off
    # after failures, as the fleet's size says, before a pace reaches it.
    fleet_nodes: int = 0


_decoder = msgspec.json.Decoder(AgentState)
_encoder = msgspec.json.Encoder()


def load_state(path: Path) -> AgentState:
    """Read the state file; empty when missing; a corrupt file is set aside and refused."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return AgentState()
    except OSError as exc:
        raise ProtocolError(f"cannot read agent state {path}: {exc.strerror}") from None
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        aside = path.with_name(path.name + ".corrupt")
        with contextlib.suppress(OSError):
            path.replace(aside)
        log.error(
            "agent state %s is corrupt (%s); kept it as %s and starting from an empty state: "
            "services converge again from their desired states",
            path, exc, aside,
        )
        return AgentState()


def flush_state(path: Path) -> None:
    """Put the state file at ``path`` as it is now on the disk: its bytes, and its name in the
    directory (fsync of both)."""
    _fsync(path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    """fsync the file or directory at ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_state(path: Path, state: AgentState) -> None:
    """Write the state atomically and durably (temp file, fsync, rename, fsync of the directory)."""
    write_atomic(path, _encoder.encode(state))


def write_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so that a reader never sees a partial file; ``durable``:
    the file's bytes and its new name on the disk before this returns (fsync of both)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own per write: two writers (two agents of one data dir by mistake, or a
    # test's) sharing one temp file could rename a mix of both states into place.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        _fsync(path.parent)
