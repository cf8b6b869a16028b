"""Whole detectors as one ONNX graph: RetinaNet (image -> ``dets``, ``labels``) and Mask R-CNN
(image -> ``dets``, ``labels``, ``masks``), mmdet 3.3's test post-processing in standard opset-17
ops (``TopK``, ``NonMaxSuppression``, ``RoiAlign``, ``Gather``...).

:class:`SingleStageEnd2End` (RetinaNet; ``BaseDenseHead._predict_by_feat_single`` +
``_bbox_post_process``):

1. per level: sigmoid of the class logits, ``TopK`` of ``nms_pre`` over the (anchor, class)
   pairs (mmdet's ``filter_scores_and_topk``: the top ``nms_pre`` pairs above ``score_thr``
   are the top ``nms_pre`` pairs of all, then those above the threshold; ``k`` taken from the
   level's size in the graph);
2. the anchors computed in the graph from each level's map size (:class:`AnchorCandidates`),
   ``DeltaXYWHBBoxCoder`` decoding (means / stds, ``wh_ratio_clip`` 16/1000, centre clamp if
   configured) clamped to the input's size;
3. ``min_bbox_size``: boxes not wider and higher than it are dropped;
4. per-class NMS with ONNX ``NonMaxSuppression``: boxes ``(1, N, 4)``, scores ``(1, C, N)``
   holding each candidate's score in its own class row (``-1`` elsewhere and for dropped
   candidates), ``iou_threshold`` / ``score_thr`` of the config's ``test_cfg``, at most
   ``max_per_img`` per class;
5. the kept boxes sorted by score, the first ``max_per_img``.

:class:`TwoStageEnd2End` (Mask R-CNN; ``RPNHead._predict_by_feat_single``, ``StandardRoIHead``
``predict_bbox`` / ``predict_mask``): the RPN as above with one score per anchor, the top
``nms_pre`` per level and NMS per level (mmdet's ``batched_nms`` over level ids, no score
threshold); each proposal pooled by ONNX ``RoiAlign`` (mmcv RoIAlign ``aligned=True`` is
``half_pixel``) from the FPN level its size selects (every level pooled, the right one kept by
``Where``); the box head's softmax scores and class-specific boxes, ``multiclass_nms`` as per-
class NMS over the (RoI, class) pairs; the mask head on the kept boxes, sigmoid, the label's
channel.

Nothing in the graph is a constant of the traced size: exported with free height / width
(``--dynamic``, batch 1) a file takes any input size.

Outputs: ``dets (1, K, 5)`` float32 ``[x1, y1, x2, y2, score]`` in the input's pixels
(the padded network input; the runtime wrapper clamps to the image and divides by the sample's
``scale_factor``), ``labels (1, K)`` int64, ``K <= max_per_img`` dynamic (no padding rows), and
for Mask R-CNN ``masks (1, K, M, M)`` the mask probabilities of each box (M = 28), which the
runtime wrapper pastes into the image with mmdet's own code.

Remaining differences to mmdet (docs/deploy.md): the order of equal scores (TopK / sort ties),
boxes clamped to the padded input instead of the unpadded image, ``min_bbox_size`` compared in
input pixels (mmdet: original-image pixels for RetinaNet; the same for the default 0), and mmdet
runs NMS on boxes shifted by ``label * (max coordinate + 1)``, whose float32 rounding can flip
an IoU that sits at the threshold.
"""
import numpy as np
import torch
import torch.nn as nn

from .contract import ATOL_OF_MAX, RTOL, ExportError

#: mmdet's ``delta2bbox`` default, which the heads' ``predict`` does not override
WH_RATIO_CLIP = 16 / 1000


