"""Importing the bus without what nats-py would load and fleetwave never uses.

nats-py imports ``aiohttp`` at import time whenever it is installed (for a WebSocket transport
fleetwave never uses); fleetwave installs it for the coordinator's ``--http``. Loaded by every
process that imports the bus, it costs the agent about 14 MiB of its 30 MB budget and every CLI
command about 0.2 s of start-up. ``import_bus`` imports ``protocol.bus`` with such modules
blocked for the time of that import: a ``None`` in ``sys.modules`` makes an import fail
(documented import-system behaviour), and nats-py takes its fallback (no WebSocket transport).
The modules stay importable afterwards by whoever needs them (the coordinator's ``--http``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

# ``importlib.metadata`` (zipfile, csv, email and more: 9 ms of each CLI command's start): nats-py
# looks its own version up with it on import and falls back to "0.0.0", which the bus then puts
# right from nats-py's dist-info directory's name (``protocol.bus._name_client_version``).
NOT_FOR_THE_BUS = ("aiohttp", "importlib.metadata")


def import_bus(blocked: Iterable[str] = NOT_FOR_THE_BUS) -> None:
    """Import ``protocol.bus`` with ``blocked`` kept out. Nothing is saved (a plain import) when
    the bus or one of them is loaded already (a test run, say); an import that needs one of them
    after all (a newer nats-py) is retried plainly: the saving is not worth a failure."""
    blocked = tuple(blocked)
    if "protocol.bus" in sys.modules or any(m in sys.modules for m in blocked):
        import protocol.bus  # already paid for, or nothing to save
        return
    for m in blocked:
        sys.modules[m] = None  # type: ignore[assignment]  # blocks the import
    try:
        import protocol.bus
    except ImportError:
        pass
    finally:
        for m in blocked:
            del sys.modules[m]
    import protocol.bus  # noqa: F401  # a no-op when the first import worked
