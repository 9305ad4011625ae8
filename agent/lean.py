"""What the agent process leaves out of memory: OpenSSL, until a TLS connection needs it.

The agent runs on every host and is idle most of its life, so what it imports stays resident on
every host. OpenSSL is the largest piece it does not use on a plain ``nats://`` link: ``asyncio``
imports ``ssl`` (``_ssl``, linked to libssl and libcrypto) and ``hashlib`` loads ``_hashlib``
(libcrypto again) at import, which is about 5.9 MiB of resident memory (3.7 MiB of it libcrypto's
pages touched by its initialisation, 2.2 MiB the ssl module and libssl) for sha256 digests that
Python's own ``_sha256`` computes as well, and for TLS that a plain link never uses.

``import_lean`` runs first thing in the agent process (``agent.main``, before anything imports
asyncio) and imports the stack without them:

- ``_hashlib`` is blocked for the life of the process (a ``None`` in ``sys.modules`` makes its
  import fail, documented import-system behaviour), so ``hashlib`` and ``hmac`` take their
  documented fallback: the builtin ``_sha256``, ``_md5``, ... (same digests; a large release
  bundle hashes a few times slower than with OpenSSL, a fraction of a second per 100 MB).
- ``ssl`` is blocked while ``asyncio`` is imported (its modules then hold ``ssl = None``), and
  replaced by ``LazySSL``, a stand-in module, for every later ``import ssl`` (nats-py's client
  and transport import it at the top but touch it only to make a TLS context). The first
  attribute read on the stand-in imports the real ``ssl`` and gives it to every module that holds
  the stand-in or ``None`` (asyncio's three, nats-py's two, any other), so a ``tls://`` URL, or a
  server that requires TLS on a ``nats://`` URL, works exactly as before; the process then pays
  for OpenSSL from that moment on (except ``_hashlib``, which stays out: ``_ssl`` does not need
  it).

``import_prometheus`` imports the parts of ``prometheus_client`` that ``--metrics`` uses (metric
families, a registry, the OpenMetrics encoder) without running the package's ``__init__``, which
imports everything else it offers: its HTTP and WSGI servers, push-gateway client and TLS helpers
(``http.server``, ``urllib.request``, ``wsgiref``, ``ssl``): 2.4 MiB resident against 0.15 MiB,
the difference between an agent with metrics under its 30 MB and one over it. The package is put
in ``sys.modules`` unexecuted (so only its submodules are there, which is all the agent imports of
it); if that fails for an unforeseen reason (another version's layout), the whole package is
imported, with ``import_deferring_ssl``.

``import_deferring_ssl`` imports a library that names ``ssl`` at import time only in the
signatures of TLS helpers the agent never calls (``prometheus_client``, for ``--metrics``: its
``exposition`` module has ``protocol: int = ssl.PROTOCOL_TLS_SERVER`` as a default argument and
``ssl.TLSVersion`` in annotations): while it runs, the stand-in answers such names with inert
placeholder classes instead of loading OpenSSL (4 MiB resident, which would take the agent with
metrics over its 30 MB). The module keeps the stand-in itself, so a later call that does use
ssl loads the real module as above; only those captured defaults would be placeholders.

Nothing is done when ``asyncio`` or ``hashlib`` is already imported (a test process, a process
that imports ``agent.main`` as a library): there is nothing left to save. If the lean import
fails for an unforeseen reason, the normal import follows: the saving is not worth a dead agent.
"""

from __future__ import annotations

import importlib
import sys
import threading
import types
from typing import Any

# asyncio's modules that import ssl and keep it as a global (CPython 3.11 to 3.13).
_ASYNCIO_SSL_USERS = ("asyncio.base_events", "asyncio.selector_events", "asyncio.sslproto")

_loading = threading.Lock()
_real_ssl: types.ModuleType | None = None
_deferring = False  # import_deferring_ssl is running: names read on the stand-in are placeholders


