#!/usr/bin/env bash
# One-time, idempotent environment set-up for effbackbones (CPU or NVIDIA GPU machine).
#
#   bash tools/setup_env.sh                         .venv/ in the repository (the README's commands call it)
#   EFFB_VENV=/path/to/venv bash tools/setup_env.sh   another venv (created when missing)
#   EFFB_PYTHON=/path/to/python bash tools/setup_env.sh   an existing conda env / venv, in place
#   EFFB_IN_PLACE=1 bash tools/setup_env.sh         the active conda env / venv (`python` on PATH)
#
# Steps (decisions in tools/setup_plan.py; docs/install.md says what each costs):
#   1. torch: the one already in the environment when it is >= 2.1 (CPU or CUDA build: kept);
#      otherwise torch 2.13.0 CPU where no NVIDIA GPU is visible (the local wheel folder, else
#      download.pytorch.org/whl/cpu), the registry's default (CUDA) build where one is
#   2. mmcv 2.1.0 *with ops*, built against that torch: CUDA kernels when torch is a CUDA build and
#      an nvcc of the same major version is found (FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST from the
#      environment, the visible GPUs or the torch build), CPU ops otherwise. The wheel is kept in
#      ~/.cache/effbackbones/mmcv-wheels/<torch>-<cpu|cuXY-smNN>/ (EFFB_MMCV_WHEEL_CACHE), so a CPU
#      and a CUDA build never replace each other; an mmcv 2.1.0 that already loads is kept
#   3. mmengine 0.10.7, mmdet 3.3.0, mmsegmentation 1.2.2 (+ ftfy, regex), pytest (+ pytest-xdist),
#      safetensors, and the deploy runtimes: onnx 1.23.2, onnxruntime 1.32.0, openvino 2026.4.1
#   4. effbackbones itself, editable; then tools/collect_env.py prints what was set up
# A stamp file records a finished set-up, so a second call returns at once.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STAMP_VERSION="8"   # bump when the pinned set below changes

log() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf '\n[setup] ERROR: %s\n' "$*" >&2; exit 1; }

if [ -n "${EFFB_PYTHON:-}" ] || [ "${EFFB_IN_PLACE:-0}" = "1" ]; then
  PY="${EFFB_PYTHON:-$(command -v python || command -v python3 || true)}"
  [ -x "$PY" ] || die "EFFB_PYTHON/EFFB_IN_PLACE: no Python at '${PY}'"
  PREFIX="$("$PY" -c 'import sys; print(sys.prefix)')"
  "$PY" -c 'import os, sys; sys.exit(0 if sys.prefix != sys.base_prefix or os.path.exists(os.path.join(sys.prefix, "conda-meta")) else 1)' \
    || die "$PY is not inside a venv or conda env; installing into the system Python is refused (use EFFB_VENV for a new venv)"
  VENV="$PREFIX"
else
  VENV="${EFFB_VENV:-$ROOT/.venv}"
  PY="$VENV/bin/python"
fi
STAMP="$VENV/.effbackbones-setup-$STAMP_VERSION"
if [ -f "$STAMP" ]; then
  exit 0
fi

if [ ! -x "$PY" ]; then
  PY_BOOT="${PYTHON:-python3}"
  command -v "$PY_BOOT" >/dev/null || die "python3 not found; install Python 3.11 first."
  log "creating virtual environment $VENV"
  "$PY_BOOT" -m venv "$VENV" || die "could not create a venv at $VENV (is python3-venv installed?)"
fi
LOGDIR="$VENV"
PIP=("$PY" -m pip --disable-pip-version-check)
PLAN=("$PY" "$ROOT/tools/setup_plan.py")
# pip install quietly; on failure show the end of its log (without the local-index noise)
pipq() {
  "${PIP[@]}" install -q "$@" > "$LOGDIR/pip.log" 2>&1 && return 0
  grep -v "Location '" "$LOGDIR/pip.log" | tail -30 >&2
  return 1
}

log "1/4 torch"
plan="$("${PLAN[@]}" torch)" || die "tools/setup_plan.py torch failed (above)"
eval "$plan"
if [ "$TORCH_ACTION" = "install" ]; then
  log "     pip install ${TORCH_PIP_ARGS[*]}"
  pipq "${TORCH_PIP_ARGS[@]}" \
    || die "torch could not be installed (pip install ${TORCH_PIP_ARGS[*]}). Install a torch >= 2.1 into $VENV yourself and run the set-up again: it keeps it."
  "$PY" -W ignore - "$TORCH_EXPECT_CPU" <<'PY' || die "the installed torch is not the expected build (see above)"
