"""Which tests may run at the same time under pytest-xdist, and which must take turns.

Theory of operation: the suite runs with ``-n N --dist loadgroup``. A test file that *holds* a
machine-wide resource that another test would collide on gets an ``xdist_group``, and
``loadgroup`` runs a group's tests one after another on one worker; every other test is spread
over the workers one by one. Resources held:

- a loopback subnet: a module-level ``SUBNET = "127.0.9"`` (agents bind ``127.0.9.i``, their
  routers the service's fixed port ``8080`` there), or a ``@pytest.mark.holds("subnet 127.0.9")``
  for a file that names its addresses otherwise (several subnets, the dev fleet's default
  ``127.0.1``, ``127.0.0.1:8080``);
- anything else named in a ``holds`` mark (a module-scoped fleet that every test of the file
  shares, ...);
- everything under ``tests/chaos``: ``chaos``. Those tests kill brokers, coordinators and agents,
  cut and delay traffic in network namespaces and measure how long recovery takes, so they take
  turns with each other (the rest of the suite still runs beside them).

A whole file goes into one group when any of its tests holds something (module fixtures and
test order within the file stay as written), and files that hold a common resource share a
group (the connected components of files and resources), so any two tests that hold the same
resource never run at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

CHAOS = "chaos"
CHAOS_DIR = "tests/chaos/"


def subnet(prefix: str) -> str:
    """The resource name of a loopback subnet (``127.0.9`` -> ``subnet 127.0.9``)."""
    return f"subnet {prefix}"


def resources(path: str, module_subnet: object, marked: Iterable[str]) -> set[str]:
    """What the file at ``path`` (relative, ``/``-separated) holds: its ``SUBNET`` (``None``
    when it has none), the names in its ``holds`` marks, and ``chaos`` under ``tests/chaos``."""
    held = set(marked)
    if isinstance(module_subnet, str):
        held.add(subnet(module_subnet))
    if path.startswith(CHAOS_DIR):
        held.add(CHAOS)
    return held


def groups(holdings: Mapping[str, set[str]]) -> dict[str, str]:
    """The xdist group of each file that holds something: files sharing a resource, directly or
    through other files, get the same group, named after its first resource in sorted order.
    Files that hold nothing are left out (their tests are spread)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for file, held in holdings.items():
        for resource in held:
            parent[find("file:" + file)] = find("res:" + resource)
    names: dict[str, str] = {}
    for resource in sorted({r for held in holdings.values() for r in held}):
        names.setdefault(find("res:" + resource), resource)
    return {file: names[find("file:" + file)] for file, held in holdings.items() if held}
