"""A whole single-stage detector (RetinaNet) as one ONNX graph: image -> ``dets``, ``labels``.

:class:`SingleStageEnd2End` runs the detector's backbone, neck and head, then mmdet 3.3's test
post-processing (``BaseDenseHead._predict_by_feat_single`` + ``_bbox_post_process``) in
standard opset-17 ops:

1. per level: sigmoid of the class logits, ``TopK`` of ``nms_pre`` over the (anchor, class)
   pairs (mmdet's ``filter_scores_and_topk``: the top ``nms_pre`` pairs above ``score_thr``
   are the top ``nms_pre`` pairs of all, then those above the threshold);
2. the anchors of the exported size as graph constants, ``DeltaXYWHBBoxCoder`` decoding (means /
   stds, ``wh_ratio_clip`` 16/1000, centre clamp if configured) clamped to the exported input;
3. ``min_bbox_size``: boxes not wider and higher than it are dropped;
4. per-class NMS with ONNX ``NonMaxSuppression``: boxes ``(1, N, 4)``, scores ``(1, C, N)``
   holding each candidate's score in its own class row (``-1`` elsewhere and for dropped
   candidates), ``iou_threshold`` / ``score_thr`` of the config's ``test_cfg``, at most
   ``max_per_img`` per class;
5. the kept boxes sorted by score, the first ``max_per_img``.

Outputs: ``dets (1, K, 5)`` float32 ``[x1, y1, x2, y2, score]`` in the exported input's pixels
(the padded network input; the runtime wrapper clamps to the image and divides by the sample's
``scale_factor``) and ``labels (1, K)`` int64, ``K <= max_per_img`` dynamic (no padding rows).

Remaining differences to mmdet (docs/deploy.md): the order of equal scores (TopK / sort ties),
boxes clamped to the padded input instead of the unpadded image before NMS, ``min_bbox_size``
compared in input pixels (mmdet: original-image pixels; the same for the default 0), and mmdet
runs NMS on boxes shifted by ``label * (max coordinate + 1)``, whose float32 rounding can flip
an IoU that sits at the threshold.
"""
import numpy as np
import torch
import torch.nn as nn

from .export import ExportError

#: mmdet's ``delta2bbox`` default, which ``_predict_by_feat_single`` does not override
WH_RATIO_CLIP = 16 / 1000

MASK_RCNN_MESSAGE = (
    'Mask R-CNN is not exported end to end: its second stage pools every proposal from the FPN '
    'level its size selects with mmcv RoIAlign (ONNX RoiAlign holds one feature map per call, '
    'the per-level routing and the per-class box / mask gathers are not written here) and '
    'pastes each mask into the original image, whose size only the runtime knows. Export it '
    'without --end2end (backbone + FPN: feat_<l>) and evaluate with tools/test.py CONFIG '
    'FILE.onnx --backend onnxruntime|openvino --torch-weights CHECKPOINT (RPN and RoI heads in '
    'PyTorch).')


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


def _post_process_settings(head):
    """The head's test-time settings, or an :class:`ExportError` for what the graph does not
    reproduce."""
    name = type(head).__name__
    coder = head.bbox_coder
    if type(coder).__name__ != 'DeltaXYWHBBoxCoder':
        raise ExportError(f'--end2end decodes boxes as DeltaXYWHBBoxCoder (RetinaNet); '
                          f'{name} uses {type(coder).__name__}. Export without --end2end.')
    if not getattr(head, 'use_sigmoid_cls', False) or \
            getattr(head.loss_cls, 'custom_cls_channels', False):
        raise ExportError(f'--end2end scores classes with a sigmoid (RetinaNet); {name} uses a '
                          f'softmax / custom activation. Export without --end2end.')
    if not hasattr(head.prior_generator, 'num_base_anchors'):
        raise ExportError(f'--end2end needs an anchor generator; {name} uses '
                          f'{type(head.prior_generator).__name__}. Export without --end2end.')
    cfg = head.test_cfg
    nms = dict(cfg.get('nms') or {})
    if nms.get('type', 'nms') != 'nms' or nms.get('class_agnostic', False):
        raise ExportError(f'--end2end writes per-class hard NMS (ONNX NonMaxSuppression); the '
                          f'config asks for {nms}. Export without --end2end.')
    return dict(nms_pre=int(cfg.get('nms_pre', -1)), score_thr=float(cfg.get('score_thr', 0)),
                min_bbox_size=float(cfg.get('min_bbox_size', -1)),
                iou_threshold=float(nms['iou_threshold']), max_per_img=int(cfg.max_per_img))


