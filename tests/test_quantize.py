"""Post-training INT8 (effbackbones.deploy.quantize, tools/quantize.py; docs/int8.md).

* one small variant of each family quantized by NNCF on a few synthetic scenes: the OpenVINO IR
  runs its convolutions / matrix multiplies in int8 and its maps are within the family's bound
  of PyTorch float32 on other scenes; the ONNX QDQ file the same in onnxruntime;
* a file for CPUs without VNNI (--cpu avx2) keeps its accuracy on AVX2 int8 kernels, a VNNI
  file is refused there;
* the bound refuses a file (nothing written, the message says how to override), --force writes
  it; requests that cannot be met exit 2 with what to do;
* the INT8 Semantic FPN file evaluated by tools/test.py --backend openvino gives a metric line.
"""
import os
import os.path as osp
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO, load_script
from test_export import SEG, _metrics, semfpn  # noqa: F401  (the Semantic FPN fixture)

PY = sys.executable
SHAPE = (64, 64)
# the smallest variant of each family (Mobile-Former: the smallest whose multiplier depthwise
# convs are split, 26M's grouped readers keep them whole)
FAMILIES = [('SwiftFormer', 'xs', {}), ('EfficientFormer', 'l1', {}),
            ('EfficientFormerV2', 's0', {}), ('LeViT', '128s', dict(out_indices=(0, 1, 2, 3))),
            ('MobileFormer', '52m', {})]


def _quantize_tool():
    return load_script(osp.join(REPO, 'tools/quantize.py'), 'tools_quantize')


# OpenVINO for every family; the QDQ file for onnxruntime for a conv-attention hybrid and an
# all-attention family (the suite's time: each quantization exports and calibrates anew)
CASES = [f + ('openvino',) for f in FAMILIES] + \
    [f + ('onnxruntime',) for f in FAMILIES if f[0] in ('SwiftFormer', 'LeViT')]


@pytest.mark.parametrize('cls_name,arch,kw,backend', CASES,
                         ids=[f'{c[0]}-{c[3]}' for c in CASES])
def test_int8_file_near_float32(cls_name, arch, kw, backend, tmp_path, capfd):
    """The INT8 file of each family, in the runtime it is written for: on the held-out scenes
    the tool checked it on, every map within the family's bound of PyTorch float32 (mean
    relative error; recomputed here), and measurably not the float file; in OpenVINO most
    compute layers really run in int8, as the tool's log says, and NNCF's per-node info lines
    stay out of it."""
    from effbackbones.deploy import RuntimeSession, build_backbone
    from effbackbones.deploy.contract import cpu_int8_kind
    from effbackbones.deploy.quantize import (compute_layer_precisions, in_scopes, quantize,
                                              recipe_for, synthetic_images)
    torch.manual_seed(0)
    model = build_backbone(cls_name, arch, **kw)
    out = str(tmp_path / ('int8.xml' if backend == 'openvino' else 'int8.onnx'))
    calib, check = synthetic_images(8, SHAPE, seed=0), synthetic_images(2, SHAPE, seed=1)
    logs = []
    report = quantize(model, SHAPE, out, calib, check, backend=backend, log=logs.append)
    assert 'Not adding activation input quantizer' not in capfd.readouterr().out
    bound = recipe_for(model).bound
    session = RuntimeSession(out, backend, threads=1)
    assert session.metadata['effbackbones.precision'] == 'int8'
    # the file's own output names (OpenVINO also knows the nodes' names of those tensors)
    assert [name for name, _, _ in report] == session.output_names == \
        [f'out_{i}' for i in range(len(report))]
    # the tool's measure: mean|int8 - fp32| / mean|fp32| over all held-out images, per map
    diff, ref = 0, 0
    for x in check:
        with torch.no_grad():
            refs = model(x)
        diff = diff + torch.stack([(o - r).abs().sum() for o, r in zip(session(x), refs)])
        ref = ref + torch.stack([r.abs().sum() for r in refs])
    errors = (diff / ref).tolist()
    assert errors == pytest.approx([mean for _, _, mean in report], rel=1e-3, abs=1e-6)
    assert 1e-4 < max(errors) <= bound, errors
    if backend == 'openvino':
        scopes = recipe_for(model).float_scopes
        layers = compute_layer_precisions(out, threads=1)
        # what the recipe keeps float is float (Mobile-Former's token path), the rest quantized
        kept = [p for name, _, p in layers if in_scopes(name, scopes)]
        assert bool(kept) == bool(scopes) and set(kept) <= {'f32'}, kept
        layers = [layer for layer in layers if not in_scopes(layer[0], scopes)]
        in_float = {(kind, name) for name, kind, p in layers if p not in ('i8', 'u8')}
        assert len(in_float) <= 0.25 * len(layers), sorted(in_float)
        said = [line for line in logs if line.startswith('OpenVINO runs ')]
        assert said and said[0].startswith(
            f'OpenVINO runs {len(layers) - len(in_float)} of {len(layers)} quantized compute '
            f'layers in int8 on this CPU'), said
        if kept:
            assert said[0].endswith(f"; {len(kept)} more in float by the recipe's float "
                                    f"scopes"), said
        else:
            assert 'by the recipe' not in said[0], said
        if cpu_int8_kind() == 'vnni':
            # every convolution and fully-connected layer in int8, depthwise ones included
            # (their weights constant-folded before NNCF); only activation x activation MatMuls
            # stay float (V2's stride-32 attention). AVX2 int8 kernels leave some of V2's
            # depthwise convolutions float.
            assert {kind for kind, _ in in_float} <= {'MatMul'}, sorted(in_float)
        if cls_name == 'MobileFormer':
            # the split multiplier depthwise convs are activated per part (the OpenVINO stand-in),
            # so their parts are concatenated in int8
            concats = _runtime_precisions(out, 'Concatenation')
            assert concats and set(concats.values()) <= {'u8', 'i8'}, concats


