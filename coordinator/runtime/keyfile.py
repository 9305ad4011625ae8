"""The coordinator's signing key on disk: the seed that signs every desired state it writes."""

from __future__ import annotations

import logging
from pathlib import Path

from protocol.errors import ProtocolError
from protocol.signing import generate_seed, load_seed, store_seed

log = logging.getLogger("fleetwave.coordinator.runner")


def coordinator_seed(path: Path) -> bytes:
    """The coordinator's signing seed from ``path``, created (0600, atomically) if missing."""
    path = Path(path)
    if path.exists():
        return load_seed(path)  # refuses a file others can read, or one holding no seed
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        seed = generate_seed()
        store_seed(path, seed)
    except OSError as exc:
        raise ProtocolError(f"{path}: cannot create the signing key: {exc.strerror}; pick "
                            "another place with --key-file") from None
    log.warning("created a new signing key in %s", path)
    return seed