class NonMaxSuppression(torch.autograd.Function):
    """ONNX ``NonMaxSuppression`` (corner boxes): ``boxes (1, N, 4)``, ``scores (1, C, N)`` ->
    ``selected (M, 3)`` int64 rows ``[batch, class, box]``, per class by descending score.

    The PyTorch forward follows the ONNX definition (a box is suppressed by a kept box of the
    same class whose IoU with it is ``> iou_threshold``; only scores ``> score_threshold``
    compete; at most ``max_per_class`` per class). It is the reference of the export check.
    """

    @staticmethod
    def forward(ctx, boxes, scores, max_per_class, iou_threshold, score_threshold):
        b = boxes[0].detach().double().cpu().numpy()
        s = scores[0].detach().cpu().numpy()
        x1, y1 = np.minimum(b[:, 0], b[:, 2]), np.minimum(b[:, 1], b[:, 3])
        x2, y2 = np.maximum(b[:, 0], b[:, 2]), np.maximum(b[:, 1], b[:, 3])
        area = (x2 - x1) * (y2 - y1)
        rows = []
        for c in range(s.shape[0]):
            idx = np.nonzero(s[c] > score_threshold)[0]
            idx = idx[np.argsort(-s[c][idx], kind='stable')]
            suppressed = np.zeros(len(idx), bool)
            kept = 0
            for i in range(len(idx)):
                if suppressed[i]:
                    continue
                rows.append((0, c, idx[i]))
                kept += 1
                if kept == max_per_class:
                    break
                j = idx[i + 1:]
                iw = np.minimum(x2[idx[i]], x2[j]) - np.maximum(x1[idx[i]], x1[j])
                ih = np.minimum(y2[idx[i]], y2[j]) - np.maximum(y1[idx[i]], y1[j])
                inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
                union = area[idx[i]] + area[j] - inter
                with np.errstate(divide='ignore', invalid='ignore'):
                    iou = np.where((union > 0) & (inter > 0), inter / union, 0.0)
                suppressed[i + 1:] |= iou > iou_threshold
        return torch.tensor(rows, dtype=torch.long).reshape(-1, 3).to(boxes.device)

    @staticmethod
    def symbolic(g, boxes, scores, max_per_class, iou_threshold, score_threshold):
        def const(value, dtype):
            return g.op('Constant', value_t=torch.tensor([value], dtype=dtype))
        return g.op('NonMaxSuppression', boxes, scores, const(max_per_class, torch.long),
                    const(iou_threshold, torch.float), const(score_threshold, torch.float))


class RoiAlign(torch.autograd.Function):
    """ONNX ``RoiAlign`` (avg): ``feats (1, C, H, W)``, ``boxes (N, 4)`` -> ``(N, C, S, S)``;
    mmcv's RoIAlign in PyTorch (the reference of the export check). ``aligned`` is ONNX's
    ``half_pixel`` coordinate mode, else ``output_half_pixel``."""

    @staticmethod
    def forward(ctx, feats, boxes, output_size, spatial_scale, sampling_ratio, aligned):
        from mmcv.ops import roi_align
        rois = torch.cat([boxes.new_zeros(len(boxes), 1), boxes], dim=1)
        return roi_align(feats, rois, (output_size, output_size), spatial_scale,
                         sampling_ratio, 'avg', aligned)

    @staticmethod
    def symbolic(g, feats, boxes, output_size, spatial_scale, sampling_ratio, aligned):
        batch_index = g.op('ConstantOfShape', g.op('Gather', g.op('Shape', boxes),
                                                   g.op('Constant', value_t=torch.tensor([0]))),
                           value_t=torch.tensor([0], dtype=torch.long))
        return g.op('RoiAlign', feats, boxes, batch_index,
                    coordinate_transformation_mode_s='half_pixel' if aligned
                    else 'output_half_pixel',
                    mode_s='avg', output_height_i=output_size, output_width_i=output_size,
                    sampling_ratio_i=sampling_ratio, spatial_scale_f=spatial_scale)


