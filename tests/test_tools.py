"""End to end through tools/: train (+ resume after a stop), test, distributed (2 CPU
processes, gloo), converter, FLOPs report, clear errors for missing data / weights.

Runs the real scripts as subprocesses on a tiny synthetic dataset, for mmdet and mmseg.
"""
import glob
import json
import os
import os.path as osp
import platform
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO, load_pack, load_script, make_weights

PY = sys.executable
DET = 'configs/demo/maskrcnn_swiftformer_xs_shapes.py'
SEG = 'configs/demo/semfpn_swiftformer_xs_shapes.py'


def run(args, timeout=600, env=None, check=True):
    e = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    e.update(env or {})
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=e)
    if check and proc.returncode != 0:
        raise AssertionError(f'{" ".join(args)} failed ({proc.returncode}):\n'
                             f'{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}')
    return proc


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    from effbackbones.datasets.synthetic import make_shapes_dataset
    root = str(tmp_path_factory.mktemp('data') / 'shapes')
    make_shapes_dataset(root, num_train=8, num_val=4, size=(128, 160), max_objects=3)
    return root


def det_opts(shapes, epochs):
    r = shapes + '/coco/'
    return ['--cfg-options', f'train_dataloader.dataset.data_root={r}',
            f'val_dataloader.dataset.data_root={r}', f'test_dataloader.dataset.data_root={r}',
            f'val_evaluator.ann_file={r}annotations/instances_val.json',
            f'test_evaluator.ann_file={r}annotations/instances_val.json',
            f'train_cfg.max_epochs={epochs}', f'train_cfg.val_interval={epochs}',
            'default_hooks.checkpoint.interval=1', 'default_hooks.logger.interval=1',
            'train_dataloader.batch_size=2', 'train_dataloader.num_workers=0',
            'val_dataloader.num_workers=0', 'test_dataloader.num_workers=0',
            'randomness.seed=0']


def seg_opts(shapes, iters):
    r = shapes + '/seg/'
    return ['--cfg-options', f'train_dataloader.dataset.data_root={r}',
            f'val_dataloader.dataset.data_root={r}', f'test_dataloader.dataset.data_root={r}',
            f'train_cfg.max_iters={iters}', f'train_cfg.val_interval={iters}',
            f'default_hooks.checkpoint.interval={iters}', 'default_hooks.logger.interval=1',
            'train_dataloader.batch_size=2', 'train_dataloader.num_workers=0',
            'val_dataloader.num_workers=0', 'test_dataloader.num_workers=0',
            'randomness.seed=0']