def _runtime_precisions(path, layer_type):
    """{name: output precision} of the layers of ``layer_type`` in OpenVINO's compiled ``path``."""
    import openvino as ov
    runtime = ov.Core().compile_model(path, 'CPU', {'INFERENCE_PRECISION_HINT': 'f32'})
    return {op.get_friendly_name(): op.get_rt_info()['outputPrecisions'].astype(str)
            for op in runtime.get_runtime_model().get_ops()
            if op.get_rt_info()['layerType'].astype(str) == layer_type}


def test_bound_refuses_and_force_writes(tmp_path, capsys):
    tool = _quantize_tool()
    out = tmp_path / 'sf.xml'
    args = ['--model', 'SwiftFormer', '--arch', 'xs', '--shape', '64', '64', '--synthetic-calib',
            '--calib', '2', '--check', '1', '--out', str(out)]
    assert tool.main(args + ['--bound', '1e-6']) == 3
    err = capsys.readouterr().err
    assert 'above the bound 1e-06' in err and '--force' in err and 'not written' in err
    assert not out.exists() and not (tmp_path / 'sf.bin').exists()
    assert tool.main(args + ['--bound', '1e-6', '--force']) == 0
    log = capsys.readouterr().out
    assert 'SYNTHETIC' in log and 'ABOVE BOUND' in log and 'FORCED above the bound' in log
    assert out.exists() and (tmp_path / 'sf.bin').exists()


@pytest.mark.parametrize('args,message', [
    (['--model', 'SwiftFormer', '--arch', 'xs', '--shape', '64', '64'],
     r'--calib-dir DIR .* or --synthetic-calib'),
    (['--model', 'SwiftFormer', '--arch', 'xs', '--shape', '64', '64', '--calib-dir', 'no/dir'],
     r'--calib-dir no/dir: not a folder'),
    (['--model', 'SwiftFormer', '--arch', 'xs', '--shape', '64', '64', '--synthetic-calib',
      '--backend', 'onnxruntime'], r'writes a \.onnx file'),
    ([SEG], r'CONFIG needs CHECKPOINT'),
    ([], r'give CONFIG CHECKPOINT, or --model'),
])
def test_quantize_tool_clear_errors(args, message, tmp_path, capsys):
    assert _quantize_tool().main(args + ['--out', str(tmp_path / 'x.xml')]) == 2
    assert re.search(message, capsys.readouterr().err), message
    assert not (tmp_path / 'x.xml').exists()


def test_calib_dir_needs_enough_images(tmp_path, capsys):
    import cv2
    import numpy as np
    for i in range(3):
        cv2.imwrite(str(tmp_path / f'{i}.png'), np.full((40, 50, 3), 40 * i, np.uint8))
    args = ['--model', 'SwiftFormer', '--arch', 'xs', '--shape', '64', '64', '--calib-dir',
            str(tmp_path), '--calib', '3', '--out', str(tmp_path / 'x.xml')]
    assert _quantize_tool().main(args) == 2
    assert 'holds 3 images' in capsys.readouterr().err