# --------------------------------------------------------------------------------------------
# the pieces both detectors share
# --------------------------------------------------------------------------------------------
def _check_coder(coder, owner):
    if type(coder).__name__ != 'DeltaXYWHBBoxCoder':
        raise ExportError(f'--end2end decodes boxes as DeltaXYWHBBoxCoder; {owner} uses '
                          f'{type(coder).__name__}. Export without --end2end.')


def _nms_settings(cfg, owner, classes=True):
    nms = dict(cfg.get('nms') or {})
    if nms.get('type', 'nms') != 'nms' or (classes and nms.get('class_agnostic', False)):
        raise ExportError(f'--end2end writes hard NMS per class / level (ONNX '
                          f'NonMaxSuppression); {owner} asks for {nms}. Export without '
                          f'--end2end.')
    return float(nms['iou_threshold'])


def traced_size(x, dim):
    """``x.shape[dim]`` as a 0-d int64 tensor: an ONNX ``Shape`` / ``Gather`` in a traced
    graph, where a Python int would become a constant of the traced size."""
    return torch._shape_as_tensor(x)[dim]


class BoxDecoder(nn.Module):
    """``DeltaXYWHBBoxCoder.decode`` (mmdet ``delta2bbox``) of one image, boxes clamped to the
    input's ``(H, W)`` (taken from the input in the graph) when the coder clips borders."""

    def __init__(self, coder):
        super().__init__()
        self.register_buffer('means', torch.tensor(coder.means, dtype=torch.float32),
                             persistent=False)
        self.register_buffer('stds', torch.tensor(coder.stds, dtype=torch.float32),
                             persistent=False)
        self.add_ctr_clamp, self.ctr_clamp = coder.add_ctr_clamp, float(coder.ctr_clamp)
        self.clip_border = coder.clip_border

    def forward(self, anchors, deltas, image):
        """Boxes of ``anchors`` moved by ``deltas``; ``image`` (1, C, H, W): the input whose
        size the boxes are clamped to."""
        d = deltas * self.stds + self.means
        pxy = (anchors[:, :2] + anchors[:, 2:]) * 0.5
        pwh = anchors[:, 2:] - anchors[:, :2]
        dxy_wh = pwh * d[:, :2]
        max_ratio = float(np.abs(np.log(WH_RATIO_CLIP)))
        if self.add_ctr_clamp:
            dxy_wh = dxy_wh.clamp(min=-self.ctr_clamp, max=self.ctr_clamp)
            dwh = d[:, 2:].clamp(max=max_ratio)
        else:
            dwh = d[:, 2:].clamp(min=-max_ratio, max=max_ratio)
        gxy = pxy + dxy_wh
        gwh = pwh * dwh.exp()
        boxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
        if self.clip_border:
            w, h = traced_size(image, 3), traced_size(image, 2)
            box_max = torch.stack([w, h, w, h]).to(boxes.dtype)
            boxes = torch.min(boxes.clamp(min=0), box_max)
        return boxes


