#!/usr/bin/env bash
# Every benchmark of the README's performance table, one after the other, as session 34 ran them
# (about 75 minutes on the project's 2-core VM, 25 of them the 20,000-agent restarts at the end). Run it from a clone with its venv set up
# (pip install -e '.[dev]'), nothing else running; each script's output goes to OUT/NAME.txt and
# a line per run to OUT/progress.log.
#   usage: tests/perf/run_all.sh [OUT]   (default: perf-YYYYmmdd-HHMM)
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
OUT=${1:-perf-$(date +%Y%m%d-%H%M)}
mkdir -p "$OUT"
PY=(env -u PYTHONDONTWRITEBYTECODE .venv/bin/python)  # children write bytecode, as hosts do
failed=0
run() {
  local name=$1; shift
  echo "=== $(date +%T) $name: $*" >> "$OUT/progress.log"
  local start=$SECONDS
  "${PY[@]}" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "    $(date +%T) $name rc=$rc $((SECONDS - start)) s" >> "$OUT/progress.log"
  [ "$rc" -eq 0 ] || failed=1
}
run cp_r1 tests/perf/bench_control_plane.py --nodes 1000,10000,50000
run cp_r3 tests/perf/bench_control_plane.py --nodes 1000,10000,50000 --brokers 3
run cp_tls tests/perf/bench_control_plane.py --nodes 1000 --compare
run rollback_1k tests/perf/bench_rollback.py --nodes 1000
run rollback_10k_a tests/perf/bench_rollback.py --nodes 10000 --max-payload 8MB
run rollback_10k_b tests/perf/bench_rollback.py --nodes 10000 --max-payload 8MB
run vs_ansible_10 tests/perf/bench_vs_ansible.py --nodes 10 --repeat 3
run vs_ansible_20 tests/perf/bench_vs_ansible.py --nodes 20 --repeat 3
run fanout tests/perf/bench_fanout.py --nodes 1000
run record tests/perf/bench_record.py --nodes 50000
run engine tests/perf/bench_engine.py
run shared tests/perf/bench_shared.py
run writes tests/perf/bench_writes.py
run reread tests/perf/bench_reread.py
run broker_5k tests/perf/bench_broker.py --agents 5000  # the Sizing table's two columns
run broker_10k tests/perf/bench_broker.py --agents 10000
run fetch tests/perf/bench_fetch.py
run rest tests/perf/bench_rest.py --nodes 10000
run rest50k tests/perf/bench_rest.py --nodes 50000
run failover tests/perf/bench_failover.py --rounds 2 --kills 20
run failover_10k tests/perf/bench_failover.py --rounds 1 --kill-nodes 10000 --kills 5
run analysis tests/perf/bench_analysis.py
run shadow tests/perf/bench_shadow.py --rounds 3
run slowloris tests/perf/bench_slowloris.py
run router tests/perf/bench_router.py --repeat 3
run agent_soak tests/perf/bench_agent.py --soak-minutes 10
run agent_tls tests/perf/bench_agent.py --compare --soak-minutes 0
run agent_metrics tests/perf/bench_agent.py --compare-metrics --soak-minutes 0
run history tests/perf/bench_history.py --rollouts 100000
# The broker's restarts and cold starts under 20,000 agents' watches (the Sizing rows).
run restart tests/perf/bench_restart.py --nodes 1000,10000,20000
run restart_cold tests/perf/bench_restart.py --cold --nodes 20000 --rate 500
run restart_cold_waited tests/perf/bench_restart.py --cold --waited --nodes 20000 --rate 500
run restart_cold_leader tests/perf/bench_restart.py --cold --leader --nodes 20000 --rate 500
echo "=== $(date +%T) done; outputs in $OUT" >> "$OUT/progress.log"
exit "$failed"
