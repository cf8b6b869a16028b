"""ONNX export of effbackbones backbones and of whole mmdet / mmseg models that use them.

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)`` (why: docs/deploy.md).
It traces one forward. For a static export the attention biases of EfficientFormer v1 / V2 and
LeViT are pinned first (``pin_attention_biases``: computed once by PyTorch for the export size,
kept as buffers), so the graph holds them as constants instead of gathering / bicubically
resizing the tables.

What is exported:

* ``--model CLASS --arch A``: the backbone after ``switch_to_deploy()``; outputs ``out_<i>`` =
  the maps of ``out_indices``, in that order.
* ``--config CFG``: mmseg ``EncoderDecoder`` -> image to ``seg_logits`` (backbone + neck +
  decode head; the resize to the image and argmax stay in PyTorch); mmdet single-stage detector
  (RetinaNet) -> backbone + neck + the head's raw ``cls_score_<l>`` / ``bbox_pred_<l>``, or with
  ``end2end=True`` the whole detector -> ``dets`` / ``labels`` (:mod:`.detection`); mmdet
  two-stage detector (Mask R-CNN) -> backbone + neck ``feat_<l>`` (RPN / RoI heads stay in
  PyTorch), or with ``end2end=True`` the whole Mask R-CNN -> ``dets`` / ``labels`` / ``masks``.

Dynamic batch / height / width (``dynamic=True``) works for every family. SwiftFormer and
Mobile-Former have no size-dependent tables; for the relative-position attention biases of
EfficientFormer v1 / V2 (both ``bias_mode``\ s) and LeViT nothing is pinned, and the traced
forward computes each bias from the input's sizes (Range / tap gathers / Slice / Gather, see
:mod:`effbackbones.models.attention_bias`), so the file holds the bias rule instead of one
size's bias. The parity check runs such a file at a second size and batch as well.

A static graph can be tuned for one runtime (``runtime='openvino'``: the maps with 16-64
channels that a consumer needs channels-first -- the backbone's outputs, EfficientFormer's
output GroupNorms, SwiftFormer's global query, Mobile-Former's bridges -- avoid OpenVINO's slow
reorder of them, see :func:`~effbackbones.models.layers.openvino_channels_first` and
:func:`~effbackbones.models.mobileformer.openvino_pixel_block`); such a file still runs in both
runtimes with the same outputs, and is checked in both.

After writing the file, :func:`check_onnx_parity` runs it in onnxruntime on a random input and
raises :class:`ParityError` when an output is outside the reference-pack tolerance
``|out - ref| <= 2e-4 * max|ref| + 1e-4 * |ref|`` (detections: the part's own ``compare``).
"""
import contextlib
import os
import os.path as osp
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import effbackbones_modules, is_effbackbones_backbone

#: the ONNX opset written (LayerNormalization needs 17; 17 is read by onnxruntime >= 1.14 and
#: OpenVINO >= 2022.3)
OPSET = 17
#: :func:`compare` tolerance: ``|out - ref| <= ATOL_OF_MAX * max|ref| + RTOL * |ref|``, the rule
#: of the official reference packs (``make_weights.compare_outputs``)
ATOL_OF_MAX = 2e-4
RTOL = 1e-4
#: the ONNX metadata key naming what a file holds (read by :mod:`.runtime`)
PART_KEY = 'effbackbones.part'
#: the ONNX metadata key of the backbone's side rule (a dynamic file checks its inputs with it)
SIZE_DIVISOR_KEY = 'effbackbones.size_divisor'
PARTS = ('backbone', 'segmentor', 'single_stage', 'single_stage_end2end',
         'two_stage_features', 'two_stage_end2end')
#: the whole detectors (post-processing in the graph): one image per run, K detections per image
END2END_PARTS = ('single_stage_end2end', 'two_stage_end2end')
#: the runtimes a file runs in (:mod:`.runtime`) and a static graph can be tuned for
BACKENDS = ('onnxruntime', 'openvino')


class ExportError(ValueError):
    """An export request that cannot be satisfied (the message says what to do instead)."""


