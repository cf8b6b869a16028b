"""Post-training INT8 quantization (NNCF) of the files :mod:`.export` writes.

The float32 graph is exported first with :func:`~effbackbones.deploy.export.export` (deploy form,
static unless asked otherwise, tuned for the runtime's int8 kernels: ``form='int8'``,
parity-checked), then quantized by NNCF on calibration images:

* ``backend='openvino'``: the ONNX file converted by ``ov.convert_model`` (constants folded),
  ``nncf.quantize`` on the ``ov.Model`` -> an OpenVINO IR (``.xml`` + ``.bin``) with FakeQuantize
  ops, which OpenVINO runs with int8 kernels (VNNI / AMX where the CPU has them);
* ``backend='onnxruntime'``: ``nncf.quantize`` on the ONNX model -> a QDQ ``.onnx``
  (QuantizeLinear / DequantizeLinear pairs), which onnxruntime fuses into int8 kernels.

Each family gets the settings of :data:`RECIPES` (why each, with the measured errors:
docs/int8.md); a file is made for the CPUs of one kind (``cpu``: ``vnni`` or ``avx2``, NNCF's
overflow fix, :data:`~.contract.INT8_CPUS`) and says so in its metadata. The quantized file is
compared with the float32 file in the same runtime on held-out images (per output:
``max|int8 - fp32| / max|fp32|`` and ``mean|int8 - fp32| / mean|fp32|``); a file whose worst
mean-relative error is above the family's bound is not written (:class:`BoundError`) unless
``force``.
"""
import contextlib
import dataclasses
import logging
import os
import os.path as osp
import re
import shutil
import tempfile

import numpy as np
import torch

from .contract import INT8_CPU_KEY, INT8_CPUS, PRECISION_KEY, cpu_int8_kind
from .export import ExportError, export

#: the runtimes a quantized file is written for, and the file each writes
QUANT_BACKENDS = {'openvino': '.xml', 'onnxruntime': '.onnx'}


class QuantizeError(ExportError):
    """A quantization request that cannot be satisfied (the message says what to do)."""


class BoundError(RuntimeError):
    """The INT8 file is further from float32 than the bound: it was not written."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """NNCF settings of one family.

    ``transformer``: ``nncf.ModelType.TRANSFORMER`` (NNCF then quantizes only the inputs of
    convolutions and MatMuls, activation x activation MatMuls symmetric, and leaves the
    element-wise and normalisation ops -- residual / attention-bias adds, products, LayerNorm /
    GroupNorm -- in float); ``smooth_quant``: SmoothQuant alpha for MatMuls (-1: off), which
    moves activation outliers into the weights; ``float_scopes``: regular expressions of node
    names (matched from the start; the ONNX file's names, which OpenVINO's model keeps) whose
    inputs stay unquantized; ``bound``: the largest accepted mean-relative error
    (``mean|int8 - fp32| / mean|fp32|``) of any output against float32 (the max-relative error
    is reported, not bounded: one pixel of the ~1e5 of a map decides it, and it varies 2x
    between calibrations of the same model)."""
    transformer: bool = True
    smooth_quant: float = -1.0
    float_scopes: tuple = ()
    bound: float = 0.1
    why: str = ''


#: Mobile-Former's token path by node name: the bridges and the Former, and each block's merged
#: linears on the updated tokens (``MatMul``: bridge keys / values and the hyper functions'
#: first layer, ``Gemm``: their second layer)
MOBILE_FORMER_TOKEN_PATH = (r'.*/features\.\d+/(local_global|global_local|global_block)/',
                            r'.*/features\.\d+/(MatMul|Gemm)')

#: per family (backbone class name); chosen from the sweep in docs/int8.md (transformer type
#: against the default CNN type and SmoothQuant 0.95, per-map errors on held-out images)
RECIPES = {
    'SwiftFormer': Recipe(why='transformer type: its normalisation / layer-scale products stay '
                              'float (CNN type: deeper maps 1.1-1.2x worse); SmoothQuant: no '
                              'change'),
    'EfficientFormer': Recipe(why='transformer type: GroupNorm / LayerNorm inputs stay float (CNN '
                                  'type: stride-4 map 10x worse); SmoothQuant: no change'),
    'EfficientFormerV2': Recipe(why='transformer type (CNN type: every map 1.1-1.2x worse); '
                                    'SmoothQuant: no change'),
    # the last stage's maps (2x2-7x7 tokens at 64-224 px) reach 0.07-0.1 on random weights
    'LeViT': Recipe(bound=0.15, why='transformer type (CNN type the same within noise); '
                                    'SmoothQuant off: last stage 1.7x worse with it'),
    'MobileFormer': Recipe(
        float_scopes=MOBILE_FORMER_TOKEN_PATH,
        why='transformer type: dynamic-ReLU products and bridge adds stay float (CNN type: '
            'deeper maps 1.6-2.5x worse); SmoothQuant: no gain; the token path (bridges, '
            'Former, token linears) left float: its MatMuls mix the maps with 6 tokens or see '
            '6 tokens only, int8 kernels save nothing there and FakeQuantize work and error '
            'grow'),
}


def recipe_for(backbone):
    """The :class:`Recipe` of ``backbone``'s family (a default transformer recipe for a class
    not in :data:`RECIPES`)."""
    return RECIPES.get(type(backbone).__name__, Recipe(why='default'))


def nncf_arguments(recipe, backend, cpu='vnni'):
    """Keyword arguments of ``nncf.quantize`` for ``recipe`` in ``backend``, for the CPUs
    ``cpu`` (:data:`~.contract.INT8_CPUS`; ``avx2``: NNCF's overflow fix on every layer)."""
    import nncf
    from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters,
                                                       AdvancedSmoothQuantParameters,
                                                       OverflowFix)
    if cpu not in INT8_CPUS:
        raise QuantizeError(f'--cpu must be one of {INT8_CPUS}, got {cpu!r}')
    kwargs = {}
    if recipe.transformer:
        kwargs['model_type'] = nncf.ModelType.TRANSFORMER
    if recipe.float_scopes:
        kwargs['ignored_scope'] = nncf.IgnoredScope(patterns=list(recipe.float_scopes),
                                                    validate=False)
    kwargs['advanced_parameters'] = AdvancedQuantizationParameters(
        smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=recipe.smooth_quant),
        overflow_fix=OverflowFix.ENABLE if cpu == 'avx2' else OverflowFix.FIRST_LAYER)
    return kwargs


