"""The exportable parts of a model, in one registry: for each part, how it is found in a model,
the wrapper whose graph is exported, and how a runtime session of its file attaches back to an
mmdet / mmseg model (``tools/test.py --backend``). The export (:func:`exportable_part`), the
runtime (:func:`~.runtime.attach_runtime`) and tools/benchmark.py all read :data:`PARTS`.

========================  ============================================  ======================
part                      graph                                         after the file
========================  ============================================  ======================
``backbone``              image -> ``out_<i>``                          (not attachable)
``segmentor``             image -> ``seg_logits``                       resize, argmax
``single_stage``          image -> ``cls_score_<l>``, ``bbox_pred_<l>``  decoding + NMS
``two_stage_features``    image -> neck ``feat_<l>``                    RPN + RoI heads
``single_stage_end2end``  image -> ``dets``, ``labels``                 boxes to the image
``two_stage_end2end``     image -> ``dets``, ``labels``, ``masks``      + masks pasted
========================  ============================================  ======================

("after the file": what stays in PyTorch under ``tools/test.py --backend``.)
"""
import types
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch.nn as nn

from ..checkpoint import is_effbackbones_backbone
from .contract import ExportError
from .detection import (SingleStageEnd2End, TwoStageEnd2End, end2end_mask_results,
                        end2end_part, end2end_results)


# --------------------------------------------------------------------------------------------
# wrappers: the modules whose graphs are exported
# --------------------------------------------------------------------------------------------
class BackboneMaps(nn.Module):
    """A backbone: image -> the maps of ``out_indices`` (``out_<index>``)."""
    part = 'backbone'

    def __init__(self, backbone):
        super().__init__()
        self.model = backbone

    def output_names(self, num_outputs):
        return [f'out_{i}' for i in self.model.out_indices]

    def forward(self, x):
        return tuple(self.model(x))


class SegmentorLogits(nn.Module):
    """mmseg ``EncoderDecoder``: image -> ``seg_logits`` of the decode head (before the resize
    to the image size, which ``decode_head.predict_by_feat`` does in PyTorch)."""
    part = 'segmentor'

    def __init__(self, segmentor):
        super().__init__()
        if getattr(segmentor, 'auxiliary_head', None) is not None:
            warnings.warn('the auxiliary head is a training-only branch: not exported')
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


# --------------------------------------------------------------------------------------------
# attaching a session of the part's file back to the model it came from
# --------------------------------------------------------------------------------------------
def _run_features(model, session, as_tuple=False):
    run = (lambda self, inputs: tuple(session(inputs))) if as_tuple else \
        (lambda self, inputs: session(inputs))
    model.extract_feat = types.MethodType(run, model)


def _attach_segmentor(model, session, torch_weights):
    model.extract_feat = types.MethodType(lambda self, inputs: session(inputs)[0], model)
    # the file already ends with the decode head: its forward passes the logits through
    model.decode_head.forward = lambda logits: logits


def _attach_single_stage(model, session, torch_weights):
    _run_features(model, session)

    def head_outputs(outs):
        n = len(outs) // 2
        return list(outs[:n]), list(outs[n:])
    model.bbox_head.forward = head_outputs


def _attach_two_stage_features(model, session, torch_weights):
    if not torch_weights:
        raise ValueError(f'{session.path} holds the backbone + neck only; the RPN and RoI heads '
                         f'run in PyTorch and need the trained checkpoint: pass --torch-weights '
                         f'CHECKPOINT.pth')
    _run_features(model, session, as_tuple=True)


def _attach_single_stage_end2end(model, session, torch_weights):
    _run_features(model, session)
    model.bbox_head.predict = end2end_results


def _attach_two_stage_end2end(model, session, torch_weights):
    _run_features(model, session)
    # the proposals are inside the file: the RoI head gets the file's outputs instead
    model.rpn_head.predict = lambda x, samples, rescale=False: [None] * len(samples)
    roi_head = model.roi_head
    model.roi_head.predict = lambda outs, _, samples, rescale=False: \
        end2end_mask_results(roi_head, outs, samples, rescale)


# --------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------
def _is_segmentor(model):
    return hasattr(model, 'decode_head')


def _is_single_stage(model):
    return hasattr(model, 'bbox_head') and not hasattr(model, 'roi_head')


def _is_two_stage(model):
    return hasattr(model, 'roi_head')


def _is_mask_rcnn(model):
    return hasattr(model, 'roi_head') and getattr(model.roi_head, 'with_mask', False)


@dataclass(frozen=True)
class Part:
    """One exportable part. ``found_in(model)``: whether ``model`` holds it; ``wrap(model)``:
    the module whose graph is exported; ``attach(model, session, torch_weights)``: makes the
    model run the file's session in place of the part (``None``: nothing to attach to);
    ``holds``: what the model must be for ``attach``, said in its error; ``end2end``: the graph
    holds the post-processing (batch 1, a list of detections per image)."""
    name: str
    found_in: Callable
    wrap: Callable
    attach: Optional[Callable] = None
    holds: str = ''
    end2end: bool = False


#: in the order :func:`exportable_part` tries them (the first one found in the model is used)
PARTS = {p.name: p for p in (
    Part('backbone', is_effbackbones_backbone, BackboneMaps),
    Part('segmentor', _is_segmentor, SegmentorLogits, _attach_segmentor, 'a segmentor'),
    Part('two_stage_features', _is_two_stage, TwoStageFeatures, _attach_two_stage_features,
         'two-stage detector features'),
    Part('single_stage', _is_single_stage, SingleStageRaw, _attach_single_stage,
         'a single-stage detector'),
    Part('single_stage_end2end', _is_single_stage, SingleStageEnd2End,
         _attach_single_stage_end2end, 'an end-to-end single-stage detector', end2end=True),
    Part('two_stage_end2end', _is_mask_rcnn, TwoStageEnd2End, _attach_two_stage_end2end,
         'an end-to-end Mask R-CNN', end2end=True),
)}
#: the whole detectors (post-processing in the graph): one image per run, K detections per image
END2END_PARTS = tuple(name for name, p in PARTS.items() if p.end2end)


def exportable_part(model, end2end=False, batch=1):
    """The wrapper whose graph gets exported for ``model`` (an mm model or a bare backbone);
    ``end2end``: a detector with its post-processing (batch 1)."""
    if end2end:
        return end2end_part(model, batch)
    for part in PARTS.values():
        if not part.end2end and part.found_in(model):
            return part.wrap(model)
    raise ExportError(f'cannot export a {type(model).__name__}: supported are effbackbones '
                      f'backbones, mmseg EncoderDecoder, mmdet single- and two-stage detectors')


def attach_part(model, session, torch_weights=None):
    """Make ``model`` run ``session`` (a file of part ``session.part``) in place of that part;
    a ValueError says why the file and the model do not fit."""
    part = PARTS.get(session.part)
    if part is None or part.attach is None:
        raise ValueError(f'{session.path} holds a {session.part!r} graph; tools/test.py needs a '
                         f'file exported with --config (a segmentor or detector)')
    if not part.found_in(model):
        raise ValueError(f'{session.path} holds {part.holds} but the config builds a '
                         f'{type(model).__name__}')
    part.attach(model, session, torch_weights)


__all__ = ['PARTS', 'END2END_PARTS', 'Part', 'BackboneMaps', 'SegmentorLogits',
           'SingleStageRaw', 'TwoStageFeatures', 'exportable_part', 'attach_part']
