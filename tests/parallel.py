"""Which test files may run at the same time under ``pytest -n N``, and which must take turns.

Theory of operation: the suite runs on N pytest-xdist workers; the scheduler in
``tests/conftest.py`` hands each worker one *unit* of tests at a time. A test file that *holds* a
machine-wide resource, one another test would collide on, is part of a group, and a group is
one unit: its files run whole, one after another, on one worker. Every other test is a unit
of its own. Resources held:

- a loopback subnet: a module-level ``SUBNET = "127.0.9"`` (the file's agents bind
  ``127.0.9.i``, their routers the service's fixed port ``8080`` there), or
  ``pytestmark = pytest.mark.holds("subnet 127.0.58")`` for addresses named otherwise;
- anything else a module-level ``holds`` mark names (a cluster shared by the module's tests,
  formed once and broken last);
- everything under ``tests/chaos``: ``chaos``. Those tests kill brokers, coordinators and agents,
  cut and delay traffic in network namespaces and time the recovery, so they take turns with
  each other (the rest of the suite runs beside them).

Files that hold a common resource, directly or through other files, share a group (the
connected components of files and resources), so no two tests holding the same resource ever
run at once, and a module's fixtures and test order stay as written.
"""


from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from typing import Any

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


# -- the shell: what the test files say -------------------------------------------------------


def held_by(file: str) -> set[str]:
    """What the test file ``file`` (rootdir-relative, ``/``-separated) holds, read from its
    module: ``SUBNET`` and the module-level ``holds`` marks."""
    if not file.endswith(".py"):
        return resources(file, None, ())
    name = file.removesuffix(".py").replace("/", ".")
    try:
        module = importlib.import_module(name)
    except Exception:  # the worker reports the collection error; here it holds nothing
        return resources(file, None, ())
    marks: Any = getattr(module, "pytestmark", [])
    marked: list[str] = []
    for mark in marks if isinstance(marks, list) else [marks]:
        mark = getattr(mark, "mark", mark)  # a MarkDecorator or a Mark
        if getattr(mark, "name", None) == "holds":
            marked += [str(a) for a in mark.args]
    return resources(file, getattr(module, "SUBNET", None), marked)


def file_groups(files: Iterable[str]) -> dict[str, str]:
    """The group of each of ``files`` that holds something (see ``groups``)."""
    return groups({f: held_by(f) for f in sorted(set(files))})
