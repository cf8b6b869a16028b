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

A static graph can be tuned for one runtime (``runtime='openvino'``): the export traces a copy
of the model in which the runtime's substitution table (:mod:`.runtimes`) has replaced the
modules it runs faster in another form (:mod:`.substitution`); the file is tagged
``effbackbones.tuned_for`` that runtime only where a stand-in took its own form, still runs in
every runtime with the same outputs, and is checked in both. A graph that will be quantized
(``form='int8'``, :mod:`.quantize`) takes the runtime's INT8 table instead, tuned for its int8
kernels.

After writing the file, :func:`check_onnx_parity` runs it in onnxruntime on a random input and
raises :class:`ParityError` when an output is outside the reference-pack tolerance
``|out - ref| <= 2e-4 * max|ref| + 1e-4 * |ref|`` (detections: the part's own ``compare``).
"""
import copy
import itertools
import os
import os.path as osp
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import effbackbones_modules
from ..models.layers import ExportableGroupNorm
from .contract import (ATOL_OF_MAX, BACKENDS, DYNAMIC_KEY, INPUT_SHAPE_KEY, OPSET, PART_KEY,
                       RTOL, SIZE_DIVISOR_KEY, TUNED_FOR_KEY, ExportError, ParityError, compare)
from .parts import (END2END_PARTS, PARTS, BackboneMaps, SegmentorLogits, SingleStageRaw,
                    TwoStageFeatures, exportable_part)
from .runtime import RuntimeSession, read_metadata
from .runtimes import substitutions
from .substitution import replace_modules, substitute


# --------------------------------------------------------------------------------------------
# building what gets exported
# --------------------------------------------------------------------------------------------
def build_backbone(model, arch, checkpoint=None, out_indices=None, **kwargs):
    """An effbackbones backbone ``model`` (class name) / ``arch`` in eval mode; ``checkpoint``
    goes through the same loud loader as ``init_cfg=dict(type='Pretrained')``."""
    from ..models import backbone_class
    try:
        cls = backbone_class(model)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
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
        return ExportableGroupNorm.from_group_norm(m)
    if type(m).__name__ == 'Upsample' and type(m).__module__.startswith('mmseg') and \
            not m.size and isinstance(m.scale_factor, float) and m.scale_factor.is_integer():
        return ScaleUpsample(m)
    return None


def export_form(part, runtime='onnxruntime', dynamic=False, form='float32'):
    """The copy of ``part`` that gets traced: modules whose default ONNX graph is less accurate
    (``nn.GroupNorm``: its InstanceNormalization graph is one long float32 sum in onnxruntime /
    OpenVINO; see :class:`~effbackbones.models.layers.ExportableGroupNorm`) or frozen to the
    traced size (:class:`ScaleUpsample`) replaced by equivalents, and in a static graph the
    modules of ``runtime``'s substitution table for a graph of ``form`` (``'float32'`` /
    ``'int8'``: to be quantized) by their stand-ins. ``part`` is left as it is. Returns
    ``(copy, stand_ins)``.

    The copy is of the module tree; its parameters and buffers are ``part``'s own tensors: fresh
    tensors would restart the version counters that tell a pinned attention bias from a stale
    one, and the static graph would compute the biases again."""
    shared = {id(t): t for t in itertools.chain(part.parameters(), part.buffers())}
    form_copy = replace_modules(copy.deepcopy(part, shared), _export_equivalent)
    if dynamic:
        # the stand-ins choose their form from the traced sizes
        return form_copy, []
    return substitute(form_copy, substitutions(runtime, form))


def export_module(part, dummy, out, dynamic=False, opset=OPSET, metadata=None,
                  runtime='onnxruntime', form='float32'):
    """Trace ``part`` (an :func:`~.parts.exportable_part`) on ``dummy`` and write ``out``, a
    static graph tuned for ``runtime`` as a graph of ``form`` (:func:`export_form`; the file
    runs in every runtime); returns the PyTorch outputs for ``dummy``."""
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
        traced, stand_ins = export_form(part, runtime, dynamic, form)
        _quiet_export(traced, (dummy,), out, input_names=['input'], output_names=names,
                      opset_version=opset, dynamic_axes=dynamic_axes,
                      do_constant_folding=True, dynamo=False)
    tuned_for = runtime if any(m.applied for m in stand_ins) else 'none'
    _write_metadata(out, dict(metadata or {}, **{PART_KEY: part.part,
                                                DYNAMIC_KEY: str(bool(dynamic)),
                                                TUNED_FOR_KEY: tuned_for,
                                                INPUT_SHAPE_KEY:
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
           metadata=None, end2end=False, runtime='onnxruntime', form='float32', log=print):
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
        runtime: the runtime a static graph is tuned for (:func:`export_form`); the file
            runs in both, the tuned one is faster there.
        form: ``'float32'``, or ``'int8'`` for a graph that will be quantized
            (:mod:`.quantize`): the runtime's stand-ins for int8 kernels.

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
    part = exportable_part(model, end2end, batch).eval()
    inputs = parity_inputs(backbone.in_channels, shape, batch, dynamic, backbone.size_divisor,
                           dynamic_batch=not end2end)
    if backbone.size_divisor:
        metadata = dict(metadata or {}, **{SIZE_DIVISOR_KEY: str(backbone.size_divisor)})
    export_module(part, inputs[0], out, dynamic=dynamic, opset=opset, metadata=metadata,
                  runtime=runtime, form=form)
    free = 'height/width' if end2end else 'batch/height/width'
    tuned_for = read_metadata(out)[TUNED_FOR_KEY]
    tuned = f', tuned for {tuned_for}' if tuned_for != 'none' else ''
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
           'ATOL_OF_MAX', 'RTOL', 'ExportError', 'ParityError', 'compare', 'build_backbone',
           'build_from_config', 'exportable_part', 'BackboneMaps', 'SegmentorLogits',
           'SingleStageRaw', 'TwoStageFeatures', 'check_request', 'export_form', 'export_module',
           'check_onnx_parity', 'parity_inputs', 'export']