class AnchorCandidates(nn.Module):
    """An anchor head's per-level candidates for one image: the top ``nms_pre`` (anchor,
    class) pairs of each level by sigmoid score, with their anchors and box deltas.

    The anchors are computed in the graph from each level's map size, as mmdet's
    ``AnchorGenerator.single_level_grid_priors``: the base anchors ``(A, 4)`` (a constant)
    plus the shifts ``Range(W) * stride_w`` / ``Range(H) * stride_h``, anchor ``(y * W + x) *
    A + a``; the same float32 operations, so the same values at every size."""

    def __init__(self, head, nms_pre):
        super().__init__()
        self.num_classes = head.cls_out_channels
        self.nms_pre = nms_pre
        generator = head.prior_generator
        self.strides = [(float(sw), float(sh)) for sw, sh in generator.strides]
        for i, base in enumerate(generator.base_anchors):
            self.register_buffer(f'base_anchors_{i}', base.float().clone(), persistent=False)
        # picks the x / y shift into the [x1, y1, x2, y2] columns
        self.register_buffer('x_cols', torch.tensor([1.0, 0.0, 1.0, 0.0]), persistent=False)
        self.register_buffer('y_cols', torch.tensor([0.0, 1.0, 0.0, 1.0]), persistent=False)

    def level_anchors(self, level, feat):
        """``(H * W * A, 4)`` anchors of ``level`` for its map ``feat`` (1, C, H, W)."""
        stride_w, stride_h = self.strides[level]
        shift_x = torch.arange(traced_size(feat, 3), device=feat.device).float() * stride_w
        shift_y = torch.arange(traced_size(feat, 2), device=feat.device).float() * stride_h
        # x * 1 + y * 0 is exactly x: the shifts are mmdet's, (H, W, 4)
        shifts = shift_x[None, :, None] * self.x_cols + shift_y[:, None, None] * self.y_cols
        base = getattr(self, f'base_anchors_{level}')
        return (base[None, None] + shifts[:, :, None]).reshape(-1, 4)

    def forward(self, cls_scores, bbox_preds):
        """``(scores, labels, level ids, anchors, deltas)`` of the candidates, levels
        concatenated."""
        out = [], [], [], [], []
        for i, (cls, reg) in enumerate(zip(cls_scores, bbox_preds)):
            pair_scores = cls.permute(0, 2, 3, 1).reshape(-1).sigmoid()   # (H, W, A, C)
            # k = min(nms_pre, pairs) from the traced size: the levels' sizes are free
            k = traced_size(pair_scores, 0)
            if self.nms_pre > 0:
                k = k.clamp(max=self.nms_pre)
            top, pair = pair_scores.topk(k)
            anchor = torch.div(pair, self.num_classes, rounding_mode='floor')
            for lst, v in zip(out, (
                    top, pair - anchor * self.num_classes, torch.full_like(pair, i),
                    self.level_anchors(i, cls).index_select(0, anchor),
                    reg.permute(0, 2, 3, 1).reshape(-1, 4).index_select(0, anchor))):
                lst.append(v)
        return [torch.cat(v) for v in out]


def nms_keep(boxes, scores, rows, num_rows, valid, iou_threshold, max_kept,
             score_threshold=None):
    """Indices of the boxes ONNX ``NonMaxSuppression`` keeps when each box competes only with
    the boxes of its row (class or level) and ``valid`` ones only, sorted by descending score,
    at most ``max_kept`` (per row and in all): mmdet's ``batched_nms(boxes, scores, rows)`` +
    ``[:max_kept]``. ``score_threshold``: only scores above it compete (``None``: all)."""
    # -1 (< any sigmoid / softmax score and any threshold) fills the other rows' entries
    fill = -1.0 if score_threshold is None else min(score_threshold, 0.0) - 1.0
    threshold = fill + 0.5 if score_threshold is None else score_threshold
    own_row = rows[None, :] == torch.arange(num_rows, device=rows.device)[:, None]
    row_scores = torch.where(own_row & valid[None, :], scores[None, :],
                             torch.full_like(scores, fill)[None, :])
    selected = NonMaxSuppression.apply(boxes[None], row_scores[None], max_kept,
                                       iou_threshold, threshold)
    keep = selected[:, 2]
    return keep.index_select(0, scores.index_select(0, keep).argsort(descending=True)[:max_kept])


class End2EndDetector(nn.Module):
    """What the two end-to-end detector parts share: the export check compares detections as
    sets (:func:`compare_detections`), their order being data dependent."""

    def compare(self, outs, refs, names=None):
        """``(ok, report)`` for the export check."""
        return compare_detections(outs, refs)


