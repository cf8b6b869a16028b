#!/usr/bin/env bash
# One-time, idempotent environment set-up for effbackbones on a fresh CPU machine.
#
#   bash tools/setup_env.sh        (the README's commands call it for you)
#
# Creates .venv/ in the repository and installs, in the only order that works here:
#   1. torch 2.13.0 CPU (pinned, from the local wheel folder: never a CUDA build from the registry)
#   2. mmcv 2.1.0 *with ops*, built from source (~10-20 min on 2 cores the first time; pip caches
#      the wheel afterwards so later runs take seconds)
#   3. mmengine 0.10.7, mmdet 3.3.0, mmsegmentation 1.2.2 (+ ftfy, regex), pytest (+ pytest-xdist:
#      tools/run_tests.sh runs the suite on every core), and the deploy
#      runtimes: onnx 1.23.2, onnxruntime 1.32.0, openvino 2026.4.1 (CPU wheels; docs/deploy.md)
#   4. effbackbones itself, editable
# A stamp file records a finished set-up, so a second call returns at once.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EFFB_VENV:-$ROOT/.venv}"
PY_BOOT="${PYTHON:-python3}"
STAMP_VERSION="6"   # bump when the pinned set below changes
STAMP="$VENV/.effbackbones-setup-$STAMP_VERSION"

log() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf '\n[setup] ERROR: %s\n' "$*" >&2; exit 1; }

if [ -f "$STAMP" ]; then
  exit 0
fi

command -v "$PY_BOOT" >/dev/null || die "python3 not found; install Python 3.11 first."
if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment $VENV"
  "$PY_BOOT" -m venv "$VENV" || die "could not create a venv at $VENV (is python3-venv installed?)"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
# pip install quietly; on failure show the end of its log (without the local-index noise)
pipq() {
  "${PIP[@]}" install -q "$@" > "$VENV/pip.log" 2>&1 && return 0
  grep -v "Location '" "$VENV/pip.log" | tail -30 >&2
  return 1
}

log "1/4 torch==2.13.0 (CPU wheel from the local wheel folder)"
pipq "torch==2.13.0" \
  || die "torch 2.13.0 CPU could not be installed. 'pip config list' must show the local wheel folder that holds torch-2.13.0+cpu."
"$PY" - <<'PY' || die "the installed torch is not the CPU build 2.13.0"
import torch, sys
v = torch.__version__
sys.exit(0 if v.startswith('2.13.0') and torch.version.cuda is None else 1)
PY

# mmcv's setup.py imports pkg_resources, which setuptools >= 70 dropped; torch only needs newer
# setuptools for its own install metadata, not at run time.
log "2/4 build prerequisites (setuptools<70, wheel, ninja, numpy, opencv-python-headless)"
pipq "setuptools<70" wheel ninja "numpy<2.3" opencv-python-headless \
  || die "could not install the build prerequisites (setuptools<70, wheel, ninja, numpy, opencv)"
"$PY" -c "import pkg_resources" 2>/dev/null || die "pkg_resources is missing (setuptools<70 did not install)"

if "$PY" -c "import mmcv, mmcv.ops; assert mmcv.__version__=='2.1.0'" 2>/dev/null; then
  log "     mmcv 2.1.0 with ops already present"
else
  log "     building mmcv==2.1.0 with ops: 10-20 minutes on 2 cores the first time (cached afterwards)."
  log "     progress is printed every 60 s; full log: $VENV/mmcv-build.log"
  (
    while sleep 60; do log "     ... still building mmcv ($(grep -c 'Compiling\|\.o$\|ninja\|\[[0-9]*/[0-9]*\]' "$VENV/mmcv-build.log" 2>/dev/null || echo 0) log lines of compile steps)"; done
  ) &
  ticker=$!
  set +e
  MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" \
    "${PIP[@]}" install --no-build-isolation -v "mmcv==2.1.0" > "$VENV/mmcv-build.log" 2>&1
  rc=$?
  set -e
  kill "$ticker" 2>/dev/null || true
  if [ $rc -ne 0 ]; then
    tail -40 "$VENV/mmcv-build.log" >&2
    die "building mmcv 2.1.0 failed (log above, full log $VENV/mmcv-build.log). It needs gcc/g++, the Python headers and torch installed first."
  fi
  "$PY" -c "import mmcv.ops" || die "mmcv installed but mmcv.ops does not import: it was built without ops."
fi

log "3/4 mmengine 0.10.7, mmdet 3.3.0, mmsegmentation 1.2.2, ftfy, regex, pytest, pytest-xdist, onnx, onnxruntime, openvino"
# (torch and setuptools are not named here: pip would try to reconcile torch's metadata, which
# asks for setuptools>=77, with the setuptools<70 mmcv needs; neither is required at run time.)
pipq "mmengine==0.10.7" "mmdet==3.3.0" "mmsegmentation==1.2.2" ftfy regex pycocotools \
  "pytest>=7" "pytest-xdist==3.8.0" "numpy<2.3" || die "installing mmengine/mmdet/mmsegmentation failed (log above)"
"$PY" -c "import mmdet, mmseg, mmengine" || die "mmdet/mmseg/mmengine do not import (see the pip output above)"
# ONNX export and its CPU runtimes (tools/export_onnx.py, tools/test.py --backend, benchmark)
pipq "onnx==1.23.2" "onnxruntime==1.32.0" "openvino==2026.4.1" "numpy<2.3" \
  || die "installing onnx / onnxruntime / openvino failed (log above)"
"$PY" -c "import onnx, onnxruntime, openvino" || die "onnx / onnxruntime / openvino do not import"
pipq "nncf==3.4.0" "onnx==1.23.2" "onnxruntime==1.32.0" "openvino==2026.4.1" "numpy<2.3" || die "installing nncf 3.4.0 (tools/quantize.py) failed (log above)"

log "4/4 effbackbones (editable)"
pipq --no-build-isolation --no-deps -e "$ROOT" || die "installing effbackbones failed"
"$PY" -c "import effbackbones" || die "effbackbones does not import"

touch "$STAMP"
log "done: $("$PY" -c 'import torch,mmcv,mmengine,mmdet,mmseg,onnxruntime,openvino;print(f"torch {torch.__version__}, mmcv {mmcv.__version__}, mmengine {mmengine.__version__}, mmdet {mmdet.__version__}, mmseg {mmseg.__version__}, onnxruntime {onnxruntime.__version__}, openvino {openvino.__version__}")')"
