#!/usr/bin/env bash
# Builds an mmcv 2.1.0 wheel with ops against the torch of one Python (called by setup_env.sh).
#
#   bash tools/build_mmcv.sh PYTHON WHEEL_DIR CXX20(0|1) LOG [NAME=VALUE ...]
#
# The NAME=VALUE pairs (MMCV_WITH_OPS, FORCE_CUDA, TORCH_CUDA_ARCH_LIST, CUDA_HOME, CPATH) come
# from tools/setup_plan.py. The sdist is downloaded once into ~/.cache/effbackbones/mmcv-src/
# (EFFB_MMCV_SRC: a folder already holding mmcv-2.1.0.tar.gz, e.g. offline), unpacked in a
# temporary folder, patched (tools/setup_plan.py patch-mmcv: -std=c++20 when torch's headers need
# it), and built with `pip wheel` into WHEEL_DIR, which the caller installs from. pip's own
# wheel cache is not used: it knows mmcv by version only, not which torch/CUDA it was built for.
set -euo pipefail
PY="$1"; WHEEL_DIR="$2"; CXX20="$3"; LOG="$4"; shift 4
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/effbackbones"
SRC_DIR="${EFFB_MMCV_SRC:-$CACHE/mmcv-src}"
log() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

mkdir -p "$SRC_DIR" "$WHEEL_DIR"
: > "$LOG"
if [ ! -f "$SRC_DIR/mmcv-2.1.0.tar.gz" ]; then
  log "     downloading the mmcv 2.1.0 sdist into $SRC_DIR"
  # --no-build-isolation: pip reads the sdist's metadata with this env's setuptools<70 (mmcv's
  # setup.py imports pkg_resources)
  "$PY" -m pip --disable-pip-version-check download --no-deps --no-binary :all: \
    --no-build-isolation "mmcv==2.1.0" -d "$SRC_DIR" >> "$LOG" 2>&1 \
    || { tail -20 "$LOG" >&2; exit 1; }
fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/effb-mmcv-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
tar xzf "$SRC_DIR/mmcv-2.1.0.tar.gz" -C "$WORK"
"$PY" "$ROOT/tools/setup_plan.py" patch-mmcv "$WORK/mmcv-2.1.0" $([ "$CXX20" = 1 ] && echo --cxx20)

CORES="$(nproc 2>/dev/null || echo 2)"
JOBS="${MAX_JOBS:-$(( CORES < 8 ? CORES : 8 ))}"
log "     building mmcv 2.1.0 ($*; MAX_JOBS=$JOBS): 10-20 min on 2 cores for CPU ops, far longer with CUDA kernels"
log "     progress is printed every 60 s; full log: $LOG"
(
  while sleep 60; do
    log "     ... still building mmcv ($(grep -o '^ *\[[0-9]*/[0-9]*\]' "$LOG" 2>/dev/null | tail -1 | tr -d ' ' || true) compile steps done)"
  done
) &
ticker=$!
set +e
env "$@" MAX_JOBS="$JOBS" "$PY" -m pip --disable-pip-version-check wheel --no-deps \
  --no-build-isolation -v -w "$WHEEL_DIR" "$WORK/mmcv-2.1.0" >> "$LOG" 2>&1
rc=$?
set -e
kill "$ticker" 2>/dev/null || true
if [ $rc -ne 0 ]; then
  grep -v "Location '" "$LOG" | grep -B2 -A8 -m3 "error" >&2 || tail -40 "$LOG" >&2
  exit 1
fi
log "     built $(ls "$WHEEL_DIR"/mmcv-2.1.0-*.whl | head -1)"