class ParityError(RuntimeError):
    """The exported graph does not reproduce the PyTorch outputs within tolerance."""


# --------------------------------------------------------------------------------------------
# comparison
# --------------------------------------------------------------------------------------------
def compare(outs, refs, names=None):
    """``(ok, report)``: every ``outs[i]`` within ``2e-4 * max|refs[i]| + 1e-4 * |refs[i]|``.

    One report line per output with the worst excess ratio (``err / allowed``, must be <= 1)
    and the max abs difference relative to ``max|ref|``.
    """
    if len(outs) != len(refs):
        return False, f'{len(outs)} outputs, expected {len(refs)}'
    ok, lines = True, []
    for i, (o, r) in enumerate(zip(outs, refs)):
        name = names[i] if names else f'output {i}'
        o = torch.as_tensor(np.asarray(o) if not torch.is_tensor(o) else o).double()
        r = torch.as_tensor(np.asarray(r) if not torch.is_tensor(r) else r).double()
        if o.shape != r.shape:
            ok = False
            lines.append(f'{name}: shape {tuple(o.shape)} != reference {tuple(r.shape)}')
            continue
        peak = r.abs().max().item() if r.numel() else 0.0
        err = (o - r).abs()
        allowed = ATOL_OF_MAX * peak + RTOL * r.abs()
        finite = bool(torch.isfinite(o).all())
        ratio = (err / allowed.clamp_min(1e-30)).max().item() if r.numel() else 0.0
        good = finite and bool((err <= allowed).all())
        ok &= good
        lines.append(f'{name}: {"ok " if good else "BAD"} shape {tuple(r.shape)} '
                     f'max|diff|/max|ref| {err.max().item() / max(peak, 1e-30):.2e} '
                     f'(worst err/allowed {ratio:.3f}{"" if finite else ", non-finite"})')
    return ok, '\n'.join(lines)


# --------------------------------------------------------------------------------------------
# building what gets exported
# --------------------------------------------------------------------------------------------
def build_backbone(model, arch, checkpoint=None, out_indices=None, **kwargs):
    """An effbackbones backbone ``model`` (class name) / ``arch`` in eval mode; ``checkpoint``
    goes through the same loud loader as ``init_cfg=dict(type='Pretrained')``."""
    import effbackbones  # noqa: F401  (registers the backbones)
    from effbackbones.registry import MODELS
    cls = MODELS.get(model)
    if cls is None or not getattr(cls, 'arch_zoo', None):
        known = sorted(n for n, c in MODELS.module_dict.items() if getattr(c, 'arch_zoo', None))
        raise ExportError(f'unknown backbone class {model!r}; choose one of {known}')
    if checkpoint is not None:
        if not osp.isfile(checkpoint):
            raise ExportError(f'checkpoint not found: {checkpoint}')
        kwargs['init_cfg'] = dict(type='Pretrained', checkpoint=checkpoint)
    if out_indices is not None:
        kwargs['out_indices'] = tuple(out_indices)
    try:
        backbone = cls(arch=arch, **kwargs)
    except ValueError as exc:          # unknown arch, bad out_indices...
        raise ExportError(str(exc)) from None
    if checkpoint is not None:
        backbone.init_weights()
    else:                                # random weights (benchmarks, tests): no init log
        backbone.init_default_weights()
    return backbone.eval()


def build_from_config(config, checkpoint, cfg_options=None):
    """The mmdet / mmseg model of ``config`` with every tensor of ``checkpoint`` loaded strictly
    (a tools/train.py checkpoint, or an official released dense file: both go through
    :func:`~effbackbones.checkpoint.convert_model_checkpoint`, as ``tools/test.py`` does), in
    eval mode."""
    from mmengine.config import Config

    from effbackbones.checkpoint import (CheckpointError, convert_model_checkpoint,
                                         load_checkpoint_file)
    from effbackbones.utils.launch import build_model
    if not osp.isfile(config):
        raise ExportError(f'config not found: {config}')
    if not osp.isfile(checkpoint):
        raise ExportError(f'checkpoint not found: {checkpoint}')
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    model = build_model(cfg)
    try:
        converted, _ = convert_model_checkpoint(model, load_checkpoint_file(checkpoint),
                                                name=checkpoint)
    except CheckpointError as exc:
        raise ExportError(f'{checkpoint} does not fit {config}:\n{exc}') from None
    model.load_state_dict(converted['state_dict'])
    return model.eval(), cfg


