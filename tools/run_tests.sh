#!/usr/bin/env bash
# The test command: sets up the environment on a fresh machine (idempotent; the first run builds
# mmcv, 10-20 min) and runs the whole test suite. Extra arguments go to pytest.
#   bash tools/run_tests.sh            # everything (what CI runs)
#   bash tools/run_tests.sh -k swift   # a subset
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/setup_env.sh"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
set +e
"$ROOT/.venv/bin/python" -m pytest -q -ra "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit $rc