def _scalars(work_dir):
    recs = []
    for f in sorted(glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json'))):
        recs += [json.loads(line) for line in open(f) if line.strip()]
    return recs


@pytest.mark.slow
def test_mmdet_train_resume_test(shapes, tmp_path):
    wd = str(tmp_path / 'det')
    run([PY, 'tools/train.py', DET, '--work-dir', wd] + det_opts(shapes, 1))
    assert osp.isfile(osp.join(wd, 'epoch_1.pth'))
    # a stopped run resumes from its last checkpoint (torch>=2.6 weights_only load included)
    proc = run([PY, 'tools/train.py', DET, '--work-dir', wd, '--resume'] + det_opts(shapes, 2))
    log = proc.stdout + proc.stderr
    assert re.search(r'resumed epoch: 1, iter: \d+', log), log[-3000:]
    assert osp.isfile(osp.join(wd, 'epoch_2.pth'))
    iters = [r['iter'] for r in _scalars(wd) if 'loss' in r]
    assert iters == sorted(iters) and len(set(iters)) == len(iters)   # no epoch re-trained
    # evaluation with mmdet's CocoMetric, eager and deploy backbone give the same numbers
    proc = run([PY, 'tools/test.py', DET, osp.join(wd, 'epoch_2.pth'), '--work-dir', wd,
                '--show-dir', 'vis'] + det_opts(shapes, 2))
    eager = re.search(r'coco/bbox_mAP: ([\d.-]+)', proc.stdout + proc.stderr)
    assert eager, (proc.stdout + proc.stderr)[-3000:]
    assert glob.glob(osp.join(wd, '*', 'vis', '*.png'))
    proc = run([PY, 'tools/test.py', DET, osp.join(wd, 'epoch_2.pth'), '--work-dir', wd,
                '--deploy'] + det_opts(shapes, 2))
    out = proc.stdout + proc.stderr
    assert 'deploy mode' in out
    deploy = re.search(r'coco/bbox_mAP: ([\d.-]+)', out)
    assert deploy and deploy.group(1) == eager.group(1)


@pytest.mark.slow
def test_mmseg_train_test(shapes, tmp_path):
    wd = str(tmp_path / 'seg')
    run([PY, 'tools/train.py', SEG, '--work-dir', wd] + seg_opts(shapes, 4))
    ckpt = osp.join(wd, 'iter_4.pth')
    assert osp.isfile(ckpt)
    losses = [r['loss'] for r in _scalars(wd) if 'loss' in r]
    assert len(losses) == 4 and all(l == l for l in losses)
    proc = run([PY, 'tools/test.py', SEG, ckpt, '--work-dir', wd, '--show-dir', 'vis']
               + seg_opts(shapes, 4))
    assert re.search(r'mIoU: [\d.]+', proc.stdout + proc.stderr)
    assert len(glob.glob(osp.join(wd, 'vis', '**', '*.png'), recursive=True)) == 4


@pytest.mark.slow
def test_distributed_two_cpu_processes(shapes, tmp_path):
    wd = str(tmp_path / 'dist')
    proc = run(['bash', 'tools/dist_train.sh', SEG, '2', '--work-dir', wd] + seg_opts(shapes, 3),
               env={'PORT': '29517', 'PYTHON': PY})
    out = proc.stdout + proc.stderr
    assert osp.isfile(osp.join(wd, 'iter_3.pth')), out[-3000:]
    assert 'Distributed training: True' in out, out[-3000:]
    assert "type='MMDistributedDataParallel'" in out and 'device_ids=None' in out
    # evaluation split over the two processes, results gathered on rank 0
    proc = run(['bash', 'tools/dist_test.sh', SEG, osp.join(wd, 'iter_3.pth'), '2',
                '--work-dir', wd] + seg_opts(shapes, 3), env={'PORT': '29518', 'PYTHON': PY})
    out = proc.stdout + proc.stderr
    assert 'Distributed training: True' in out and re.search(r'mIoU: [\d.]+', out), out[-3000:]


def test_missing_dataset_says_where_and_how(tmp_path):
    proc = run([PY, 'tools/train.py', 'configs/maskrcnn_swiftformer_l1.py', '--cfg-options',
                f'train_dataloader.dataset.data_root={tmp_path}/coco/',
                f'val_dataloader.dataset.data_root={tmp_path}/coco/'], check=False, timeout=300)
    assert proc.returncode == 2
    assert 'Dataset not found' in proc.stderr and 'cocodataset.org' in proc.stderr
    assert 'instances_train2017.json' in proc.stderr
    proc = run([PY, 'tools/train.py', 'configs/semfpn_swiftformer_xs.py'], check=False,
               timeout=300)
    assert proc.returncode == 2 and 'ADEChallengeData2016' in proc.stderr


def test_missing_imagenet_checkpoint_is_reported_before_training():
    from mmengine.config import Config
    from effbackbones.utils.launch import check_pretrained_files
    cfg = Config.fromfile(osp.join(REPO, 'configs/maskrcnn_swiftformer_l1.py'))
    cfg.model.backbone.init_cfg.checkpoint = '/nonexistent/SwiftFormer_L1.pth'
    with pytest.raises(SystemExit, match=r'(?s)ImageNet checkpoint not found.*init_cfg'):
        check_pretrained_files(cfg)


def test_convert_checkpoint_roundtrip(tmp_path):
    mw = make_weights()
    pack = load_pack('swiftformer', 'xs')
    src = tmp_path / 'SwiftFormer_XS.pth'
    torch.save({'model': mw.state_dict_from_pack(pack)}, src)
    dst = tmp_path / 'clean.pth'
    proc = run([PY, 'tools/convert_checkpoint.py', str(src), str(dst)], timeout=300)
    assert "SwiftFormer(arch='xs')" in proc.stdout
    clean = torch.load(dst, weights_only=True)
    assert all(k.startswith(('stem.', 'stages.', 'out_norms.')) for k in clean)
    from effbackbones.models import SwiftFormer
    m = SwiftFormer('xs', init_cfg=dict(type='Pretrained', checkpoint=str(dst)))
    m.init_weights()
    m.eval()
    with torch.no_grad():
        ok, rep = mw.compare_outputs(list(m(mw.input_from_pack(pack))), pack)
    assert ok, rep
    mm = tmp_path / 'mmdet.pth'
    run([PY, 'tools/convert_checkpoint.py', str(src), str(mm), '--model', 'SwiftFormer',
         '--arch', 'xs', '--mmdet'], timeout=300)
    sd = torch.load(mm, weights_only=True)['state_dict']
    assert set(sd) == {'backbone.' + k for k in clean}
    bad = run([PY, 'tools/convert_checkpoint.py', str(src), str(tmp_path / 'x.pth'), '--model',
               'SwiftFormer', '--arch', 'l3'], check=False, timeout=300)
    assert bad.returncode != 0 and 'fits none' in bad.stderr


def test_get_flops_reports_params_and_flops():
    proc = run([PY, 'tools/get_flops.py', '--model', 'SwiftFormer', '--arch', 'xs', '--shape',
                '224', '224'], timeout=300)
    m = re.search(r'SwiftFormer\s+xs\s+([\d.]+)\s+([\d.]+)', proc.stdout)
    assert m, proc.stdout
    assert float(m.group(1)) == pytest.approx(load_pack('swiftformer', 'xs')['params_dense'] / 1e6,
                                              abs=1e-3)
    assert 0.55 < float(m.group(2)) < 0.65     # paper: 0.6 GMACs at 224 (classifier: +head)
    proc = run([PY, 'tools/get_flops.py', '--config', 'configs/maskrcnn_swiftformer_xs.py',
                '--shape', '256', '320'], timeout=300)
    assert 'backbone + neck' in proc.stdout


def test_benchmark_table_rows_and_output_agreement(tmp_path):
    """The benchmark's table (no timing is asserted): one row per runtime, the counts of
    timed calls, every runtime's outputs equal to eager's, a failing runtime reported in its
    row instead of stopping the run."""
    out = tmp_path / 'bench.md'
    proc = run([PY, 'tools/benchmark.py', '--model', 'MobileFormer', '--arch', '52m',
                '--shape', '64', '96', '--threads', '1', '--repeats', '3', '--burst', '2',
                '--warmup', '1', '--pause-ms', '0', '--no-alternatives', '--runtimes',
                'eager', 'deploy', 'onnxruntime', 'openvino', '--out', str(out)], timeout=300)
    table = out.read_text()
    assert 'median of 3 (p90), interleaved in bursts of 2 back-to-back calls' in table
    # the % column's peak: the best GEMM rate of PyTorch and of each timed runtime (PyTorch's
    # MKL alone ran at half the runtimes' rate on an AMD EPYC)
    m = re.search(r'float32 GEMM rate (\d+) GFLOP/s \(best of ([^)]*)\)', table)
    assert m, table.splitlines()[0]
    rates = {k: int(v) for k, v in (part.split() for part in m.group(2).split(', '))}
    assert sorted(rates) == ['onnxruntime', 'openvino', 'torch'], rates
    assert int(m.group(1)) == max(rates.values()) and min(rates.values()) > 0, m.group(0)
    assert f'cpu ({_benchmark_module().cpu_description()}, 1 thread)' in table
    rows = {r[2]: r for r in (line.split(' | ') for line in table.splitlines()
                              if line.startswith('| MobileFormer |'))}
    assert sorted(rows) == ['deploy', 'eager', 'onnxruntime', 'openvino'], proc.stdout
    for name, row in rows.items():
        assert float(row[3]) > 0 and row[5].endswith('x'), row
        assert float(row[7].rstrip(' |')) < 2e-5, (name, row)     # max rel diff to eager


def _benchmark_module():
    return load_script(osp.join(REPO, 'tools', 'benchmark.py'), 'effb_benchmark')


def test_benchmark_names_the_cpu(tmp_path, monkeypatch):
    """A table's header names the CPU model and the vector features the runtimes' kernels
    depend on (read from /proc/cpuinfo), and a oneDNN cap that makes it run as a lesser CPU;
    without that file, the platform's processor string."""
    bench = _benchmark_module()
    monkeypatch.delenv('ONEDNN_MAX_CPU_ISA', raising=False)
    info = tmp_path / 'cpuinfo'
    info.write_text('processor\t: 0\nmodel name\t: Some CPU 9000\nflags\t\t: fpu sse avx2 '
                    'avx512f avx512_bf16 fma\n\nprocessor\t: 1\nmodel name\t: Other\n')
    assert bench.cpu_description(str(info)) == 'Some CPU 9000 (AVX512-BF16, AVX-512, AVX2)'
    monkeypatch.setenv('ONEDNN_MAX_CPU_ISA', 'AVX2')
    assert bench.cpu_description(str(info)) == ('Some CPU 9000 (AVX512-BF16, AVX-512, AVX2), '
                                                'oneDNN capped to AVX2 (ONEDNN_MAX_CPU_ISA)')
    monkeypatch.delenv('ONEDNN_MAX_CPU_ISA')
    info.write_text('processor\t: 0\nmodel name\t: Old CPU\nflags\t\t: fpu sse sse2\n')
    assert bench.cpu_description(str(info)) == 'Old CPU'
    assert bench.cpu_description(str(tmp_path / 'missing')) == (platform.processor()
                                                                or platform.machine())


def test_benchmark_bfloat16_rows(tmp_path):
    """--dtype bfloat16 on the CPU: eager / deploy run in bfloat16 (their outputs differ from
    the float32 model's), OpenVINO runs the float32 file with bfloat16 inference where the CPU
    has native bf16 (else its row says why not), onnxruntime's row says it has no bfloat16."""
    import openvino as ov
    out = tmp_path / 'bench.md'
    proc = run([PY, 'tools/benchmark.py', '--model', 'MobileFormer', '--arch', '52m',
                '--shape', '64', '96', '--threads', '1', '--repeats', '2', '--burst', '2',
                '--warmup', '1', '--pause-ms', '0', '--no-alternatives', '--dtype', 'bfloat16',
                '--runtimes', 'eager', 'deploy', 'onnxruntime', 'openvino', '--out', str(out)],
               timeout=300)
    table = out.read_text()
    assert 'max rel diff: max|out - eager| / max|eager|, eager in bfloat16' in table
    assert '| max rel diff | max rel diff to float32 eager |' in table
    rows = {r[2]: [c.strip(' |') for c in r] for r in (
        line.split(' | ') for line in table.splitlines() if line.startswith('| MobileFormer |'))}
    assert sorted(rows) == ['deploy', 'eager', 'onnxruntime', 'openvino'], proc.stdout
    assert rows['onnxruntime'][3].startswith('not run: ') and \
        "onnxruntime's CPU provider has no bfloat16 execution" in rows['onnxruntime'][3]
    ran = ['eager', 'deploy']
    if 'BF16' in ov.Core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES'):
        ran.append('openvino')
    else:
        assert rows['openvino'][3].startswith('not run: ') and \
            'needs a CPU with native bf16' in rows['openvino'][3], rows['openvino']
    for name in ran:
        row = rows[name]
        assert float(row[3]) > 0 and row[5].endswith('x'), row
        # measured on a Sapphire Rapids Xeon: up to 1.6e-2 to bfloat16 eager, 1.4e-2 to float32
        assert float(row[7]) < 0.1, (name, row)
        # bfloat16 really ran: float32 runtimes agree with float32 eager to ~1e-6
        assert 1e-3 < float(row[8]) < 0.1, (name, row)


def _write_test_metrics(work_dir, stamp, record):
    """What mmengine writes for a tools/test.py run: ``<stamp>/<stamp>.json``."""
    d = osp.join(work_dir, stamp)
    os.makedirs(osp.join(d, 'vis_data'))
    with open(osp.join(d, 'vis_data', 'scalars.json'), 'w') as f:
        f.write(json.dumps({'loss': 9.0, 'mIoU': -1.0}) + '\n')     # not a test run's
    with open(osp.join(d, stamp + '.json'), 'w') as f:
        f.write(json.dumps(record) + '\n')


def test_summarize_run_compares_a_deploy_metric_to_its_reference(tmp_path):
    """The demo's deploy step: an exported file's metric must match the PyTorch run's last."""
    ref, dep, far = (str(tmp_path / n) for n in ('torch', 'deploy', 'far'))
    _write_test_metrics(ref, '20260101_000000', {'mIoU': 40.0})
    _write_test_metrics(ref, '20260101_000100', {'mIoU': 55.5, 'aAcc': 90.0})     # the last
    _write_test_metrics(dep, '20260101_000200', {'mIoU': 55.5})
    _write_test_metrics(far, '20260101_000200', {'mIoU': 54.0})
    script = 'tools/summarize_run.py'
    same = run([PY, script, dep, '--metric', 'mIoU', '--reference', ref])
    assert 'mIoU: 55.5 (PyTorch 55.5' in same.stdout and '-> same' in same.stdout
    differ = run([PY, script, far, '--metric', 'mIoU', '--reference', ref], check=False)
    assert differ.returncode == 4 and 'DIFFERENT' in differ.stdout
    loose = run([PY, script, far, '--metric', 'mIoU', '--reference', ref, '--tolerance', '2'])
    assert '-> within (tolerance 2.0)' in loose.stdout     # not equal: not 'same'
    missing = run([PY, script, dep, '--metric', 'coco/bbox_mAP', '--reference', ref],
                  check=False)
    assert missing.returncode == 1 and f'no coco/bbox_mAP in {dep}' in missing.stderr


def test_benchmark_int8_rows(tmp_path):
    """The opt-in low-precision columns: the OpenVINO file's NNCF INT8 quantization, its float
    layers in float32 (openvino-int8) and in bfloat16 (openvino-int8-bf16, where the CPU has
    native bf16; else its row says why not), both near the float32 model and not equal to it."""
    import openvino as ov
    out = tmp_path / 'bench.md'
    proc = run([PY, 'tools/benchmark.py', '--model', 'EfficientFormerV2', '--arch', 's0',
                '--shape', '64', '64', '--threads', '1', '--repeats', '2', '--burst', '2',
                '--warmup', '1', '--pause-ms', '0', '--no-alternatives',
                '--runtimes', 'eager', 'openvino', 'openvino-int8', 'openvino-int8-bf16',
                '--out', str(out)], timeout=300)
    table = out.read_text()
    assert 'nncf ' in table.splitlines()[0], table.splitlines()[0]
    rows = {r[2]: [c.strip(' |') for c in r] for r in (
        line.split(' | ') for line in table.splitlines()
        if line.startswith('| EfficientFormerV2 |'))}
    assert sorted(rows) == ['eager', 'openvino', 'openvino-int8', 'openvino-int8-bf16'], \
        proc.stdout
    from effbackbones.deploy.contract import BF16_ISA_WORDS, isa_capped_below
    ran = ['openvino-int8']
    if 'BF16' in ov.Core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES') and \
            not isa_capped_below(BF16_ISA_WORDS):
        ran.append('openvino-int8-bf16')
    else:
        assert rows['openvino-int8-bf16'][3].startswith('not run: '), rows
    for name in ran:
        row = rows[name]
        assert float(row[3]) > 0 and row[5].endswith('x'), row
        # quantized: further from eager than float32's ~1e-6, within a few % of its maps
        assert 1e-3 < float(row[7]) < 0.3, (name, row)