class SegmentorLogits(nn.Module):
    """mmseg ``EncoderDecoder``: image -> ``seg_logits`` of the decode head (before the resize
    to the image size, which ``decode_head.predict_by_feat`` does in PyTorch)."""
    part = 'segmentor'

    def __init__(self, segmentor):
        super().__init__()
        self.model = segmentor

    def output_names(self, num_outputs):
        return ['seg_logits']

    def forward(self, x):
        return (self.model.decode_head.forward(self.model.extract_feat(x)),)


class SingleStageRaw(nn.Module):
    """mmdet single-stage detector: image -> the head's raw outputs, flattened as
    ``cls_score_0..L-1, bbox_pred_0..L-1`` (``bbox_head.predict_by_feat`` decodes them)."""
    part = 'single_stage'

    def __init__(self, detector):
        super().__init__()
        self.model = detector

    def output_names(self, num_outputs):
        n = num_outputs // 2
        return [f'cls_score_{i}' for i in range(n)] + [f'bbox_pred_{i}' for i in range(n)]

    def forward(self, x):
        outs = self.model.bbox_head.forward(self.model.extract_feat(x))
        if len(outs) != 2:
            raise ExportError(f'{type(self.model.bbox_head).__name__} returns {len(outs)} '
                              f'groups of maps; only (cls_scores, bbox_preds) heads are exported')
        return tuple(outs[0]) + tuple(outs[1])


class TwoStageFeatures(nn.Module):
    """mmdet two-stage detector: image -> the neck's maps ``feat_<l>`` (the RPN and RoI heads,
    with their NMS and RoIAlign, stay in PyTorch)."""
    part = 'two_stage_features'

    def __init__(self, detector):
        super().__init__()
        self.model = detector

    def output_names(self, num_outputs):
        return [f'feat_{i}' for i in range(num_outputs)]

    def forward(self, x):
        return tuple(self.model.extract_feat(x))


class BackboneMaps(nn.Module):
    """A backbone: image -> the maps of ``out_indices`` (``out_<index>``)."""
    part = 'backbone'
    #: set while a static graph for OpenVINO is exported (:func:`export_friendly`): the maps of
    #: a backbone whose maps leave it channels-last there (``openvino_channels_last_maps``)
    #: become the graph's channels-first outputs through ``openvino_channels_first``
    export_runtime = None

    def __init__(self, backbone):
        super().__init__()
        self.model = backbone

    def output_names(self, num_outputs):
        return [f'out_{i}' for i in self.model.out_indices]

    def forward(self, x):
        maps = tuple(self.model(x))
        if self.export_runtime == 'openvino' and self.model.openvino_channels_last_maps:
            from ..models.layers import openvino_channels_first
            maps = tuple(openvino_channels_first(m) for m in maps)
        return maps


def exportable_part(model):
    """Wrap an mm model (or a bare backbone) in the module whose graph gets exported."""
    if is_effbackbones_backbone(model):
        return BackboneMaps(model)
    if hasattr(model, 'decode_head'):
        if getattr(model, 'auxiliary_head', None) is not None:
            warnings.warn('the auxiliary head is a training-only branch: not exported')
        return SegmentorLogits(model)
    if hasattr(model, 'roi_head'):
        return TwoStageFeatures(model)
    if hasattr(model, 'bbox_head'):
        return SingleStageRaw(model)
    raise ExportError(f'cannot export a {type(model).__name__}: supported are effbackbones '
                      f'backbones, mmseg EncoderDecoder, mmdet single- and two-stage detectors')


def effb_backbone(model):
    """The effbackbones backbone inside ``model`` (or ``model`` itself)."""
    found = effbackbones_modules(model)
    if not found:
        raise ExportError(f'{type(model).__name__} holds no effbackbones backbone: only '
                          f'effbackbones backbones and mmdet / mmseg models built on one are '
                          f'exported')
    return found[0][1]