class SingleStageEnd2End(End2EndDetector):
    """mmdet single-stage anchor detector (RetinaNet) with its post-processing: image ->
    ``dets (1, K, 5)``, ``labels (1, K)`` (module docstring). Batch 1, any input size (the
    anchors, top-k sizes and clamp are computed from the input's size in the graph)."""
    part = 'single_stage_end2end'
    #: K is data dependent
    output_dynamic_axes = {'dets': {1: 'num_dets'}, 'labels': {1: 'num_dets'}}

    def __init__(self, detector):
        super().__init__()
        self.model = detector
        head = detector.bbox_head
        name = type(head).__name__
        _check_coder(head.bbox_coder, name)
        if not getattr(head, 'use_sigmoid_cls', False) or \
                getattr(head.loss_cls, 'custom_cls_channels', False):
            raise ExportError(f'--end2end scores classes with a sigmoid (RetinaNet); {name} '
                              f'uses a softmax / custom activation. Export without --end2end.')
        if not hasattr(head.prior_generator, 'num_base_anchors'):
            raise ExportError(f'--end2end needs an anchor generator; {name} uses '
                              f'{type(head.prior_generator).__name__}. Export without '
                              f'--end2end.')
        cfg = head.test_cfg
        self.iou_threshold = _nms_settings(cfg, f'{name} test_cfg')
        self.score_thr = float(cfg.get('score_thr', 0))
        self.min_bbox_size = float(cfg.get('min_bbox_size', -1))
        self.max_per_img = int(cfg.max_per_img)
        self.num_classes = head.cls_out_channels
        self.candidates = AnchorCandidates(head, int(cfg.get('nms_pre', -1)))
        self.decoder = BoxDecoder(head.bbox_coder)

    def output_names(self, num_outputs):
        return ['dets', 'labels']

    def forward(self, x):
        cls_scores, bbox_preds = self.model.bbox_head.forward(self.model.extract_feat(x))
        scores, labels, _, anchors, deltas = self.candidates(cls_scores, bbox_preds)
        boxes = self.decoder(anchors, deltas, x)
        valid = scores > self.score_thr
        if self.min_bbox_size >= 0:
            wh = boxes[:, 2:] - boxes[:, :2]
            valid = valid & (wh[:, 0] > self.min_bbox_size) & (wh[:, 1] > self.min_bbox_size)
        keep = nms_keep(boxes, scores, labels, self.num_classes, valid, self.iou_threshold,
                        self.max_per_img, self.score_thr)
        dets = torch.cat([boxes.index_select(0, keep),
                          scores.index_select(0, keep)[:, None]], dim=1)
        return dets[None], labels.index_select(0, keep)[None]


class RoiPooling(nn.Module):
    """mmdet ``SingleRoIExtractor`` (RoIAlign avg): each box pooled from the level its size
    selects (``floor(log2(sqrt(w h) / finest_scale + 1e-6))``, clamped).

    ONNX ``RoiAlign`` takes one feature map, so every level pools every box, and ``Where`` keeps
    each box's own level. On the other levels a box is replaced by a 1-pixel one: with
    ``sampling_ratio`` 0 the samples per bin grow with the box size on the map (a 400-pixel box:
    15x15 per bin on the stride-4 map, 2x2 on its own stride-32 one) for a result thrown away.
    Static shapes, no empty tensors.
    """

    def __init__(self, extractor):
        super().__init__()
        if type(extractor).__name__ != 'SingleRoIExtractor' or any(
                type(layer).__name__ != 'RoIAlign' or layer.pool_mode != 'avg'
                for layer in extractor.roi_layers):
            raise ExportError(f'--end2end pools RoIs as SingleRoIExtractor + RoIAlign (avg); '
                              f'got {type(extractor).__name__}. Export without --end2end.')
        self.finest_scale = extractor.finest_scale
        self.layers = [(int(layer.output_size[0]), float(layer.spatial_scale),
                        int(layer.sampling_ratio), bool(layer.aligned))
                       for layer in extractor.roi_layers]

    def forward(self, feats, boxes):
        wh = boxes[:, 2:] - boxes[:, :2]
        level = torch.floor(torch.log2(torch.sqrt(wh[:, 0] * wh[:, 1]) / self.finest_scale
                                       + 1e-6)).clamp(min=0, max=len(self.layers) - 1)
        pixel = torch.tensor([0.0, 0.0, 1.0, 1.0], device=boxes.device)
        pooled = None
        for i, args in enumerate(self.layers):
            own = level == i
            level_i = RoiAlign.apply(feats[i], torch.where(own[:, None], boxes, pixel), *args)
            pooled = level_i if pooled is None else \
                torch.where(own[:, None, None, None], level_i, pooled)
        return pooled


