"""The coordinator's signing key on disk: the seed that signs every desired state it writes.

A rotation (``fleetwave auth rotate-signing-key``, ``coordinator.core.rotation``) keeps two more
files next to the key file ``KEY``: ``KEY.next``, the new seed made by *begin*, and, from
*switch* until *finish*, ``KEY.previous``, the old seed (0600 both). *switch* hard-links ``KEY``
to ``KEY.previous`` and then renames ``KEY.next`` over ``KEY``, so there is no moment without a
``KEY`` (a coordinator starting then would make a key of its own). A coordinator finds its
previous key there (``previous_key``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from coordinator.core.rotation import Stage
from protocol.errors import ProtocolError
from protocol.signing import generate_seed, load_seed, public_key, store_seed

log = logging.getLogger("fleetwave.coordinator.runner")


def next_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.next")


def previous_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.previous")


def coordinator_seed(path: Path) -> bytes:
    """The coordinator's signing seed from ``path``, created (0600, atomically) if missing."""
    path = Path(path)
    if path.exists():
        return load_seed(path)  # refuses a file others can read, or one holding no seed
    if previous_path(path).exists():
        raise ProtocolError(f"{path} is missing but {previous_path(path)} exists (a signing-key "
                            f"rotation switched here); put the new key back at {path}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        seed = generate_seed()
        store_seed(path, seed)
    except OSError as exc:
        raise ProtocolError(f"{path}: cannot create the signing key: {exc.strerror}; pick "
                            "another place with --key-file") from None
    log.warning("created a new signing key in %s", path)
    return seed


def previous_key(path: Path, seed: bytes) -> str | None:
    """The public key of ``KEY.previous`` (the key a rotation switched away from), if any."""
    prev = previous_path(Path(path))
    if not prev.exists():
        return None
    key = public_key(load_seed(prev))
    if key == public_key(seed):
        raise ProtocolError(f"{prev} holds the same key as {path}; delete {prev}")
    return key


def begin(path: Path) -> tuple[Path, str]:
    """Make the new seed ``KEY.next`` (0600); its path and public key. Refuses to overwrite."""
    path = Path(path)
    current = load_seed(path)
    nxt, prev = next_path(path), previous_path(path)
    if prev.exists():
        raise ProtocolError(f"{prev} exists: the last rotation is not finished; run "
                            f"'fleetwave auth rotate-signing-key finish --key-file {path}' first")
    if nxt.exists():
        raise ProtocolError(f"{nxt} exists already (public key "
                            f"{public_key(load_seed(nxt))}); go on with 'check' and 'switch', "
                            "or delete it to start again")
    seed = generate_seed()
    if public_key(seed) == public_key(current):  # 2^-256, but cheap to say
        raise ProtocolError("the new key came out equal to the current one; run begin again")
    try:
        store_seed(nxt, seed)
    except OSError as exc:
        raise ProtocolError(f"{nxt}: cannot write the new key: {exc.strerror}") from None
    return nxt, public_key(seed)


def switch(path: Path) -> tuple[str, str]:
    """``KEY`` → ``KEY.previous`` and ``KEY.next`` → ``KEY``; the old and new public keys."""
    path = Path(path)
    nxt, prev = next_path(path), previous_path(path)
    if not nxt.exists():
        raise ProtocolError(f"{nxt} does not exist; make it with 'fleetwave auth "
                            f"rotate-signing-key begin --key-file {path}'")
    old, new = public_key(load_seed(path)), public_key(load_seed(nxt))
    if old == new:
        raise ProtocolError(f"{nxt} holds the key {path} has already; rotating to the same key "
                            f"changes nothing: delete {nxt} and run begin again")
    if prev.exists():
        raise ProtocolError(f"{prev} exists: the last rotation is not finished; run finish first")
    try:
        os.link(path, prev)  # first: there is never a moment without KEY
        nxt.replace(path)
    except OSError as exc:
        raise ProtocolError(f"cannot move the key files next to {path}: {exc.strerror}") from None
    return old, new


def finish(path: Path) -> str:
    """Delete ``KEY.previous``; its public key."""
    prev = previous_path(Path(path))
    if not prev.exists():
        raise ProtocolError(f"{prev} does not exist: no rotation was switched on this host")
    key = public_key(load_seed(prev))
    prev.unlink()
    return key


def stage(path: Path) -> tuple[Stage, str, str]:
    """Where a rotation stands on this host: ("none" | "begun" | "switched", old, new key)."""
    path = Path(path)
    current = public_key(load_seed(path))
    if previous_path(path).exists():
        return "switched", public_key(load_seed(previous_path(path))), current
    if next_path(path).exists():
        return "begun", current, public_key(load_seed(next_path(path)))
    return "none", current, current