# --------------------------------------------------------------------------------------------
# request checks
# --------------------------------------------------------------------------------------------
def check_request(backbone, shape, batch=1):
    """Raise :class:`ExportError` for a size (or batch) the backbone cannot take."""
    h, w = (int(s) for s in shape)
    if h <= 0 or w <= 0 or batch <= 0:
        raise ExportError(f'--shape and --batch must be positive, got {h}x{w}, batch {batch}')
    try:
        backbone.check_input(torch.empty(batch, backbone.in_channels, h, w))
    except ValueError as exc:
        raise ExportError(f'--shape {h} {w}: {exc}') from None


# --------------------------------------------------------------------------------------------
# export + parity
# --------------------------------------------------------------------------------------------
def _quiet_export(*args, **kwargs):
    with warnings.catch_warnings():
        # tracer notes about Python ints taken from sizes: expected for a static export, and
        # a dynamic export is checked at a second size instead of trusting the warnings
        warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
        # the official dense attention bias gathers its table with |offsets| (never negative),
        # the case the exporter's advanced-indexing note is about
        warnings.filterwarnings('ignore', message='.*advanced indexing.*negative values.*')
        warnings.filterwarnings('ignore', message='.*legacy TorchScript-based ONNX export.*')
        warnings.filterwarnings('ignore', category=DeprecationWarning)
        warnings.filterwarnings('ignore', category=FutureWarning)
        torch.onnx.export(*args, **kwargs)


class ScaleUpsample(nn.Module):
    """mmseg's ``Upsample`` by an integer factor, as ``F.interpolate(scale_factor=...)``.

    mmseg computes the output size as Python ``int``\ s from the input shape, which a traced
    graph keeps as constants (a dynamic Semantic FPN would upsample every size to the traced
    one); with an integer factor both give the same size and the same sampling positions.
    """

    def __init__(self, up):
        super().__init__()
        self.scale_factor, self.mode, self.align_corners = \
            up.scale_factor, up.mode, up.align_corners

    def forward(self, x):
        return F.interpolate(x, scale_factor=self.scale_factor, mode=self.mode,
                             align_corners=self.align_corners)


def _export_equivalent(m):
    """The export-friendly stand-in for module ``m``, or ``None`` to keep it."""
    if type(m) is nn.GroupNorm:      # deploy already swapped the backbone's own
        from effbackbones.models.layers import ExportableGroupNorm
        return ExportableGroupNorm.from_group_norm(m)
    if type(m).__name__ == 'Upsample' and type(m).__module__.startswith('mmseg') and \
            not m.size and isinstance(m.scale_factor, float) and m.scale_factor.is_integer():
        return ScaleUpsample(m)
    return None


def runtime_tuned(module, runtime, dynamic=False):
    """The sub-modules of ``module`` that an export for ``runtime`` tunes: those with a graph form
    of their own (an ``export_runtime`` attribute that :func:`export_friendly` sets; today, all
    for OpenVINO: :class:`BackboneMaps`' outputs, ``ExportableGroupNorm``, SwiftFormer's
    additive attention, Mobile-Former's bridges), none for a dynamic graph (Mobile-Former's
    pixel blocks follow the traced sizes)."""
    if runtime == 'onnxruntime' or dynamic:
        return []
    return [m for m in module.modules() if hasattr(m, 'export_runtime')]


