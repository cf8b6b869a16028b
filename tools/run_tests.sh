#!/usr/bin/env bash
# The test command: sets up the environment on a fresh machine (idempotent; the first run builds
# mmcv, 10-20 min) and runs the whole test suite. Extra arguments go to pytest.
#   bash tools/run_tests.sh            # everything (what CI runs)
#   bash tools/run_tests.sh -k swift   # a subset
#   EFFB_TEST_WORKERS=1 bash tools/run_tests.sh   # in one process (no pytest-xdist)
# The suite runs in one pytest-xdist worker per CPU core (at most 4), whole test files per worker
# (--dist loadfile: a file's module fixtures are built once), each worker with its share of the
# cores as torch threads. Most of the suite's time is single-threaded (tools/ subprocesses run
# with one thread, importing mmdet / mmseg takes ~8 s each): on a 2-core AMD EPYC VM the suite
# took 18.4 min in two workers against 32.6 min in one process.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/setup_env.sh"
cd "$ROOT"
# the environment setup_env.sh set up: EFFB_PYTHON / EFFB_IN_PLACE / EFFB_VENV as it reads them
if [ -n "${EFFB_PYTHON:-}" ]; then PY="$EFFB_PYTHON"
elif [ "${EFFB_IN_PLACE:-0}" = "1" ]; then PY="$(command -v python || command -v python3)"
else PY="${EFFB_VENV:-$ROOT/.venv}/bin/python"; fi
CORES="$(nproc 2>/dev/null || echo 2)"
WORKERS="${EFFB_TEST_WORKERS:-$(( CORES < 4 ? CORES : 4 ))}"
if ! [[ "$WORKERS" =~ ^[1-9][0-9]*$ ]]; then
  echo "EFFB_TEST_WORKERS must be a whole number >= 1 (1: one process), got '$WORKERS'" >&2
  exit 2
fi
if [ "$WORKERS" -gt 1 ]; then
  # at least one thread each (more workers than cores would give 0)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( CORES > WORKERS ? CORES / WORKERS : 1 ))}"
  XDIST=(-n "$WORKERS" --dist loadfile)
else
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
  XDIST=()
fi
set +e
"$PY" -m pytest -q -ra "${XDIST[@]}" "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit $rc