class TwoStageEnd2End(End2EndDetector):
    """mmdet two-stage detector (Mask R-CNN: RPN + StandardRoIHead with a box and a mask head)
    with its post-processing: image -> ``dets (1, K, 5)``, ``labels (1, K)``, ``masks (1, K, M,
    M)`` (module docstring). Batch 1, any input size (as :class:`SingleStageEnd2End`)."""
    part = 'two_stage_end2end'
    output_dynamic_axes = {'dets': {1: 'num_dets'}, 'labels': {1: 'num_dets'},
                           'masks': {1: 'num_dets'}}

    def __init__(self, detector):
        super().__init__()
        self.model = detector
        rpn, roi = detector.rpn_head, detector.roi_head
        _check_coder(rpn.bbox_coder, 'the RPN')
        if not hasattr(rpn.prior_generator, 'num_base_anchors') or rpn.cls_out_channels != 1:
            raise ExportError('--end2end needs an anchor RPN with one sigmoid score per anchor. '
                              'Export without --end2end.')
        rpn_cfg, rcnn_cfg = rpn.test_cfg, roi.test_cfg
        if type(roi).__name__ != 'StandardRoIHead' or not roi.with_mask or \
                roi.bbox_head.reg_class_agnostic or roi.mask_head.class_agnostic or \
                getattr(roi.bbox_head, 'custom_cls_channels', False):
            raise ExportError('--end2end exports Mask R-CNN (StandardRoIHead with a box head '
                              'regressing per class and a mask head per class). Export '
                              'without --end2end.')
        _check_coder(roi.bbox_head.bbox_coder, 'the RoI box head')
        self.rpn_iou = _nms_settings(rpn_cfg, 'the RPN test_cfg', classes=False)
        self.rpn_min_bbox_size = float(rpn_cfg.get('min_bbox_size', -1))
        self.rpn_max = int(rpn_cfg.max_per_img)
        self.rcnn_iou = _nms_settings(rcnn_cfg, 'the RoI head test_cfg')
        self.score_thr = float(rcnn_cfg.score_thr)
        self.max_per_img = int(rcnn_cfg.max_per_img)
        self.num_classes = roi.bbox_head.num_classes
        self.num_levels = rpn.prior_generator.num_levels
        self.candidates = AnchorCandidates(rpn, int(rpn_cfg.get('nms_pre', -1)))
        self.rpn_decoder = BoxDecoder(rpn.bbox_coder)
        self.rcnn_decoder = BoxDecoder(roi.bbox_head.bbox_coder)
        self.bbox_pool = RoiPooling(roi.bbox_roi_extractor)
        self.mask_pool = RoiPooling(roi.mask_roi_extractor)

    def output_names(self, num_outputs):
        return ['dets', 'labels', 'masks']

    def proposals(self, feats, x):
        """RPN: ``(P, 4)`` proposals by descending score (``x``: the input image)."""
        scores, _, level, anchors, deltas = self.candidates(*self.model.rpn_head.forward(feats))
        boxes = self.rpn_decoder(anchors, deltas, x)
        valid = torch.ones_like(scores, dtype=torch.bool)
        if self.rpn_min_bbox_size >= 0:
            wh = boxes[:, 2:] - boxes[:, :2]
            valid = (wh[:, 0] > self.rpn_min_bbox_size) & (wh[:, 1] > self.rpn_min_bbox_size)
        keep = nms_keep(boxes, scores, level, self.num_levels, valid, self.rpn_iou,
                        self.rpn_max)
        return boxes.index_select(0, keep)

    def forward(self, x):
        roi = self.model.roi_head
        feats = self.model.extract_feat(x)
        rois = self.proposals(feats, x)
        cls_score, bbox_pred = roi.bbox_head(self.bbox_pool(feats[:roi.bbox_roi_extractor
                                                                .num_inputs], rois))
        c = self.num_classes
        scores = cls_score.softmax(-1)[:, :c].reshape(-1)                  # (P, C) pairs
        boxes = self.rcnn_decoder(rois.repeat_interleave(c, dim=0), bbox_pred.reshape(-1, 4), x)
        labels = torch.arange(c, device=x.device).repeat(rois.shape[0])
        keep = nms_keep(boxes, scores, labels, c, scores > self.score_thr, self.rcnn_iou,
                        self.max_per_img, self.score_thr)
        det_boxes, det_labels = boxes.index_select(0, keep), labels.index_select(0, keep)
        mask_probs = roi.mask_head(self.mask_pool(feats[:roi.mask_roi_extractor.num_inputs],
                                                  det_boxes)).sigmoid()
        size = mask_probs.shape[-1]
        masks = mask_probs.gather(1, det_labels[:, None, None, None].expand(-1, 1, size, size))
        dets = torch.cat([det_boxes, scores.index_select(0, keep)[:, None]], dim=1)
        return dets[None], det_labels[None], masks[:, 0][None]