@contextlib.contextmanager
def export_friendly(module, runtime='onnxruntime', dynamic=False):
    """Swap the sub-modules whose default ONNX graph is less accurate (``nn.GroupNorm``: its
    InstanceNormalization graph is one long float32 sum in onnxruntime / OpenVINO; see
    :class:`~effbackbones.models.layers.ExportableGroupNorm`) or frozen to the traced size
    (:class:`ScaleUpsample`) for equivalents while exporting, and for a static graph tuned for
    ``runtime`` tell the modules with a form of their own for it (:func:`runtime_tuned`);
    restored afterwards."""
    swaps = []
    for name, m in list(module.named_modules()):
        new = _export_equivalent(m)
        if new is not None:
            parent = module.get_submodule(name.rpartition('.')[0]) if '.' in name else module
            swaps.append((parent, name.rpartition('.')[2], m, new))
    tuned = []
    try:
        for parent, attr, _, new in swaps:
            setattr(parent, attr, new)
        tuned = runtime_tuned(module, runtime, dynamic)
        for m in tuned:
            m.export_runtime = runtime
        yield module
    finally:
        for m in tuned:
            m.export_runtime = None
        for parent, attr, m, _ in swaps:
            setattr(parent, attr, m)


def export_module(part, dummy, out, dynamic=False, opset=OPSET, metadata=None,
                  runtime='onnxruntime'):
    """Trace ``part`` (an :func:`exportable_part`) on ``dummy`` and write ``out``, a static
    graph tuned for ``runtime`` (:func:`export_friendly`; the file runs in every runtime);
    returns the PyTorch outputs for ``dummy``."""
    if runtime not in BACKENDS:
        raise ExportError(f'runtime must be one of {BACKENDS}, got {runtime!r}')
    part.eval()
    with torch.no_grad():
        ref = part(dummy)
        names = part.output_names(len(ref))
        # outputs whose size depends on the data (the end-to-end detector's K)
        dynamic_axes = dict(getattr(part, 'output_dynamic_axes', {})) or None
        if dynamic and part.part in END2END_PARTS:
            # batch 1 (its post-processing handles one image), free height / width
            dynamic_axes['input'] = {2: 'height', 3: 'width'}
        elif dynamic:
            dynamic_axes = {'input': {0: 'batch', 2: 'height', 3: 'width'}}
            dynamic_axes.update({n: {0: 'batch', 2: f'{n}_height', 3: f'{n}_width'}
                                 for n in names})
        os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
        with export_friendly(part, runtime, dynamic):
            _quiet_export(part, (dummy,), out, input_names=['input'], output_names=names,
                          opset_version=opset, dynamic_axes=dynamic_axes,
                          do_constant_folding=True, dynamo=False)
    tuned_for = runtime if runtime_tuned(part, runtime, dynamic) else 'none'
    _write_metadata(out, dict(metadata or {}, **{PART_KEY: part.part,
                                                'effbackbones.dynamic': str(bool(dynamic)),
                                                'effbackbones.tuned_for': tuned_for,
                                                'effbackbones.input_shape':
                                                    'x'.join(map(str, dummy.shape))}))
    return [r.detach() for r in ref]


def _write_metadata(path, metadata):
    import onnx
    model = onnx.load(path)
    for k, v in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = str(k), str(v)
    onnx.save(model, path)


def check_onnx_parity(path, part, inputs, backend='onnxruntime', threads=None):
    """Run ``path`` in ``backend`` on each input and compare with ``part`` in PyTorch; raise
    :class:`ParityError` naming the outputs that are off. Returns the reports."""
    from .runtime import RuntimeSession
    session = RuntimeSession(path, backend, threads=threads)
    # a part with outputs of data-dependent order (detections) brings its own comparison
    part_compare = getattr(part, 'compare', compare)
    reports = []
    for x in inputs:
        with torch.no_grad():
            ref = part(x)
        ok, report = part_compare(session(x), ref, session.output_names)
        shape = 'x'.join(map(str, x.shape))
        reports.append(f'[{backend} vs PyTorch, input {shape}]\n{report}')
        if not ok:
            raise ParityError(f'{path} in {backend} differs from PyTorch beyond the tolerance '
                              f'|diff| <= {ATOL_OF_MAX:g}*max|ref| + {RTOL:g}*|ref|:\n'
                              + reports[-1])
    return reports


