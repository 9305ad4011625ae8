"""The agent process's footprint: agent.lean keeps OpenSSL out until a TLS connection needs it,
and agent.main imports neither click nor importlib.metadata.

Each check runs in a fresh interpreter: the test process itself imported asyncio long ago.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_agent_main_imports_nothing_that_loads_openssl() -> None:
    """Importing agent.main loads neither asyncio nor hashlib nor ssl, so main() can go lean."""
    out = _run("""
        import sys
        import agent.main
        print(sorted({"asyncio", "hashlib", "ssl", "_ssl", "_hashlib"} & sys.modules.keys()))
    """)
    assert out == "[]"


def test_lean_stack_has_no_openssl_and_the_same_digests() -> None:
    """After import_lean the bus imports as the agent imports it without _ssl or _hashlib, and
    sha256 digests agree."""
    out = _run("""
        import sys
        from agent import lean
        assert lean.import_lean() is True
        import hashlib
        from agent.main import _import_bus
        _import_bus()  # as the agent imports the bus
        import nats.aio.client
        loaded = [m for m in ("_ssl", "_hashlib") if sys.modules.get(m) is not None]
        print(loaded, lean.ssl_loaded())
        print(hashlib.sha256(b"fleetwave").hexdigest())
        maps = open("/proc/self/maps").read()
        print("libcrypto" in maps or "libssl" in maps)
    """)
    import hashlib

    assert out.splitlines() == [
        "[] False", hashlib.sha256(b"fleetwave").hexdigest(), "False",
    ]


def test_tls_still_works_once_needed() -> None:
    """The first use of ssl loads it for asyncio and nats-py alike: a TLS handshake is attempted
    (and fails as TLS does against a plain server), not refused for a missing ssl module."""
    out = _run("""
        import sys
        from agent import lean
        assert lean.import_lean() is True
        import asyncio
        import nats.aio.client

        async def main():
            async def plain(reader, writer):
                writer.write(b"this is no TLS server\\r\\n" * 4)
                await writer.drain()
                writer.close()
            server = await asyncio.start_server(plain, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            ctx = nats.aio.client.ssl.create_default_context()  # via the stand-in, as nats-py
            try:
                await asyncio.wait_for(asyncio.open_connection(
                    "127.0.0.1", port, ssl=ctx, server_hostname="localhost"), 10)
            except Exception as exc:
                print(type(exc).__module__, type(exc).__name__)
            finally:
                server.close()

        asyncio.run(main())
        import asyncio.base_events, asyncio.sslproto
        print(lean.ssl_loaded(), asyncio.base_events.ssl is nats.aio.client.ssl,
              asyncio.sslproto.ssl is sys.modules["ssl"], sys.modules.get("_hashlib") is not None)
    """)
    assert out.splitlines() == ["ssl SSLError", "True True True False"]


def test_nothing_done_when_asyncio_is_there_already() -> None:
    """In a process that imported asyncio (a test run, a library user) import_lean does nothing."""
    out = _run("""
        import sys, asyncio
        from agent import lean
        print(lean.import_lean(), "_ssl" in sys.modules, lean.ssl_loaded())
    """)
    assert out == "False True True"


def test_the_agent_never_imports_click() -> None:
    """Parsing the flags and importing everything the agent runs leaves click unloaded, and
    aiohttp too (installed for the coordinator, imported by nats-py when present)."""
    code = (
        "import sys; from agent.flags import parse_flags; from agent.main import _import_bus; "
        "parse_flags(['--node-id', 'n1']); _import_bus(); "
        "import agent.daemon, agent.manager.shell; "
        "print(sorted(m for m in ('click', 'rich', 'coordinator', "
        "'importlib.metadata', 'aiohttp') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "[]"


def test_the_lean_bus_import_still_names_the_nats_client_version() -> None:
    """With importlib.metadata kept out, nats-py still reports its real version to the server."""
    code = (
        "import sys; from agent.main import _import_bus; _import_bus(); "
        "import nats.aio.client; ok = 'importlib.metadata' not in sys.modules; "
        "v = nats.aio.client.__version__; from importlib.metadata import version; "
        "print(ok, v == version('nats-py'), v != '0.0.0')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "True True True"


def test_metrics_import_only_the_parts_of_prometheus_client_it_uses() -> None:
    """With --metrics the agent imports prometheus_client's families, registry and OpenMetrics
    encoder alone: neither its HTTP servers and clients nor OpenSSL, and the exposition works."""
    out = _run("""
        import sys
        from agent import lean
        assert lean.import_lean() is True
        from agent.main import _import_bus
        _import_bus()
        print(lean.import_prometheus())
        from agent.metrics import AgentCollector, LiveAgent
        from agent.metrics_http import registry_renderer
        body, kind = registry_renderer(AgentCollector(LiveAgent("n1", {})))()
        print(kind.split(";")[0], body.endswith(b"# EOF\\n"), b"fleetwave_agent_info" in body)
        print(sorted(m for m in ("http.server", "urllib.request", "wsgiref", "_ssl", "ssl")
                     if m in sys.modules and not (m == "ssl" and not lean.ssl_loaded())))
    """)
    assert out.splitlines() == ["True", "application/openmetrics-text True True", "[]"]


def test_the_whole_package_imports_without_openssl_too() -> None:
    """The fallback (the whole prometheus_client, import_deferring_ssl): OpenSSL stays out and
    the exposition works (its TLS helpers, never called, hold placeholders)."""
    out = _run("""
        import sys
        from agent import lean
        assert lean.import_lean() is True
        from agent.main import _import_bus
        _import_bus()
        lean.import_deferring_ssl("prometheus_client")
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.core import GaugeMetricFamily

        class One:
            def collect(self):
                yield GaugeMetricFamily("x", "x", value=1)

        registry = CollectorRegistry()
        registry.register(One())
        print(generate_latest(registry).decode().splitlines()[-1])
        maps = open("/proc/self/maps").read()
        print(lean.ssl_loaded(), "_ssl" in sys.modules, "libssl" in maps or "libcrypto" in maps)
    """)
    assert out.splitlines() == ["x 1.0", "False False False"]


def test_without_metrics_prometheus_client_is_never_imported() -> None:
    """An agent without --metrics pays nothing for it: prometheus_client stays unloaded."""
    code = (
        "import sys; from agent.flags import parse_flags; from agent.main import _import_bus, "
        "metrics_endpoint; v = parse_flags(['--node-id', 'n1'], environ={}); "
        "assert metrics_endpoint(v) is None; _import_bus(); "
        "import agent.daemon, agent.manager.shell; "
        "print([m for m in sys.modules if m.startswith('prometheus_client')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "[]"