# --------------------------------------------------------------------------------------------
# calibration images
# --------------------------------------------------------------------------------------------
#: ImageNet normalisation of the backbones' pre-training (the configs' data_preprocessor)
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')


def _normalised(rgb, shape):
    import cv2
    h, w = shape
    img = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    img = (img - np.float32(MEAN)) / np.float32(STD)
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]


def images_from_dir(folder, count, shape, skip=0):
    """``count`` images of ``folder`` (sorted by name, after the first ``skip``), resized to
    ``shape`` and normalised as the backbones' pre-training: ``(1, 3, H, W)`` tensors."""
    import cv2
    if not osp.isdir(folder):
        raise QuantizeError(f'--calib-dir {folder}: not a folder')
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    if len(names) < skip + count:
        raise QuantizeError(f'--calib-dir {folder} holds {len(names)} images '
                            f'({"/".join(IMAGE_EXTENSIONS)}); {skip + count} are needed '
                            f'({skip} calibration + {count} held out): add images or lower '
                            f'--calib / --check')
    out = []
    for n in names[skip:skip + count]:
        bgr = cv2.imread(osp.join(folder, n), cv2.IMREAD_COLOR)
        if bgr is None:
            raise QuantizeError(f'cannot read image {osp.join(folder, n)}')
        out.append(_normalised(bgr[..., ::-1], shape))
    return out


def synthetic_images(count, shape, seed=0):
    """``count`` synthetic shapes scenes (:mod:`effbackbones.datasets.synthetic`), normalised as
    :func:`images_from_dir`: calibration for a bare backbone when no images are at hand (the
    scales they give fit these scenes, not a real dataset)."""
    from ..datasets.synthetic import draw_scene
    rs = np.random.RandomState(seed)
    h, w = shape
    return [_normalised(draw_scene(rs, h, w, 4)[0][..., ::-1], shape) for _ in range(count)]


