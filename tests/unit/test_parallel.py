"""tests/parallel.py: which test files take turns under pytest -n. The grouping (connected
components of files and the resources they hold) in table tests, and on the real suite: every
file that names a fixed loopback subnet holds it, the files sharing one share a group."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.parallel import CHAOS, file_groups, groups, held_by, resources, subnet

ROOT = Path(__file__).resolve().parents[2]
# A loopback address or subnet named in a test file: 127.A.B (.C). 127.0.0.x is the machine's
# own (free ports only); 127.77.0 is the network test bed's, inside namespaces (chaos).
LITERAL = re.compile(r"\b127\.(\d{1,3})\.(\d{1,3})(?:\.\d{1,3})?\b")
UNPINNED = {"127.0.0"}


def test_what_a_file_holds() -> None:
    """Its SUBNET, its holds marks, and 'chaos' for a file under tests/chaos."""
    assert resources("tests/integration/test_a.py", None, ()) == set()
    assert resources("tests/integration/test_a.py", "127.0.9", ()) == {"subnet 127.0.9"}
    assert resources("tests/integration/test_a.py", None, ["x", "y"]) == {"x", "y"}
    assert resources("tests/chaos/test_a.py", "127.0.13", ["x"]) == {CHAOS, "subnet 127.0.13", "x"}
    assert resources("tests/integration/test_a.py", 9, ()) == set()  # not a subnet string


@pytest.mark.parametrize(
    ("holdings", "expected"),
    [
        pytest.param({"a": set(), "b": set()}, {}, id="nothing held: no groups"),
        pytest.param({"a": {"s1"}, "b": {"s2"}}, {"a": "s1", "b": "s2"}, id="disjoint"),
        pytest.param({"a": {"s1"}, "b": {"s1"}, "c": set()}, {"a": "s1", "b": "s1"},
                     id="shared subnet"),
        pytest.param({"a": {"x", "y"}, "b": {"y"}, "c": {"x"}, "d": {"z"}},
                     {"a": "x", "b": "x", "c": "x", "d": "z"}, id="through another file"),
        pytest.param({"a": {"m"}, "b": {"n"}, "c": {"n", "m"}}, {"a": "m", "b": "m", "c": "m"},
                     id="joined late"),
    ],
)
def test_files_holding_a_common_resource_share_a_group(
    holdings: dict[str, set[str]], expected: dict[str, str]
) -> None:
    """Connected files get one group, named after its first resource in sorted order; files
    that hold nothing get none."""
    assert groups(holdings) == expected


def _test_files() -> list[str]:
    return sorted(p.relative_to(ROOT).as_posix()
                  for d in ("tests/integration", "tests/chaos")
                  for p in (ROOT / d).glob("test_*.py"))


def test_every_fixed_subnet_a_test_file_names_is_held() -> None:
    """A test file that names a loopback subnet other than 127.0.0 holds it (SUBNET or a holds
    mark), or is a chaos test; otherwise two workers could bind the same address:port."""
    missing = []
    for file in _test_files():
        held = held_by(file)
        named = {f"127.{a}.{b}" for a, b in LITERAL.findall((ROOT / file).read_text())}
        missing += [f"{file}: {s}" for s in sorted(named - UNPINNED)
                    if subnet(s) not in held and CHAOS not in held]
    assert missing == [], "declare SUBNET or pytestmark = pytest.mark.holds('subnet ...'): " \
        + ", ".join(missing)


def test_the_suite_groups() -> None:
    """On the real files: the chaos tests are one group; the two dashboard files share
    127.0.67; the dev fleet's default subnet is held; a file that pins nothing is spread."""
    got = file_groups(_test_files())
    assert {f for f, g in got.items() if g == CHAOS} == {
        f for f in _test_files() if f.startswith("tests/chaos/")}
    dash = "tests/integration/test_dashboard_"
    assert got[dash + "api.py"] == got[dash + "browser.py"] == "subnet 127.0.67"
    assert got["tests/integration/test_e2e_rolling.py"] == "subnet 127.0.1"
    assert "tests/integration/test_router.py" not in got