class SingleStageEnd2End(nn.Module):
    """mmdet single-stage anchor detector (RetinaNet) with its post-processing: image ->
    ``dets (1, K, 5)``, ``labels (1, K)`` (module docstring). Built for one input size
    ``(H, W)``, batch 1."""
    part = 'single_stage_end2end'
    #: K is data dependent
    output_dynamic_axes = {'dets': {1: 'num_dets'}, 'labels': {1: 'num_dets'}}

    def __init__(self, detector, shape):
        super().__init__()
        self.model = detector
        head = detector.bbox_head
        self.settings = _post_process_settings(head)
        self.num_classes = head.cls_out_channels
        self.input_hw = tuple(int(s) for s in shape)
        coder = head.bbox_coder
        self.register_buffer('means', torch.tensor(coder.means, dtype=torch.float32),
                             persistent=False)
        self.register_buffer('stds', torch.tensor(coder.stds, dtype=torch.float32),
                             persistent=False)
        self.add_ctr_clamp, self.ctr_clamp = coder.add_ctr_clamp, float(coder.ctr_clamp)
        self.clip_border = coder.clip_border
        h, w = self.input_hw
        self.register_buffer('box_max', torch.tensor([w, h, w, h], dtype=torch.float32),
                             persistent=False)
        # the anchors of every level for this input size: constants of the graph
        with torch.no_grad():
            param = next(detector.parameters())
            dummy = param.new_zeros(1, 3, h, w)
            cls_scores, _ = head.forward(detector.extract_feat(dummy))
            sizes = [c.shape[-2:] for c in cls_scores]
            anchors = head.prior_generator.grid_priors(sizes, dtype=param.dtype,
                                                       device=param.device)
        self.level_sizes = [tuple(s) for s in sizes]
        for i, a in enumerate(anchors):
            self.register_buffer(f'anchors_{i}', a.tensor if hasattr(a, 'tensor') else a,
                                 persistent=False)

    def output_names(self, num_outputs):
        return ['dets', 'labels']

    def compare(self, outs, refs, names=None):
        """``(ok, report)`` for the export check: see :func:`compare_detections`."""
        return compare_detections(outs, refs)

    def decode(self, anchors, deltas):
        """``DeltaXYWHBBoxCoder.decode`` (mmdet ``delta2bbox``) for one image."""
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
            boxes = torch.min(boxes.clamp(min=0), self.box_max)
        return boxes

    def forward(self, x):
        s = self.settings
        cls_scores, bbox_preds = self.model.bbox_head.forward(self.model.extract_feat(x))
        if [tuple(c.shape[-2:]) for c in cls_scores] != self.level_sizes:
            raise ExportError(f'input {tuple(x.shape)} is not the size the anchors were built '
                              f'for ({self.input_hw})')
        scores, labels, boxes = [], [], []
        for i, (cls, reg) in enumerate(zip(cls_scores, bbox_preds)):
            pair_scores = cls.permute(0, 2, 3, 1).reshape(-1).sigmoid()   # (H, W, A, C)
            k = pair_scores.numel() if s['nms_pre'] <= 0 else \
                min(s['nms_pre'], pair_scores.numel())
            top, pair = pair_scores.topk(k)
            anchor = torch.div(pair, self.num_classes, rounding_mode='floor')
            labels.append(pair - anchor * self.num_classes)
            scores.append(top)
            deltas = reg.permute(0, 2, 3, 1).reshape(-1, 4).index_select(0, anchor)
            boxes.append(self.decode(getattr(self, f'anchors_{i}').index_select(0, anchor),
                                     deltas))
        scores, labels, boxes = torch.cat(scores), torch.cat(labels), torch.cat(boxes)
        valid = scores > s['score_thr']
        if s['min_bbox_size'] >= 0:
            wh = boxes[:, 2:] - boxes[:, :2]
            valid = valid & (wh[:, 0] > s['min_bbox_size']) & (wh[:, 1] > s['min_bbox_size'])
        # each candidate competes in its own class only; -1 is below any threshold
        fill = min(s['score_thr'], 0.0) - 1.0
        own_class = labels[None, :] == torch.arange(self.num_classes,
                                                    device=labels.device)[:, None]
        class_scores = torch.where(own_class & valid[None, :], scores[None, :],
                                   torch.full_like(scores, fill)[None, :])
        selected = NonMaxSuppression.apply(boxes[None], class_scores[None], s['max_per_img'],
                                           s['iou_threshold'], s['score_thr'])
        keep = selected[:, 2]
        kept_scores = scores.index_select(0, keep)
        order = keep.index_select(0, kept_scores.argsort(descending=True)[:s['max_per_img']])
        dets = torch.cat([boxes.index_select(0, order),
                          scores.index_select(0, order)[:, None]], dim=1)
        return dets[None], labels.index_select(0, order)[None]