def parity_inputs(in_channels, shape, batch, dynamic, size_divisor=32, seed=0,
                  dynamic_batch=True):
    """Random inputs for the parity check: the export size, and for a dynamic export a second,
    different size (and batch, unless ``dynamic_batch`` is False) that a graph with a frozen
    size would get wrong."""
    g = torch.Generator().manual_seed(seed)
    h, w = shape
    xs = [torch.randn(batch, in_channels, h, w, generator=g)]
    if dynamic:
        d = size_divisor or 32
        xs.append(torch.randn(batch + int(dynamic_batch), in_channels, h + d, w + 2 * d,
                              generator=g))
    return xs


def export(model, shape, out, batch=1, dynamic=False, deploy=True, check=True, opset=OPSET,
           metadata=None, end2end=False, runtime='onnxruntime', log=print):
    """Export a backbone or an mm model (see the module docstring) and check it in onnxruntime
    (and in ``runtime`` when it is another).

    Args:
        model: an effbackbones backbone or an mmdet / mmseg model holding one, in eval mode with
            its weights loaded.
        shape: ``(H, W)`` of the exported input.
        deploy: call ``switch_to_deploy()`` on the backbone first (skipped if already done).
        check: run :func:`check_onnx_parity`; when it fails, the file is moved to
            ``*.parity-failed.onnx`` and :class:`ParityError` is raised.
        end2end: a detector with its post-processing (RetinaNet: image -> ``dets``,
            ``labels``; Mask R-CNN: also ``masks``; :mod:`.detection`); other models are an
            :class:`ExportError`.
        runtime: the runtime a static graph is tuned for (:func:`export_friendly`); the file
            runs in both, the tuned one is faster there.

    Returns the parity reports (empty when ``check`` is False).
    """
    backbone = effb_backbone(model)
    check_request(backbone, shape, batch)
    if deploy and not getattr(backbone, 'deploy', False):
        backbone.switch_to_deploy()
    if dynamic:
        # a pinned bias (an earlier switch_to_deploy(input_size) / static export) would become a
        # constant of that size: the traced forward computes the biases from the input's sizes
        for attn in backbone.attention_bias_modules():
            attn.drop_pinned_bias()
    else:
        # the attention biases of this size become graph constants computed by PyTorch (no
        # gather / bicubic resize of the tables in the graph); nothing to pin elsewhere
        backbone.pin_attention_biases(tuple(int(s) for s in shape))
    if end2end:
        from .detection import end2end_part
        part = end2end_part(model, batch).eval()
    else:
        part = exportable_part(model).eval()
    inputs = parity_inputs(backbone.in_channels, shape, batch, dynamic, backbone.size_divisor,
                           dynamic_batch=not end2end)
    if backbone.size_divisor:
        metadata = dict(metadata or {}, **{SIZE_DIVISOR_KEY: str(backbone.size_divisor)})
    export_module(part, inputs[0], out, dynamic=dynamic, opset=opset, metadata=metadata,
                  runtime=runtime)
    free = 'height/width' if end2end else 'batch/height/width'
    tuned = f', tuned for {runtime}' if runtime_tuned(part, runtime, dynamic) else ''
    log(f'wrote {out} ({part.part}, input {"x".join(map(str, inputs[0].shape))}'
        f'{f", dynamic {free}" if dynamic else ", static"}{tuned}, '
        f'{osp.getsize(out) / 2 ** 20:.1f} MiB)')
    if not check:
        return []
    try:
        reports = check_onnx_parity(out, part, inputs)
        if runtime != 'onnxruntime':
            reports += check_onnx_parity(out, part, inputs, backend=runtime)
    except ParityError as exc:
        # keep the file for inspection, under a name nobody deploys by mistake
        rejected = osp.splitext(out)[0] + '.parity-failed.onnx'
        os.replace(out, rejected)
        raise ParityError(f'{exc}\n(file moved to {rejected})') from None
    for r in reports:
        log(r)
    return reports


__all__ = ['OPSET', 'PARTS', 'END2END_PARTS', 'BACKENDS', 'PART_KEY', 'SIZE_DIVISOR_KEY',
           'ExportError', 'ParityError', 'compare', 'build_backbone', 'build_from_config',
           'exportable_part', 'check_request', 'runtime_tuned', 'export_module',
           'check_onnx_parity', 'parity_inputs', 'export']