@pytest.mark.slow
def test_tools_test_evaluates_the_int8_semfpn(semfpn, tmp_path, capsys):  # noqa: F811
    """tools/quantize.py CONFIG CHECKPOINT (calibration on the config's train image through its
    test pipeline, the error on its test images), then tools/test.py with the IR in OpenVINO:
    a metric line, and the log says the file is int8."""
    out = str(tmp_path / 'semfpn_int8.xml')
    data = f'{semfpn["root"]}'
    opts = ['--cfg-options', f'train_dataloader.dataset.data_root={data}',
            f'test_dataloader.dataset.data_root={data}']
    assert _quantize_tool().main([SEG, semfpn['ckpt'], '--out', out, '--calib', '1',
                                  '--check', '2'] + opts) == 0
    log = capsys.readouterr().out
    assert 'seg_logits: max|int8-fp32|/max|fp32|' in log
    env = dict(__import__('os').environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    proc = subprocess.run([PY, 'tools/test.py', SEG, out, '--backend', 'openvino',
                           '--work-dir', str(tmp_path / 'wd'), '--cfg-options',
                           f'test_dataloader.dataset.data_root={data}'],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    log = proc.stdout + proc.stderr
    assert 'int8 file) runs in openvino' in log
    assert float(_metrics(log)[1]) >= 0


@pytest.mark.parametrize('flags,cap,kind', [
    ('fpu sse avx2 avx512f avx512_vnni', '', 'vnni'),
    ('fpu avx2 avx_vnni', '', 'vnni'),
    ('fpu avx2 avx512f amx_int8 amx_tile', '', 'vnni'),
    ('fpu avx2 fma', '', 'avx2'),                               # AVX2 only
    ('fpu avx2 avx512f', '', 'avx2'),                           # AVX-512 without VNNI
    ('fpu avx2 avx512f avx512_vnni amx_int8', 'AVX2', 'avx2'),  # oneDNN capped below VNNI
    ('fpu avx2 avx512f avx512_vnni', 'AVX512_CORE_VNNI', 'vnni'),
    ('fpu avx2 avx512f avx512_vnni', 'AVX512_CORE', 'avx2'),
])
def test_cpu_int8_kind(flags, cap, kind, tmp_path, monkeypatch):
    """Which int8 kernels the runtimes get: VNNI / AMX dot products, or AVX2's saturating ones
    (also where ONEDNN_MAX_CPU_ISA, which OpenVINO honours, caps the CPU below VNNI)."""
    from effbackbones.deploy.contract import cpu_int8_kind
    info = tmp_path / 'cpuinfo'
    info.write_text(f'processor\t: 0\nmodel name\t: X\nflags\t\t: {flags}\n')
    monkeypatch.setenv('ONEDNN_MAX_CPU_ISA', cap)
    assert cpu_int8_kind(str(info)) == kind
    assert cpu_int8_kind(str(tmp_path / 'missing')) is None


AVX2_CHECK = r'''
import sys, torch
sys.path.insert(0, {repo!r})
from effbackbones.deploy import RuntimeSession, build_backbone
from effbackbones.deploy.quantize import synthetic_images
torch.manual_seed(0)
model = build_backbone('MobileFormer', '26m')
try:
    RuntimeSession({vnni!r}, 'openvino', threads=1)
except ValueError as exc:
    print('REFUSED', exc)
session = RuntimeSession({avx2!r}, 'openvino', threads=1)
diff = ref = 0
for x in synthetic_images(2, (64, 64), seed=1):
    with torch.no_grad():
        refs = model(x)
    diff = diff + torch.stack([(o - r).abs().sum() for o, r in zip(session(x), refs)])
    ref = ref + torch.stack([r.abs().sum() for r in refs])
print('ERRORS', *(diff / ref).tolist())
'''


def test_int8_for_cpus_without_vnni(tmp_path):
    """--cpu avx2 (NNCF's overflow fix) gives a file that keeps its accuracy on AVX2 int8
    kernels (OpenVINO with oneDNN capped to AVX2 in a subprocess); a VNNI file is refused
    there, with what to do, instead of running with saturated sums."""
    from effbackbones.deploy import build_backbone, export
    from effbackbones.deploy.quantize import (QuantizeError, quantize, quantize_file, recipe_for,
                                              synthetic_images)
    from effbackbones.deploy.runtime import read_metadata
    torch.manual_seed(0)
    model = build_backbone('MobileFormer', '26m')
    calib, check = synthetic_images(8, SHAPE, seed=0), synthetic_images(2, SHAPE, seed=1)
    # both files from one float file, without the tool's check (which runs the file here: a
    # VNNI file cannot run on a CI machine without VNNI)
    float_path = str(tmp_path / 'float32.onnx')
    export(model, SHAPE, float_path, runtime='openvino', form='int8', log=lambda *_: None)
    paths = {}
    for cpu in ('vnni', 'avx2'):
        paths[cpu] = str(tmp_path / f'{cpu}.xml')
        quantize_file(float_path, paths[cpu], calib, recipe_for(model), 'openvino', cpu)
        assert read_metadata(paths[cpu])['effbackbones.int8_cpu'] == cpu
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA='AVX2', OMP_NUM_THREADS='1')
    proc = subprocess.run([PY, '-c', AVX2_CHECK.format(repo=REPO, **paths)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'REFUSED' in proc.stdout and '--cpu avx2' in proc.stdout, proc.stdout
    errors = [float(e) for e in proc.stdout.split('ERRORS')[1].split()]
    assert len(errors) == 4 and max(errors) <= recipe_for(model).bound, errors
    # and a VNNI file cannot be made (nor checked) where the CPU has no VNNI
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('ONEDNN_MAX_CPU_ISA', 'AVX2')
        with pytest.raises(QuantizeError, match='--cpu avx2'):
            quantize(model, SHAPE, str(tmp_path / 'x.xml'), calib, check, cpu='vnni',
                     log=lambda *_: None)