def end2end_part(model, shape, batch=1, dynamic=False):
    """The :class:`SingleStageEnd2End` of ``model``, or an :class:`ExportError` saying why it
    cannot be (not a single-stage anchor detector, batch > 1, dynamic sizes)."""
    if hasattr(model, 'roi_head'):
        raise ExportError(MASK_RCNN_MESSAGE)
    if not hasattr(model, 'bbox_head'):
        raise ExportError(f'--end2end exports single-stage detectors (RetinaNet) with their '
                          f'post-processing; a {type(model).__name__} has none: drop --end2end')
    if dynamic:
        raise ExportError('--end2end is static: the anchors of the exported size are graph '
                          'constants. Drop --dynamic (one file per input size).')
    if batch != 1:
        raise ExportError(f'--end2end exports batch 1 (ONNX NonMaxSuppression output is '
                          f'written for one image); got --batch {batch}')
    return SingleStageEnd2End(model, shape)


def compare_detections(outs, refs, box_atol_of_max=2e-4, score_atol=1e-5):
    """``(ok, report)``: ``dets`` / ``labels`` of a runtime against PyTorch's, as sets: the same
    number K, and each reference detection matched by one of the same label, score within
    ``score_atol`` and box within ``box_atol_of_max * max|box|`` (near-equal scores may come
    out in another order)."""
    dets, labels = (torch.as_tensor(np.asarray(o)) for o in outs)
    ref_dets, ref_labels = (torch.as_tensor(np.asarray(r)) for r in refs)
    if dets.shape != ref_dets.shape or labels.shape != ref_labels.shape:
        return False, (f'dets {tuple(dets.shape)} / labels {tuple(labels.shape)}, PyTorch '
                       f'{tuple(ref_dets.shape)} / {tuple(ref_labels.shape)}')
    d, rd = dets[0].double(), ref_dets[0].double()
    tol = box_atol_of_max * max(float(rd[:, :4].abs().max()) if len(rd) else 0.0, 1.0)
    free = list(range(len(d)))
    worst = 0.0
    for i in range(len(rd)):
        hit = [j for j in free if labels[0, j] == ref_labels[0, i]
               and abs(float(d[j, 4] - rd[i, 4])) <= score_atol
               and float((d[j, :4] - rd[i, :4]).abs().max()) <= tol]
        if not hit:
            return False, (f'PyTorch detection {i} (label {int(ref_labels[0, i])}, score '
                           f'{float(rd[i, 4]):.6f}, box {rd[i, :4].tolist()}) has no match '
                           f'within {tol:.2e} px / score {score_atol:g}')
        worst = max(worst, float((d[hit[0], :4] - rd[i, :4]).abs().max()))
        free.remove(hit[0])
    return True, (f'dets / labels: ok  {len(rd)} detections matched (label, score within '
                  f'{score_atol:g}, max box diff {worst:.2e} px)')


__all__ = ['NonMaxSuppression', 'SingleStageEnd2End', 'end2end_part', 'compare_detections',
           'MASK_RCNN_MESSAGE']