def end2end_part(model, batch=1):
    """The :class:`SingleStageEnd2End` / :class:`TwoStageEnd2End` of ``model``, or an
    :class:`ExportError` saying why it cannot be (not a detector, batch > 1)."""
    if not hasattr(model, 'bbox_head') and not hasattr(model, 'roi_head'):
        raise ExportError(f'--end2end exports detectors (RetinaNet, Mask R-CNN) with their '
                          f'post-processing; a {type(model).__name__} has none: drop --end2end')
    if batch != 1:
        raise ExportError(f'--end2end exports batch 1 (ONNX NonMaxSuppression output is '
                          f'written for one image; --dynamic frees height and width only); '
                          f'got --batch {batch}')
    if hasattr(model, 'roi_head'):
        return TwoStageEnd2End(model)
    return SingleStageEnd2End(model)


def compare_detections(outs, refs, box_atol_of_max=2e-4, score_atol=1e-5):
    """``(ok, report)``: ``dets`` / ``labels`` (and per-detection extras such as ``masks``) of a
    runtime against PyTorch's, as sets: the same number K, and each reference detection matched
    by one of the same label, score within ``score_atol``, box within ``box_atol_of_max *
    max|box|`` and extras within the reference-pack tolerance (near-equal scores may come out
    in another order)."""
    outs = [torch.as_tensor(np.asarray(o)) for o in outs]
    refs = [torch.as_tensor(np.asarray(r)) for r in refs]
    if [o.shape for o in outs] != [r.shape for r in refs]:
        return False, (f'output shapes {[tuple(o.shape) for o in outs]}, PyTorch '
                       f'{[tuple(r.shape) for r in refs]}')
    d, rd = outs[0][0].double(), refs[0][0].double()
    labels, ref_labels = outs[1][0], refs[1][0]
    extras = [(o[0].double(), r[0].double()) for o, r in zip(outs[2:], refs[2:])]
    tol = box_atol_of_max * max(float(rd[:, :4].abs().max()) if len(rd) else 0.0, 1.0)
    free = list(range(len(d)))
    worst, worst_extra = 0.0, 0.0
    for i in range(len(rd)):
        hit = [j for j in free if labels[j] == ref_labels[i]
               and abs(float(d[j, 4] - rd[i, 4])) <= score_atol
               and float((d[j, :4] - rd[i, :4]).abs().max()) <= tol]
        if not hit:
            return False, (f'PyTorch detection {i} (label {int(ref_labels[i])}, score '
                           f'{float(rd[i, 4]):.6f}, box {rd[i, :4].tolist()}) has no match '
                           f'within {tol:.2e} px / score {score_atol:g}')
        j = hit[0]
        for o, r in extras:
            err = (o[j] - r[i]).abs()
            allowed = ATOL_OF_MAX * r.abs().max() + RTOL * r[i].abs()
            if not bool((err <= allowed).all()):
                return False, (f'detection {i}: per-detection output differs by '
                               f'{float(err.max()):.2e} (allowed {float(allowed.max()):.2e})')
            worst_extra = max(worst_extra, float(err.max()))
        worst = max(worst, float((d[j, :4] - rd[i, :4]).abs().max()))
        free.remove(j)
    extra = f', max mask diff {worst_extra:.2e}' if extras else ''
    return True, (f'detections: ok  {len(rd)} matched (label, score within {score_atol:g}, '
                  f'max box diff {worst:.2e} px{extra})')


