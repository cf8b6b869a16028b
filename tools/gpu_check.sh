#!/usr/bin/env bash
# What a one-GPU machine must show, in one command (< 10 min on one H100; docs/install.md):
#
#   bash tools/gpu_check.sh                       # on the GPU machine, in the set-up environment
#   bash tools/gpu_check.sh --dry-run             # the same steps on the CPU, small (or EFFB_GPU_CHECK_DRY_RUN=1)
#   bash tools/gpu_check.sh --wheelhouse DIR      # machine without the packages and no network:
#                                                 # install them from DIR (wheels) first
#
# Prints the environment (tools/collect_env.py), then tools/gpu_check.py: mmcv CUDA ops, every
# family's pack parity on the GPU in float32 and under bf16 / fp16 autocast, 20 AMP training
# iterations of each demo config (finite losses, images/s, peak memory), and a summary table.
# Python: EFFB_PYTHON, else EFFB_VENV's, else the repository's .venv (as tools/setup_env.sh
# chose them), else python3 (a GPU machine's own torch).
# Exit status: 0 all ok, 1 a check failed, 124 past EFFB_GPU_CHECK_TIMEOUT seconds (default 570).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [ -n "${EFFB_PYTHON:-}" ]; then PY="$EFFB_PYTHON"
elif [ -n "${EFFB_VENV:-}" ] && [ -x "$EFFB_VENV/bin/python" ]; then PY="$EFFB_VENV/bin/python"
elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"
else PY="$(command -v python3)"; fi

ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheelhouse)
      WHEELS="$2"; shift 2
      # a venv that sees the machine's own torch (--system-site-packages), the rest from DIR
      VENV="${TMPDIR:-/tmp}/effb-gpu-check-venv"
      [ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV"
      PY="$VENV/bin/python"
      echo "[gpu_check] installing from $WHEELS into $VENV (no index)"
      "$PY" -m pip install -q --no-index --find-links "$WHEELS" mmcv mmengine mmdet mmsegmentation \
        ftfy regex pycocotools safetensors
      "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e "$ROOT" ;;
    *) ARGS+=("$1"); shift ;;
  esac
done

echo "[gpu_check] environment ($PY):"
"$PY" tools/collect_env.py --short || true
echo
timeout "${EFFB_GPU_CHECK_TIMEOUT:-570}" "$PY" tools/gpu_check.py "${ARGS[@]+"${ARGS[@]}"}"