def config_inputs(model, cfg, split, count):
    """The first ``count`` images of the config's ``split`` dataloader's dataset
    (``'train'`` / ``'test'``) through the config's *test* pipeline and the model's
    ``data_preprocessor``: the tensors the exported part gets in ``tools/test.py``."""
    import copy

    from mmengine.registry import DefaultScope
    from mmengine.runner import Runner

    from ..utils.launch import detect_toolbox
    loader = copy.deepcopy(cfg.get(f'{split}_dataloader'))
    if loader is None:
        raise QuantizeError(f'the config has no {split}_dataloader to take images from')
    # calibration sees the images as a test run does: the test pipeline, one image per batch
    loader.dataset.pipeline = copy.deepcopy(cfg.test_dataloader.dataset.pipeline)
    loader.update(batch_size=1, num_workers=0, persistent_workers=False,
                  sampler=dict(type='DefaultSampler', shuffle=False))
    loader.pop('batch_sampler', None)
    with DefaultScope.overwrite_default_scope(detect_toolbox(cfg)):
        data = Runner.build_dataloader(loader)
        if len(data.dataset) < count:
            raise QuantizeError(f'the config\'s {split} set has {len(data.dataset)} images, '
                                f'{count} asked for: lower --calib / --check')
        out = []
        with torch.no_grad():
            for batch in data:
                if len(out) == count:
                    break
                out.append(model.data_preprocessor(batch, False)['inputs'].float())
    return out


# --------------------------------------------------------------------------------------------
# quantization, error, writing
# --------------------------------------------------------------------------------------------
def _runtime_session(path, backend):
    from .runtime import RuntimeSession
    return RuntimeSession(path, backend)


def error_report(float_path, int8_path, backend, inputs):
    """Per output of the two files, run in ``backend`` on ``inputs``: ``(name, max_rel,
    mean_rel)`` with ``max_rel = max|int8 - fp32| / max|fp32|`` and ``mean_rel =
    mean|int8 - fp32| / mean|fp32|`` over all inputs."""
    ref_session = _runtime_session(float_path, backend)
    q_session = _runtime_session(int8_path, backend)
    stats = None
    for x in inputs:
        ref, got = ref_session(x), q_session(x)
        if stats is None:
            stats = [[0.0, 0.0, 0.0, 0.0] for _ in ref]   # max|d|, max|r|, sum|d|, sum|r|
        for s, r, g in zip(stats, ref, got):
            d = (g.float() - r.float()).abs()
            s[0] = max(s[0], d.max().item())
            s[1] = max(s[1], r.abs().max().item())
            s[2] += d.sum().item()
            s[3] += r.abs().sum().item()
    return [(name, s[0] / max(s[1], 1e-30), s[2] / max(s[3], 1e-30))
            for name, s in zip(ref_session.output_names, stats)]


#: OpenVINO's CPU layer types that carry the multiply-adds (what int8 kernels speed up)
COMPUTE_LAYERS = ('Convolution', 'GroupConvolution', 'MatMul', 'FullyConnected')


def compute_layer_precisions(path, threads=None):
    """``[(name, layer type, precision)]`` of the compute layers (:data:`COMPUTE_LAYERS`) as
    OpenVINO's CPU plugin compiled ``path`` (float32 inference for the rest): whether the file
    really runs int8 kernels on this CPU (``'i8'`` / ``'u8'``), not only holds int8 weights."""
    import openvino as ov

    from .runtimes.openvino import compile_config
    runtime = ov.Core().compile_model(path, 'CPU', compile_config(threads)).get_runtime_model()
    layers = []
    for op in runtime.get_ops():
        info = op.get_rt_info()
        if info['layerType'].astype(str) in COMPUTE_LAYERS:
            layers.append((op.get_friendly_name(), info['layerType'].astype(str),
                           info['runtimePrecision'].astype(str)))
    return layers


def in_scopes(name, scopes):
    """Whether node ``name`` matches one of the regular expressions ``scopes`` (from the start,
    as NNCF matches its ignored-scope patterns)."""
    return any(re.match(pattern, name) for pattern in scopes)


def format_layer_precisions(layers, float_scopes=()):
    """One line: how many of ``layers`` (:func:`compute_layer_precisions`) that NNCF quantized
    run in int8 on this CPU, the types of those left in float, and how many the recipe's
    ``float_scopes`` kept float."""
    import collections
    kept = [layer for layer in layers if in_scopes(layer[0], float_scopes)]
    quantized = [layer for layer in layers if not in_scopes(layer[0], float_scopes)]
    left = collections.Counter(kind for _, kind, p in quantized if p not in ('i8', 'u8'))
    named = ', '.join(f'{n} {kind}' for kind, n in sorted(left.items()))
    return (f'OpenVINO runs {len(quantized) - sum(left.values())} of {len(quantized)} '
            f'quantized compute layers in int8 on this CPU'
            + (f' (in float: {named})' if named else '')
            + (f'; {len(kept)} more in float by the recipe\'s float scopes' if kept else ''))