# --------------------------------------------------------------------------------------------
# a runtime's detections back into mmdet's results (attached by :mod:`.parts`)
# --------------------------------------------------------------------------------------------
def end2end_results(outs, batch_data_samples, rescale=True):
    """``bbox_head.predict`` for an end-to-end file: its ``dets`` / ``labels`` (exported input
    pixels) as mmdet's ``InstanceData``, boxes clamped to the sample's ``img_shape`` and, with
    ``rescale``, divided by its ``scale_factor`` (mmdet's ``scale_boxes``)."""
    from mmengine.structures import InstanceData
    dets, labels = outs     # (N, K, 5) / (N, K), or N per-image tensors (RuntimeSession)
    if len(batch_data_samples) != len(dets):
        raise ValueError(f'{len(batch_data_samples)} images in the batch, the file returned '
                         f'detections for {len(dets)}')
    results = []
    for i, sample in enumerate(batch_data_samples):
        meta = sample.metainfo
        boxes = dets[i][:, :4].clone()
        h, w = meta['img_shape'][:2]
        # the graph clamps to the (padded) input; mmdet clamps to the image inside it
        boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=h)
        if rescale:
            sw, sh = meta['scale_factor']
            boxes = boxes * boxes.new_tensor([1 / sw, 1 / sh]).repeat(2)
        results.append(InstanceData(bboxes=boxes, scores=dets[i][:, 4].clone(),
                                    labels=labels[i].clone()))
    return results


def end2end_mask_results(roi_head, outs, batch_data_samples, rescale=True):
    """``roi_head.predict`` for an end-to-end Mask R-CNN file: :func:`end2end_results` of its
    ``dets`` / ``labels``, and its ``masks`` (box-relative probabilities) pasted into the image
    by the mask head's own ``_predict_by_feat_single`` (which rescales the boxes in place, as
    in mmdet)."""
    from mmdet.models.utils import empty_instances
    dets, labels, masks = outs
    results = end2end_results([dets, labels], batch_data_samples, rescale=False)
    thr = roi_head.test_cfg.mask_thr_binary
    for i, (res, sample) in enumerate(zip(results, batch_data_samples)):
        if len(res) == 0:
            results[i] = empty_instances([sample.metainfo], dets[i].device, task_type='mask',
                                         instance_results=[res], mask_thr_binary=thr)[0]
            continue
        # the file already picked each box's class channel: index channel 0
        res.masks = roi_head.mask_head._predict_by_feat_single(
            mask_preds=masks[i][:, None], bboxes=res.bboxes,
            labels=torch.zeros_like(res.labels), img_meta=sample.metainfo,
            rcnn_test_cfg=roi_head.test_cfg, rescale=rescale, activate_map=True)
    return results


__all__ = ['NonMaxSuppression', 'RoiAlign', 'SingleStageEnd2End', 'TwoStageEnd2End',
           'end2end_part', 'compare_detections', 'nms_keep', 'end2end_results',
           'end2end_mask_results']
