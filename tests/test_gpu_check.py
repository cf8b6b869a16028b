"""tools/gpu_check.sh in its CPU dry run: the same steps as on a GPU machine, small."""
import os
import os.path as osp
import subprocess
import sys

import pytest

from conftest import REPO, reference_dir


@pytest.mark.slow
def test_gpu_check_dry_run_passes_and_prints_the_summary():
    # the interpreter running the suite (whichever environment tools/setup_env.sh set up)
    env = dict(os.environ, EFFB_GPU_CHECK_DRY_RUN='1', EFFB_REFERENCE_DIR=reference_dir(),
               OMP_NUM_THREADS='1', EFFB_PYTHON=sys.executable)
    out = subprocess.run(['bash', osp.join(REPO, 'tools', 'gpu_check.sh'), '--iters', '2'],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert 'MMCV ops' in text  # the environment first
    summary = text[text.index('[gpu_check] summary'):]
    for family in ('swiftformer', 'efficientformer', 'efficientformerv2', 'levit',
                   'mobileformer'):
        assert f'| {family} ' in summary
    assert summary.count('float32 parity (cpu)') == 5
    assert summary.count('bfloat16 autocast') == 5
    assert 'maskrcnn_swiftformer_xs_shapes 2 iters (cpu)' in summary
    assert 'semfpn_swiftformer_xs_shapes 2 iters (cpu)' in summary
    assert 'images/s' in summary and 'FAIL' not in summary