class LazySSL(types.ModuleType):
    """Stands in for ``ssl`` in ``sys.modules`` until a TLS connection needs the real module."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)  # introspection (copy, pickle, help) loads nothing
        if _deferring:
            # A class: typing accepts it in ``Optional[...]``; calling the helper that holds
            # it as a default would fail loudly, never silently do TLS without checks.
            return type(f"ssl.{name} (not loaded: agent.lean)", (), {})
        return getattr(load_ssl(), name)


def load_ssl() -> types.ModuleType:
    """Import the real ``ssl`` (once) and hand it to every module holding the stand-in or None."""
    global _real_ssl
    with _loading:
        if _real_ssl is not None:
            return _real_ssl
        if sys.modules.get("ssl") is None or isinstance(sys.modules["ssl"], LazySSL):
            sys.modules.pop("ssl", None)
        real = importlib.import_module("ssl")
        for name, module in list(sys.modules.items()):
            # The module's own dict, not getattr: a module ``__getattr__`` must not run here.
            held = getattr(module, "__dict__", {}).get("ssl", real)
            if isinstance(held, LazySSL) or (held is None and name in _ASYNCIO_SSL_USERS):
                setattr(module, "ssl", real)  # noqa: B010  # a module global, not an attribute
        sslproto = sys.modules.get("asyncio.sslproto")
        if sslproto is not None and not hasattr(sslproto, "SSLAgainErrors"):
            # asyncio defines it at import only when ssl is there (``if ssl is not None:``).
            setattr(sslproto, "SSLAgainErrors",  # noqa: B010  # a module global, as above
                    (real.SSLWantReadError, real.SSLSyscallError))
        _real_ssl = real
        return real


PROMETHEUS_PARTS = ("prometheus_client.metrics_core", "prometheus_client.registry",
                    "prometheus_client.openmetrics.exposition")


def import_prometheus() -> bool:
    """Import ``PROMETHEUS_PARTS`` without the package's ``__init__`` (see the module
    docstring); True if done so, False if the package was imported whole (or was already)."""
    if "prometheus_client" in sys.modules:
        return False  # a test process, a library user: nothing left to save
    import importlib.util

    spec = importlib.util.find_spec("prometheus_client")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("prometheus_client is not installed; reinstall fleetwave")
    sys.modules["prometheus_client"] = importlib.util.module_from_spec(spec)  # not executed
    try:
        for name in PROMETHEUS_PARTS:
            importlib.import_module(name)
    except ImportError:
        for name in [m for m in sys.modules if m.split(".")[0] == "prometheus_client"]:
            del sys.modules[name]
        import_deferring_ssl("prometheus_client")
        return False
    return True


def import_deferring_ssl(name: str) -> types.ModuleType:
    """Import module ``name`` without loading OpenSSL for names it reads on ``ssl`` at import
    time (see the module docstring); a plain import where the stand-in is not in place."""
    global _deferring
    if not isinstance(sys.modules.get("ssl"), LazySSL):
        return importlib.import_module(name)
    _deferring = True
    try:
        return importlib.import_module(name)
    finally:
        _deferring = False


def ssl_loaded() -> bool:
    """Whether the real ``ssl`` module is in this process (and OpenSSL with it)."""
    module = sys.modules.get("ssl")
    return module is not None and not isinstance(module, LazySSL)


def import_lean() -> bool:
    """Import asyncio and hashlib without OpenSSL; True if done, False if nothing to save."""
    if {"asyncio", "hashlib", "ssl"} & sys.modules.keys():
        return False
    sys.modules["_hashlib"] = None  # type: ignore[assignment]  # for good: see the docstring
    sys.modules["ssl"] = None  # type: ignore[assignment]  # asyncio sees no ssl module
    try:
        import asyncio  # noqa: F401
        import hashlib  # noqa: F401
    except ImportError:
        # Something in the chain needed them after all: give everything the real modules.
        if sys.modules.get("_hashlib", 0) is None:
            del sys.modules["_hashlib"]
        load_ssl()
        return False
    sys.modules["ssl"] = LazySSL("ssl", "stand-in for ssl until TLS is needed (agent.lean)")
    return True
