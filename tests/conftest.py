"""Running the suite in parallel: ``pytest -n N`` with ``--dist loadgroup`` (in addopts).

The groups are ours (``tests.parallel``): each test file that holds a machine-wide resource (its
``SUBNET``, a module-level ``holds`` mark, being a chaos test) runs whole on one worker, one
after another with every other file that holds the same resource. pytest-xdist's own
``xdist_group`` marks are not used: with pytest 9.2 its loadgroup silently stops grouping (it
rewrites ``item._nodeid``, which pytest no longer reads; pytest-dev/pytest-xdist#1386), so the
controller computes the groups itself from the collected test ids, in a scheduler of its own.
Without ``-n`` none of this runs."""

from __future__ import annotations

import collections
import contextlib
from pathlib import Path
from typing import Any

import pytest

from tests.parallel import file_groups


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "holds(*resources): module level (pytestmark) only: the file holds machine-wide resources "
        "(e.g. 'subnet 127.0.1'); files holding one of the same never run at the same time "
        "under pytest -n (see tests/parallel.py)",
    )


try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # pytest-xdist is in the dev extra; without it the suite runs serially
    pass
else:

    class HeldGroupScheduling(LoadScopeScheduling):  # type: ignore[misc]
        """xdist's scope scheduling with our groups as scopes: a file that holds something is
        one work unit (shared by the files holding the same); every other test is a unit of
        its own. Units go out biggest first (``--loadscope-reorder``, xdist's default)."""

        _groups: dict[str, str] | None = None

        def schedule(self) -> None:
            if self._groups is None and self.collection_is_completed:
                ids = next(iter(self.registered_collections.values()), [])
                self._groups = file_groups(i.split("::", 1)[0] for i in ids)
            super().schedule()

        def _split_scope(self, nodeid: str) -> str:
            group = (self._groups or {}).get(nodeid.split("::", 1)[0])
            return f"group: {group}" if group is not None else nodeid

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
        if config.getvalue("dist") == "loadgroup":
            return HeldGroupScheduling(config, log)
        return None


LOGS_SHOWN = 12  # the most recently written log files of a failed test shown in its report
LOG_LINES = 40  # the last lines shown of each


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed test's report ends with the tails of the logs in its ``tmp_path`` (the broker's,
    the coordinator's, the agents', the routers'), so that a failure seen once in CI, whose temp
    dirs are gone, can still be read."""
    report = yield
    tmp = getattr(item, "funcargs", {}).get("tmp_path")
    if report.failed and call.when == "call" and tmp is not None:
        for path in _newest_logs(tmp):
            try:
                with open(path, errors="replace") as f:
                    tail = "".join(collections.deque(f, LOG_LINES))
            except OSError as exc:
                tail = f"cannot read it: {exc}"
            report.sections.append((f"log {path.relative_to(tmp)}", tail))
    return report


def _newest_logs(tmp: Path) -> list[Path]:
    """The ``LOGS_SHOWN`` most recently written ``*.log`` files under ``tmp``, oldest first."""
    dated = []
    for path in tmp.rglob("*.log"):
        with contextlib.suppress(OSError):  # gone meanwhile
            dated.append((path.stat().st_mtime, path))
    return [path for _, path in sorted(dated)[-LOGS_SHOWN:]]
