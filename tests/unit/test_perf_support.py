"""The benchmarks' shared support (tests/perf/perf_support.py): what it checks before a run."""

from __future__ import annotations

import importlib.util
import sys
import tracemalloc
from pathlib import Path
from types import ModuleType

import pytest

PERF = Path(__file__).resolve().parents[1] / "perf"


def _support(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(PERF))  # the benches import it as a sibling module
    spec = importlib.util.spec_from_file_location("perf_support", PERF / "perf_support.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "perf_support", mod)  # its dataclasses look it up
    spec.loader.exec_module(mod)
    return mod


def test_profile_without_py_spy_exits_2_in_one_line_before_anything_runs(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """--profile with no py-spy anywhere: exit 2, one line naming the fix (it once ended in a
    FileNotFoundError traceback after the fleet had started); without --profile, nothing."""
    ps = _support(monkeypatch)
    monkeypatch.setattr(ps.shutil, "which", lambda _name: None)
    monkeypatch.setattr(ps.sys, "executable", str(tmp_path / "python3"))
    assert ps.py_spy() is None
    ps.need_py_spy(None, "bench_x.py")
    with pytest.raises(SystemExit) as exc:
        ps.need_py_spy(tmp_path / "prof", "bench_x.py")
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["bench_x.py: --profile needs py-spy, which is not installed; run "
                   "'.venv/bin/pip install py-spy' (or drop --profile)"]
    (tmp_path / "py-spy").write_text("")
    assert ps.py_spy() == str(tmp_path / "py-spy")  # found beside the Python that runs


def test_the_engine_bench_runs_a_rollout_to_success(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench_engine.py measures a rollout that really ends: at a small size its simulated fleet
    takes the rollout to success, every step counted."""
    _support(monkeypatch)
    spec = importlib.util.spec_from_file_location("bench_engine", PERF / "bench_engine.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.measure(200, 10)
    assert r["state"] == "succeeded"
    assert r["steps"] >= 200 // 10 and r["engine_s"] > 0


def test_the_record_bench_times_its_run_untraced(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench_record.py times one run with tracemalloc off (tracing slowed the planning it
    quotes several times) and reads the heap from a second, traced run."""
    _support(monkeypatch)
    spec = importlib.util.spec_from_file_location("bench_record", PERF / "bench_record.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    traced: list[bool] = []
    real = bench.run

    def run(n: int, max_payload: int) -> dict[str, object]:
        traced.append(tracemalloc.is_tracing())
        return real(n, max_payload)  # type: ignore[no-any-return]

    monkeypatch.setattr(bench, "run", run)
    r = bench.measure(200, 1 << 20)
    assert traced == [False, True]
    assert r["pages"] >= 1 and r["python_heap_mb"] > 0 and "plan_s" in r