def format_report(report, bound):
    lines = [f'  {name}: max|int8-fp32|/max|fp32| {mx:.4f}, mean|int8-fp32|/mean|fp32| '
             f'{mean:.4f}{"" if mean <= bound else "  ABOVE BOUND"}' for name, mx, mean in report]
    return '\n'.join(lines)


@contextlib.contextmanager
def _nncf_warnings_only():
    """NNCF's info log names every node of the ignored scopes (hundreds of lines for
    Mobile-Former's token path): warnings only while it quantizes."""
    logger = logging.getLogger('nncf')
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _quantize_openvino(float_path, calib, kwargs):
    import nncf
    import openvino as ov
    # convert_model, not Core.read_model: it folds constant subgraphs, among them the Reshape
    # that the ONNX reader puts between a grouped conv's weights and the GroupConvolution.
    # NNCF then writes those weights as int8 constants; left behind a Reshape they get a
    # FakeQuantize that the CPU plugin cannot fold, and it runs every depthwise conv in float32
    # (EfficientFormerV2-L at 512x512: 55 of 232 compute layers, INT8 1.64x -> 1.93x float32)
    model = ov.convert_model(float_path)
    arrays = [x.numpy() for x in calib]
    return nncf.quantize(model, nncf.Dataset(arrays), subset_size=len(arrays), **kwargs)


def _quantize_onnx(float_path, calib, kwargs):
    import nncf
    import onnx
    model = onnx.load(float_path)
    name = model.graph.input[0].name
    arrays = [x.numpy() for x in calib]
    return nncf.quantize(model, nncf.Dataset(arrays, lambda a: {name: a}),
                         subset_size=len(arrays), **kwargs)


def _save(quantized, path, backend, metadata):
    """Write the quantized model with ``metadata`` (ONNX ``metadata_props``; OpenVINO
    ``rt_info``, which :func:`~effbackbones.deploy.runtime.read_metadata` reads back)."""
    if backend == 'openvino':
        import openvino as ov
        for k, v in metadata.items():
            quantized.set_rt_info(str(v), ['effbackbones_metadata', k])
        # the weights stay as NNCF wrote them (int8 + float scales): no fp16 compression
        ov.save_model(quantized, path, compress_to_fp16=False)
    else:
        import onnx
        del quantized.metadata_props[:]
        for k, v in metadata.items():
            entry = quantized.metadata_props.add()
            entry.key, entry.value = str(k), str(v)
        onnx.save(quantized, path)


def quantize_file(float_path, out, calib, recipe, backend='openvino', cpu='vnni'):
    """Quantize the float32 ONNX file ``float_path`` with NNCF (``recipe``'s settings, for the
    CPUs ``cpu``) on ``calib`` and write ``out`` for ``backend`` (an IR ``.xml`` or a QDQ
    ``.onnx``), with the float file's metadata, ``effbackbones.precision = int8`` and
    ``effbackbones.int8_cpu = cpu``. No error check: see :func:`quantize`."""
    from .runtime import read_metadata
    kwargs = nncf_arguments(recipe, backend, cpu)
    quantize_fn = _quantize_openvino if backend == 'openvino' else _quantize_onnx
    with _nncf_warnings_only():
        quantized = quantize_fn(float_path, calib, kwargs)
    float_meta = read_metadata(float_path)
    if backend == 'openvino':
        # the IR's outputs by the float file's names only (convert_model gives each the names
        # of its tensor, the computing node's among them): it reads back as the float file
        for output, name in zip(quantized.outputs, float_meta['_output_names']):
            output.get_tensor().set_names({name})
    meta = {k: v for k, v in float_meta.items() if not k.startswith('_')}
    meta[PRECISION_KEY], meta[INT8_CPU_KEY] = 'int8', cpu
    _save(quantized, out, backend, meta)
    return out


def _move_into_place(tmp_path, out, backend):
    os.makedirs(osp.dirname(osp.abspath(out)) or '.', exist_ok=True)
    os.replace(tmp_path, out)
    if backend == 'openvino':
        os.replace(osp.splitext(tmp_path)[0] + '.bin', osp.splitext(out)[0] + '.bin')