import sys, torch
expect_cpu = sys.argv[1] == '1'
ok = (not expect_cpu) or torch.version.cuda is None
print(f'[setup] installed torch {torch.__version__} ({"CUDA " + torch.version.cuda if torch.version.cuda else "CPU"} build)', file=sys.stderr)
sys.exit(0 if ok else 1)
PY
fi

# mmcv's setup.py imports pkg_resources, which setuptools >= 70 dropped; torch only needs newer
# setuptools for its own install metadata, not at run time.
log "2/4 build prerequisites (setuptools<70, wheel, ninja, numpy, opencv-python-headless)"
pipq "setuptools<70" wheel ninja "numpy<2.3" opencv-python-headless \
  || die "could not install the build prerequisites (setuptools<70, wheel, ninja, numpy, opencv)"
"$PY" -c "import pkg_resources" 2>/dev/null || die "pkg_resources is missing (setuptools<70 did not install)"

plan="$("${PLAN[@]}" mmcv)" || die "tools/setup_plan.py mmcv failed (above)"
eval "$plan"
if [ "$MMCV_ACTION" = "build" ]; then
  bash "$ROOT/tools/build_mmcv.sh" "$PY" "$MMCV_WHEEL_DIR" "$MMCV_CXX20" "$LOGDIR/mmcv-build.log" "${MMCV_BUILD_ENV[@]}" \
    || die "building mmcv 2.1.0 failed (full log $LOGDIR/mmcv-build.log). It needs gcc/g++, the Python headers and torch installed first$([ "$MMCV_CUDA_OPS" = 1 ] && echo '; for CUDA ops also nvcc and the CUDA headers (EFFB_MMCV_OPS=cpu builds CPU ops only)')."
fi
if [ "$MMCV_ACTION" != "keep" ]; then
  PYTAG="$("$PY" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')"
  whl="$(ls "$MMCV_WHEEL_DIR"/mmcv-2.1.0-"$PYTAG"-*.whl | head -1)"
  "${PIP[@]}" uninstall -q -y mmcv > /dev/null 2>&1 || true
  pipq "$whl" || die "installing $whl failed"
  "$PY" -c "import mmcv.ops" || die "mmcv installed but mmcv.ops does not import: it was built without ops or for another torch."
  if [ "$MMCV_CUDA_OPS" = "1" ]; then
    "$PY" -c "import sys, mmcv.ops; sys.exit(mmcv.ops.get_compiling_cuda_version() == 'not available')" \
      || die "mmcv's ops were built without CUDA kernels although FORCE_CUDA=1 (see $LOGDIR/mmcv-build.log)"
  fi
fi

log "3/4 mmengine 0.10.7, mmdet 3.3.0, mmsegmentation 1.2.2, ftfy, regex, pytest, pytest-xdist, safetensors, onnx, onnxruntime, openvino"
# (torch and setuptools are not named here: pip would try to reconcile torch's metadata, which
# asks for setuptools>=77, with the setuptools<70 mmcv needs; neither is required at run time.)
pipq "mmengine==0.10.7" "mmdet==3.3.0" "mmsegmentation==1.2.2" ftfy regex pycocotools \
  "pytest>=7" "pytest-xdist==3.8.0" "safetensors>=0.4" "numpy<2.3" \
  || die "installing mmengine/mmdet/mmsegmentation failed (log above)"
"$PY" -c "import mmdet, mmseg, mmengine, safetensors" || die "mmdet/mmseg/mmengine/safetensors do not import (see the pip output above)"
# ONNX export and its CPU runtimes (tools/export_onnx.py, tools/test.py --backend, benchmark)
pipq "onnx==1.23.2" "onnxruntime==1.32.0" "openvino==2026.4.1" "numpy<2.3" \
  || die "installing onnx / onnxruntime / openvino failed (log above)"
"$PY" -c "import onnx, onnxruntime, openvino" || die "onnx / onnxruntime / openvino do not import"
pipq "nncf==3.4.0" "onnx==1.23.2" "onnxruntime==1.32.0" "openvino==2026.4.1" "numpy<2.3" || die "installing nncf 3.4.0 (tools/quantize.py) failed (log above)"

log "4/4 effbackbones (editable)"
pipq --no-build-isolation --no-deps -e "$ROOT" || die "installing effbackbones failed"
"$PY" -c "import effbackbones" || die "effbackbones does not import"

touch "$STAMP"
log "done; the environment ($PY):"
"$PY" "$ROOT/tools/collect_env.py" --short || true