def quantize(model, shape, out, calib, check, backend='openvino', dynamic=False, bound=None,
             force=False, metadata=None, keep_float=None, cpu=None, log=print):
    """Export ``model`` (a backbone or an mm model, as :func:`export` takes) in float32 at
    ``shape``, quantize it to INT8 with NNCF on ``calib`` (``(1, 3, H, W)`` tensors) and write
    ``out`` (``.xml`` for OpenVINO, ``.onnx`` QDQ for onnxruntime) if its error against the
    float32 file on ``check`` is within ``bound`` (default: the family's) or ``force``.

    ``cpu``: the CPUs the file is for (:data:`~.contract.INT8_CPUS`; default: this CPU's kind,
    on which the error is checked). ``keep_float``: also keep the float32 ONNX file there (the
    same weights and outputs, e.g. for a float32 evaluation; its graph is the INT8 form, which
    may run slower in float32 than the file :func:`export` writes by default). Returns the error
    report (:func:`error_report`); raises :class:`BoundError` (nothing written) above the
    bound.
    """
    from .export import effb_backbone
    if backend not in QUANT_BACKENDS:
        raise QuantizeError(f'backend must be one of {tuple(QUANT_BACKENDS)}, got {backend!r}')
    ext = QUANT_BACKENDS[backend]
    if not out.endswith(ext):
        raise QuantizeError(f'--backend {backend} writes a {ext} file: --out {out} should end '
                            f'with {ext}')
    if not calib or not check:
        raise QuantizeError('quantization needs calibration images and held-out images to '
                            'check the INT8 file (--calib N >= 1, --check N >= 1)')
    here = cpu_int8_kind() or 'vnni'
    cpu = cpu or here
    if cpu == 'vnni' and here == 'avx2':
        raise QuantizeError('--cpu vnni: this CPU has no VNNI (or ONEDNN_MAX_CPU_ISA caps it '
                            'below), so the file could not be checked here; quantize on a VNNI '
                            'CPU, or for every CPU with --cpu avx2')
    recipe = recipe_for(effb_backbone(model))
    bound = recipe.bound if bound is None else float(bound)
    with tempfile.TemporaryDirectory() as tmp:
        float_path = osp.join(tmp, 'float32.onnx')
        # the graph tuned for the int8 kernels of the runtime that will run the INT8 file;
        # parity-checked
        export(model, shape, float_path, dynamic=dynamic, metadata=metadata, runtime=backend,
               form='int8', log=log)
        log(f'quantizing for {cpu} CPUs with NNCF on {len(calib)} calibration image(s) '
            f'({type(effb_backbone(model)).__name__}: {recipe.why}; '
            f'SmoothQuant {"off" if recipe.smooth_quant < 0 else recipe.smooth_quant})')
        int8_path = osp.join(tmp, 'int8' + ext)
        quantize_file(float_path, int8_path, calib, recipe, backend, cpu)
        report = error_report(float_path, int8_path, backend, check)
        worst = max(mean for _, _, mean in report)
        log(f'INT8 vs float32 in {backend} on {len(check)} held-out image(s):\n'
            + format_report(report, bound))
        if backend == 'openvino':
            log(format_layer_precisions(compute_layer_precisions(int8_path),
                                        recipe.float_scopes))
        if keep_float:
            shutil.copyfile(float_path, keep_float)
        if worst > bound and not force:
            raise BoundError(f'the INT8 file is {worst:.4f} (mean|int8-fp32|/mean|fp32|) from '
                             f'float32, above the bound {bound:g}: {out} not written. '
                             f'Calibrate on more / more typical images (--calib, --calib-dir), '
                             f'raise the bound (--bound), or write it anyway with --force')
        _move_into_place(int8_path, out, backend)
    log(f'wrote {out} (int8, {backend}{"" if worst <= bound else ", FORCED above the bound"})')
    return report


__all__ = ['QUANT_BACKENDS', 'PRECISION_KEY', 'RECIPES', 'Recipe', 'QuantizeError',
           'BoundError', 'recipe_for', 'nncf_arguments', 'images_from_dir', 'synthetic_images',
           'config_inputs', 'error_report', 'compute_layer_precisions', 'in_scopes',
           'format_layer_precisions', 'quantize_file', 'quantize']
