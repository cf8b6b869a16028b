"""ONNX export of the detectors (tools/export_onnx.py --config) and their evaluation in a runtime
(tools/test.py --backend) on a tiny synthetic COCO set (3 shapes images of 128x160, classes
circle / square / triangle, with a noise texture against score ties), with random-weight
checkpoints whose scores are spread for the same reason (RetinaNet: BatchNorm statistics from
the images, probed stable: no detection changes under 1e-7 input perturbations).

* RetinaNet (Mobile-Former-26M, narrow FPN / head): the raw-head file through tools/test.py in
  onnxruntime gives the PyTorch checkpoint's predictions and bbox mAP;
* RetinaNet end to end (``--end2end``: NMS in the graph): dets / labels equal to mmdet's
  ``predict`` in onnxruntime and OpenVINO, and tools/test.py with the file alone gives the
  checkpoint's predictions and bbox mAP in both runtimes;
* Mask R-CNN (the SwiftFormer-XS demo config): the backbone + neck file with the RPN / RoI heads
  in PyTorch (``--torch-weights``) gives PyTorch's predictions and bbox / segm mAP; end to end
  (``--end2end``: RPN, RoIAlign, NMS, mask head in the graph), mmdet's detections and the
  PyTorch mask probabilities in both runtimes, and through tools/test.py (two images per test
  batch, run one by one) the checkpoint's predictions (pasted masks included) and bbox / segm
  mAP;
* --end2end --dynamic (free height / width, batch 1): the graph's anchors are mmdet's at any map
  size; RetinaNet and Mask R-CNN files exported at 256x320 give mmdet's detections at other,
  non-square sizes in both runtimes, and through tools/test.py on a set whose images reach the
  network at two sizes the checkpoint's predictions and mAP;
* --end2end requests that cannot be met fail with what to do instead.
"""
import glob
import os
import os.path as osp
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO

PY = sys.executable
CLASSES = ('circle', 'square', 'triangle')


def _write_config(path, base, data_root, body=''):
    """A config inheriting ``base`` (a path in the repo) that tests on ``data_root``'s val
    split, one image per batch, the images resized 2x (128x160 -> 256x320, multiples of 32, so
    the exported size is every test input's size)."""
    path.write_text(f"""
_base_ = [{osp.join(REPO, base)!r}]
data_root = {data_root!r}
metainfo = dict(classes={CLASSES!r})
{body}
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(320, 256), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
test_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo,
                 ann_file='annotations/instances_val.json', data_prefix=dict(img='val/'),
                 test_mode=True, pipeline=test_pipeline))
test_evaluator = dict(type='CocoMetric', ann_file=data_root + 'annotations/instances_val.json',
                      metric=metric, format_only=False, backend_args=None)
""")


RETINA_BODY = """
# narrow FPN / head: the test checks the export path, not the capacity
model = dict(
    backbone=dict(init_cfg=None),
    neck=dict(out_channels=64),
    bbox_head=dict(num_classes=3, in_channels=64, feat_channels=64, stacked_convs=2))
metric = 'bbox'
"""
MASK_BODY = """
metric = ['bbox', 'segm']
"""


def _write_textured(src, dst, seed):
    """``src`` plus a uniform noise texture of +-48 grey levels, written to ``dst``. On the
    synthetic images' flat backgrounds neighbouring anchors score equal to ~1e-6, and which of
    two such overlapping boxes NMS keeps then depends on the CPU's rounding, not on the file
    (on an AMD EPYC with AVX-512 OpenVINO kept the box 10 px to the side of mmdet's, and the
    next suppression differed too). The texture gives the images contrast everywhere; the
    random-weight RetinaNet also needed its BatchNorm statistics from the images
    (:func:`_spread_retinanet`) to keep that contrast in its deeper maps."""
    import cv2
    pixels = cv2.imread(src).astype(np.int16)
    noise = np.random.RandomState(seed).randint(-48, 49, pixels.shape)
    cv2.imwrite(dst, np.clip(pixels + noise, 0, 255).astype(np.uint8))


@torch.no_grad()
def _spread_retinanet(model, images):
    """Give the random-weight RetinaNet separated scores and boxes to detect.

    * Its Mobile-Former-26M's stride-16 / 32 maps barely varied across an image (neighbouring
      pixels ~1e-5 of the map's range apart: the random convs shrink the image's contrast,
      the token path adds the same to every pixel), so neighbouring stride-16 anchors scored
      alike to ~1e-6, and a 1e-6 perturbation of the input changed the detections of one
      val image in 16 of 20 tries — ties a runtime's rounding decides. BatchNorm statistics
      taken from the val images (one pass in train mode) keep every map's contrast: then no
      detection changed in 20 perturbations of any input the tests use.
    * The head starts at class prior 0.01 (< score_thr 0.05) with near-zero box deltas:
      random weights would detect nothing. Class logits scaled to std 2 around -4 (~30% of
      the anchor / class pairs above the threshold) and deltas to std 0.1 give thresholding,
      top-k, decoding and NMS work to do.
    """
    # the val images and noise (the tests run both): statistics that keep either in range
    inputs = torch.cat([_image_input(model, path) for path in images] +
                       [torch.randn(2, 3, 256, 320, generator=torch.Generator().manual_seed(0))])
    norms = {m: m.momentum for m in model.backbone.modules()
             if isinstance(m, torch.nn.BatchNorm2d)}
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None                     # cumulative: one batch -> its statistics
    model.backbone.train()
    model.backbone(inputs)
    model.backbone.eval()
    for bn, momentum in norms.items():
        bn.momentum = momentum
    head = model.bbox_head
    torch.nn.init.normal_(head.retina_cls.weight)
    torch.nn.init.normal_(head.retina_reg.weight)
    head.retina_cls.bias.zero_()
    cls, reg = head(model.neck(model.backbone(inputs)))
    head.retina_cls.weight.mul_(2.0 / torch.cat([c.flatten() for c in cls]).std())
    head.retina_cls.bias.fill_(-4.0)
    head.retina_reg.weight.mul_(0.1 / torch.cat([r.flatten() for r in reg]).std())


@pytest.fixture(scope='module')
def det(tmp_path_factory):
    """The synthetic COCO set, the two configs and random-weight checkpoints of them."""
    from mmengine.config import Config
    from effbackbones.datasets.synthetic import make_shapes_dataset
    from effbackbones.utils.launch import build_model
    tmp = tmp_path_factory.mktemp('det_export')
    shapes = str(tmp / 'shapes')
    make_shapes_dataset(shapes, num_train=1, num_val=3, size=(128, 160), max_objects=3)
    data_root = osp.join(shapes, 'coco') + '/'
    for i, path in enumerate(sorted(glob.glob(osp.join(data_root, 'val', '*.png')))):
        _write_textured(path, path, seed=i)
    out = dict(tmp=tmp, data_root=data_root)
    for name, base, body in (
            ('retinanet', 'configs/retinanet_mobileformer_26m.py', RETINA_BODY),
            ('maskrcnn', 'configs/demo/maskrcnn_swiftformer_xs_shapes.py', MASK_BODY)):
        cfg_path = tmp / f'{name}.py'
        _write_config(cfg_path, base, data_root, body)
        torch.manual_seed(0)
        model = build_model(Config.fromfile(str(cfg_path)))
        model.init_weights()
        if name == 'retinanet':
            _spread_retinanet(model, sorted(glob.glob(osp.join(data_root, 'val', '*.png'))))
        else:
            # Mask R-CNN's random RPN scores every anchor 0.5001-0.5003 and its box head every
            # class ~0.25: candidates tie to ~1e-6 at the top-k / NMS decisions, where a
            # runtime's rounding can go the other way (seen: three of these tests failed in
            # every runtime on textured images). RPN logits of std ~2 at stride 4 and spread
            # class scores separate them (then those images matched mmdet, as did six other
            # textures tried) and still leave the box head's 20 detections per image.
            with torch.no_grad():
                torch.nn.init.normal_(model.rpn_head.rpn_cls.weight, std=100.0)
                torch.nn.init.normal_(model.roi_head.bbox_head.fc_cls.weight, std=5.0)
        ckpt = tmp / f'{name}.pth'
        torch.save({'state_dict': model.state_dict(), 'meta': {}}, ckpt)
        out[name] = dict(config=str(cfg_path), ckpt=str(ckpt))
    return out


def _export_tool(args):
    sys.path.insert(0, osp.join(REPO, 'tools'))
    import export_onnx
    return export_onnx.main(args)


def _export(args):
    assert _export_tool(args) == 0


def _test_tool(config, model_file, work_dir, dump, extra=()):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    proc = subprocess.run([PY, 'tools/test.py', config, model_file, '--work-dir', str(work_dir),
                           '--out', str(dump)] + list(extra),
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    with open(dump, 'rb') as f:
        preds = pickle.load(f)
    return log, preds


def _metric(log, name):
    m = re.findall(rf'coco/{name}_mAP: (-?[\d.]+)', log)
    assert m, log[-3000:]
    return m[-1]


def _match(p, r, atol):
    """Index of the detection of ``p`` matching each of ``r`` (same label, score within 1e-5,
    box within ``atol``): near-equal scores may come out in either order."""
    free = list(range(len(p['scores'])))
    order = []
    for i in range(len(r['scores'])):
        hit = [j for j in free if p['labels'][j] == r['labels'][i]
               and abs(float(p['scores'][j] - r['scores'][i])) <= 1e-5
               and float((p['bboxes'][j] - r['bboxes'][i]).abs().max()) <= atol]
        assert hit, (f'no match for detection {i}: label {int(r["labels"][i])} score '
                     f'{float(r["scores"][i]):.6f} box {r["bboxes"][i].tolist()}')
        order.append(hit[0])
        free.remove(hit[0])
    return order


def _same_predictions(preds, refs, atol=1e-3, masks=False):
    """Same images and, per image, the same number of detections, each matching one of the
    PyTorch run (label, score, box within ``atol`` pixels of the original image; masks up to
    a few boundary pixels). Returns the number of detections."""
    assert len(preds) == len(refs)
    total = 0
    for p, r in zip(preds, refs):
        assert p['img_id'] == r['img_id']
        p, r = p['pred_instances'], r['pred_instances']
        assert len(p['scores']) == len(r['scores']), (len(p['scores']), len(r['scores']))
        order = _match(p, r, atol)
        if masks:               # RLE in the dump
            from pycocotools.mask import decode
            for j, rm in zip(order, r['masks']):
                diff = int((decode(p['masks'][j]) != decode(rm)).sum())
                assert diff <= 1e-3 * rm['size'][0] * rm['size'][1] + 1, diff
        total += len(r['scores'])
    return total


@pytest.fixture(scope='module')
def pytorch_run(det):
    """``pytorch_run(name)``: tools/test.py on that checkpoint, (log, predictions), run once."""
    cache = {}

    def run(name):
        if name not in cache:
            cfg = det[name]
            cache[name] = _test_tool(cfg['config'], cfg['ckpt'], det['tmp'] / f'wd_{name}',
                                     det['tmp'] / f'{name}_pytorch.pkl')
        return cache[name]
    return run


@pytest.mark.slow
def test_retinanet_raw_head_file_in_tools_test(det, pytorch_run, tmp_path):
    """RetinaNet exported as backbone + FPN + raw head outputs; anchors, decoding and NMS in
    PyTorch: tools/test.py in onnxruntime gives the checkpoint's predictions and bbox mAP."""
    cfg = det['retinanet']
    onnx_file = str(tmp_path / 'retinanet_raw.onnx')
    _export(['--config', cfg['config'], '--checkpoint', cfg['ckpt'], '--shape', '256', '320',
             '--out', onnx_file])
    log_pt, ref = pytorch_run('retinanet')
    log_rt, preds = _test_tool(cfg['config'], onnx_file, tmp_path / 'wd',
                               tmp_path / 'ort.pkl', ['--backend', 'onnxruntime'])
    assert _same_predictions(preds, ref) > 0
    assert _metric(log_rt, 'bbox') == _metric(log_pt, 'bbox')


def _image_input(model, path):
    """A synthetic val image as the test pipeline feeds it (2x resize, normalised)."""
    import cv2
    from mmdet.structures import DetDataSample
    img = cv2.resize(cv2.imread(path), (320, 256), interpolation=cv2.INTER_LINEAR)
    data = model.data_preprocessor(
        dict(inputs=[torch.from_numpy(img).permute(2, 0, 1)],
             data_samples=[DetDataSample(metainfo=dict(img_shape=(256, 320)))]), False)
    return data['inputs']


@pytest.mark.parametrize('score_thr', [None, 0.8], ids=['config_thr', 'thr0.8'])
def test_retinanet_end2end_matches_mmdet_predict(det, score_thr, tmp_path):
    """The end-to-end file in onnxruntime and OpenVINO returns mmdet's detections (same count,
    labels, scores, boxes within 2e-4 of max|box|) on a synthetic image and on noise, with the
    config's score_thr (max_per_img detections) and a higher one (fewer)."""
    from mmdet.structures import DetDataSample
    from effbackbones.deploy import RuntimeSession, build_from_config, export
    from effbackbones.deploy.detection import compare_detections
    cfg = det['retinanet']
    opts = {} if score_thr is None else {'model.test_cfg.score_thr': score_thr}
    model, _ = build_from_config(cfg['config'], cfg['ckpt'], cfg_options=opts)
    out = str(tmp_path / 'end2end.onnx')
    export(model, (256, 320), out, end2end=True, log=lambda *_: None)
    image = osp.join(det['data_root'], 'val', 'val_00000.png')
    noise = torch.randn(1, 3, 256, 320, generator=torch.Generator().manual_seed(3))
    inputs = [_image_input(model, image), noise]
    counts = []
    sessions = [RuntimeSession(out, b, threads=1) for b in ('onnxruntime', 'openvino')]
    assert sessions[0].part == 'single_stage_end2end'
    assert sessions[0].output_names == ['dets', 'labels']
    for x in inputs:
        meta = dict(img_shape=(256, 320), ori_shape=(256, 320), scale_factor=(1.0, 1.0))
        with torch.no_grad():
            ref = model.predict(x, [DetDataSample(metainfo=meta)], rescale=False)[0]
        ref = ref.pred_instances
        refs = [torch.cat([ref.bboxes, ref.scores[:, None]], 1)[None], ref.labels[None]]
        counts.append(len(ref.scores))
        for sess in sessions:
            dets, labels = sess(x)
            assert dets.shape == (1, len(ref.scores), 5) and labels.dtype == torch.int64
            ok, report = compare_detections([dets, labels], refs)
            assert ok, f'{sess.backend}: {report}'
    if score_thr is None:
        assert counts[0] == model.bbox_head.test_cfg.max_per_img
    else:
        assert 0 < counts[0] < model.bbox_head.test_cfg.max_per_img


@pytest.mark.slow
@pytest.mark.parametrize('backend', ['onnxruntime', 'openvino'])
def test_retinanet_end2end_file_in_tools_test(det, pytorch_run, backend, tmp_path):
    """tools/test.py with the end-to-end file alone (no --torch-weights): the boxes mapped back
    to the original image give the checkpoint's predictions and bbox mAP."""
    cfg = det['retinanet']
    onnx_file = str(tmp_path / 'retinanet_end2end.onnx')
    _export(['--config', cfg['config'], '--checkpoint', cfg['ckpt'], '--shape', '256', '320',
             '--end2end', '--out', onnx_file])
    log_pt, ref = pytorch_run('retinanet')
    log_rt, preds = _test_tool(cfg['config'], onnx_file, tmp_path / 'wd',
                               tmp_path / 'rt.pkl', ['--backend', backend])
    assert _same_predictions(preds, ref) > 0
    assert _metric(log_rt, 'bbox') == _metric(log_pt, 'bbox')


def test_maskrcnn_end2end_matches_mmdet_predict(det, tmp_path):
    """The end-to-end Mask R-CNN file in onnxruntime and OpenVINO returns mmdet's detections
    and the PyTorch graph's mask probabilities on a synthetic image and on noise."""
    from mmdet.structures import DetDataSample
    from effbackbones.deploy import RuntimeSession, build_from_config, export
    from effbackbones.deploy.detection import TwoStageEnd2End
    cfg = det['maskrcnn']
    model, _ = build_from_config(cfg['config'], cfg['ckpt'])
    out = str(tmp_path / 'end2end.onnx')
    export(model, (256, 320), out, end2end=True, log=lambda *_: None)
    part = TwoStageEnd2End(model).eval()
    image = osp.join(det['data_root'], 'val', 'val_00001.png')
    noise = torch.randn(1, 3, 256, 320, generator=torch.Generator().manual_seed(3))
    sessions = [RuntimeSession(out, b, threads=1) for b in ('onnxruntime', 'openvino')]
    assert sessions[0].part == 'two_stage_end2end'
    assert sessions[0].output_names == ['dets', 'labels', 'masks']
    for x in (_image_input(model, image), noise):
        meta = dict(img_shape=(256, 320), ori_shape=(256, 320), scale_factor=(1.0, 1.0))
        with torch.no_grad():
            ref = model.predict(x, [DetDataSample(metainfo=meta)], rescale=False)[0]
            graph = part(x)
        ref = ref.pred_instances
        assert len(ref.scores) == model.roi_head.test_cfg.max_per_img
        assert graph[2].shape == (1, len(ref.scores), 28, 28)
        refs = [torch.cat([ref.bboxes, ref.scores[:, None]], 1)[None], ref.labels[None]]
        _check_end2end_outputs(graph, refs, sessions, x, masks=True)


def _check_end2end_outputs(graph, refs, sessions, x, masks=False):
    """The PyTorch graph's detections and each runtime's equal to mmdet's ``refs`` (as sets);
    with ``masks`` the runtimes' masks equal to the graph's."""
    from effbackbones.deploy.detection import compare_detections
    where = f'input {tuple(x.shape)}'
    ok, report = compare_detections(graph[:2], refs)
    assert ok, f'PyTorch graph, {where}: {report}'
    for sess in sessions:
        outs = sess(x)
        ok, report = compare_detections(outs[:2], refs)
        assert ok, f'{sess.backend}, {where}: {report}'
        if masks:
            ok, report = compare_detections(outs, graph)
            assert ok, f'{sess.backend} masks, {where}: {report}'


@pytest.mark.slow
@pytest.mark.parametrize('backend', ['onnxruntime', 'openvino'])
def test_maskrcnn_end2end_file_in_tools_test(det, pytorch_run, backend, tmp_path):
    """tools/test.py with the end-to-end Mask R-CNN file alone, two images per test batch (the
    file takes one: the wrapper runs the batch image by image): the checkpoint's predictions
    (masks pasted into the image by mmdet's code) and bbox / segm mAP."""
    cfg = det['maskrcnn']
    onnx_file = str(tmp_path / 'maskrcnn_end2end.onnx')
    _export(['--config', cfg['config'], '--checkpoint', cfg['ckpt'], '--shape', '256', '320',
             '--end2end', '--out', onnx_file])
    log_pt, ref = pytorch_run('maskrcnn')
    log_rt, preds = _test_tool(cfg['config'], onnx_file, tmp_path / 'wd', tmp_path / 'rt.pkl',
                               ['--backend', backend,
                                '--cfg-options', 'test_dataloader.batch_size=2'])
    assert 'Epoch(test) [2/2]' in log_rt           # 3 images: a batch of 2, then 1
    assert _same_predictions(preds, ref, masks=True) > 0
    for metric in ('bbox', 'segm'):
        assert _metric(log_rt, metric) == _metric(log_pt, metric)


def test_end2end_anchors_are_mmdet_anchors(det):
    """The anchors the end-to-end graph computes from a level's map size are exactly mmdet's
    ``grid_priors`` (same values, same order) at several sizes, square or not."""
    from effbackbones.deploy import build_from_config
    from effbackbones.deploy.detection import AnchorCandidates
    for name in ('retinanet', 'maskrcnn'):
        model, _ = build_from_config(det[name]['config'], det[name]['ckpt'])
        head = model.bbox_head if name == 'retinanet' else model.rpn_head
        candidates = AnchorCandidates(head, 1000)
        for hw in ((1, 1), (2, 3), (5, 2), (8, 10), (40, 23)):
            levels = head.prior_generator.num_levels
            ref = head.prior_generator.grid_priors([hw] * levels, device='cpu')
            for level in range(levels):
                got = candidates.level_anchors(level, torch.zeros(1, 1, *hw))
                assert torch.equal(got, getattr(ref[level], 'tensor', ref[level])), (name, hw)


def _predict_refs(model, x):
    """mmdet's ``predict`` of input ``x`` (image = the whole input) as ``[dets, labels]``."""
    from mmdet.structures import DetDataSample
    hw = tuple(x.shape[-2:])
    meta = dict(img_shape=hw, ori_shape=hw, scale_factor=(1.0, 1.0))
    with torch.no_grad():
        ref = model.predict(x, [DetDataSample(metainfo=meta)], rescale=False)[0].pred_instances
    return [torch.cat([ref.bboxes, ref.scores[:, None]], 1)[None], ref.labels[None]]


@pytest.mark.parametrize('name', ['retinanet', 'maskrcnn'])
def test_dynamic_end2end_matches_mmdet_predict_at_other_sizes(det, name, tmp_path):
    """An end-to-end file exported with --dynamic at 256x320 returns mmdet's detections in
    onnxruntime and OpenVINO at other, non-square sizes (anchors, top-k sizes and box clamp
    follow the input), Mask R-CNN's masks the PyTorch graph's; batch stays 1 (a batch of
    two runs image by image)."""
    from effbackbones.deploy import RuntimeSession, build_from_config, export
    from effbackbones.deploy.detection import end2end_part
    cfg = det[name]
    model, _ = build_from_config(cfg['config'], cfg['ckpt'])
    out = str(tmp_path / 'end2end_dynamic.onnx')
    reports = export(model, (256, 320), out, dynamic=True, end2end=True, log=lambda *_: None)
    assert len(reports) == 2 and '1x3x288x384' in reports[1]  # the export checked a 2nd size
    part = end2end_part(model).eval()
    sessions = [RuntimeSession(out, b, threads=1) for b in ('onnxruntime', 'openvino')]
    assert tuple(sessions[0].input_dims) == (1, 3, None, None)
    # noise: the synthetic images' flat background gives neighbouring anchors scores equal to
    # ~1e-6, whose order (a documented difference) may keep another of two overlapping boxes
    g = torch.Generator().manual_seed(5)
    for x in (torch.randn(1, 3, 224, 352, generator=g), torch.randn(1, 3, 320, 192, generator=g)):
        refs = _predict_refs(model, x)
        assert len(refs[1][0]) > 0
        with torch.no_grad():
            graph = part(x)
        _check_end2end_outputs(graph, refs, sessions, x, masks=name == 'maskrcnn')
    # a batch runs image by image: per output, one tensor per image (K differs per image)
    xb = torch.randn(2, 3, 224, 352, generator=g)
    for sess in sessions:
        batched = sess(xb)
        assert len(batched) == len(graph) and all(len(o) == 2 for o in batched)
        for i in range(2):
            for got, alone in zip(batched, sess(xb[i:i + 1])):
                assert torch.equal(got[i], alone[0])


@pytest.fixture(scope='module')
def two_sizes(det):
    """The val images of ``det`` (128x160) and two of 80x200 as one COCO val set, with the
    configs of ``det`` testing on it: the test pipeline's keep-ratio resize gives 256x320 and
    128x320 network inputs (multiples of 32: no padding), textured as ``det``'s
    (:func:`_write_textured`)."""
    import json
    import shutil
    from effbackbones.datasets.synthetic import make_shapes_dataset
    tmp = det['tmp']
    wide = make_shapes_dataset(str(tmp / 'wide'), num_train=1, num_val=2, size=(80, 200),
                               max_objects=3, seed=7)
    root = tmp / 'two_sizes' / 'coco'
    (root / 'val').mkdir(parents=True)
    (root / 'annotations').mkdir()
    merged = None
    for src, prefix in ((det['data_root'], 'a_'), (osp.join(wide, 'coco') + '/', 'b_')):
        with open(osp.join(src, 'annotations', 'instances_val.json')) as f:
            coco = json.load(f)
        if merged is None:
            merged = dict(coco, images=[], annotations=[])
        ids = {}
        for img in coco['images']:
            ids[img['id']] = len(merged['images']) + 1
            src_file = osp.join(src, 'val', img['file_name'])
            dst_file = str(root / 'val' / (prefix + img['file_name']))
            if src == det['data_root']:
                shutil.copy(src_file, dst_file)       # textured already
            else:
                _write_textured(src_file, dst_file, seed=100 + ids[img['id']])
            merged['images'].append(dict(img, id=ids[img['id']],
                                         file_name=prefix + img['file_name']))
        for ann in coco['annotations']:
            merged['annotations'].append(dict(ann, id=len(merged['annotations']) + 1,
                                              image_id=ids[ann['image_id']]))
    with open(root / 'annotations' / 'instances_val.json', 'w') as f:
        json.dump(merged, f)
    out = {}
    for name, base, body in (
            ('retinanet', 'configs/retinanet_mobileformer_26m.py', RETINA_BODY),
            ('maskrcnn', 'configs/demo/maskrcnn_swiftformer_xs_shapes.py', MASK_BODY)):
        cfg_path = tmp / f'{name}_two_sizes.py'
        _write_config(cfg_path, base, str(root) + '/', body)
        out[name] = str(cfg_path)
    return out


@pytest.mark.slow
@pytest.mark.parametrize('name,backend', [('retinanet', 'openvino'),
                                          ('maskrcnn', 'onnxruntime')])
def test_dynamic_end2end_file_in_tools_test_with_varying_sizes(det, two_sizes, name, backend,
                                                               tmp_path):
    """tools/test.py with one --dynamic end-to-end file on a test set whose images reach the
    network at two sizes: the checkpoint's predictions and mAP (bbox, Mask R-CNN segm)."""
    config, ckpt = two_sizes[name], det[name]['ckpt']
    onnx_file = str(tmp_path / f'{name}_end2end_dynamic.onnx')
    _export(['--config', config, '--checkpoint', ckpt, '--shape', '256', '320', '--end2end',
             '--dynamic', '--out', onnx_file])
    log_pt, ref = _test_tool(config, ckpt, tmp_path / 'wd_pt', tmp_path / 'pt.pkl')
    log_rt, preds = _test_tool(config, onnx_file, tmp_path / 'wd', tmp_path / 'rt.pkl',
                               ['--backend', backend])
    assert {tuple(p['img_shape']) for p in ref} == {(256, 320), (128, 320)}
    assert _same_predictions(preds, ref, masks=name == 'maskrcnn') > 0
    for metric in ('bbox', 'segm') if name == 'maskrcnn' else ('bbox',):
        assert _metric(log_rt, metric) == _metric(log_pt, metric)


@pytest.mark.parametrize('args,message', [
    (['--model', 'SwiftFormer', '--arch', 'xs'],
     r'--end2end exports detectors .* a SwiftFormer has none: drop --end2end'),
    (['retinanet', '--batch', '2'], r'--end2end exports batch 1'),
    (['retinanet', '--batch', '2', '--dynamic'],
     r'--end2end exports batch 1 .*--dynamic frees height and width only'),
])
def test_end2end_clear_errors(det, args, message, tmp_path, capsys):
    if args[0] in det:
        args = ['--config', det[args[0]]['config'], '--checkpoint', det[args[0]]['ckpt']] \
            + args[1:]
    out = tmp_path / 'x.onnx'
    assert _export_tool(args + ['--shape', '256', '320', '--end2end', '--out', str(out)]) == 2
    assert re.search(message, capsys.readouterr().err, re.S)
    assert not out.exists()


def test_end2end_results_clamp_to_the_image_and_rescale():
    """The wrapper of an end-to-end file: boxes in the padded input are clamped to the image
    (``img_shape``) and mapped to the original image as mmdet's ``rescale`` does."""
    from mmdet.structures import DetDataSample
    from mmdet.structures.bbox import scale_boxes
    from effbackbones.deploy.detection import end2end_results
    dets = torch.tensor([[[-3.0, 10.0, 150.0, 90.0, 0.9],       # crosses left and right
                          [20.0, 40.5, 60.0, 125.0, 0.7]]])     # into the bottom padding
    labels = torch.tensor([[2, 0]])
    meta = dict(img_shape=(120, 140), scale_factor=(2.0, 1.6))
    res = end2end_results([dets, labels], [DetDataSample(metainfo=meta)])[0]
    clamped = torch.tensor([[0.0, 10.0, 140.0, 90.0], [20.0, 40.5, 60.0, 120.0]])
    assert torch.equal(res.bboxes, scale_boxes(clamped, [1 / 2.0, 1 / 1.6]))
    assert torch.equal(res.scores, dets[0, :, 4]) and torch.equal(res.labels, labels[0])
    unscaled = end2end_results([dets, labels], [DetDataSample(metainfo=meta)], rescale=False)
    assert torch.equal(unscaled[0].bboxes, clamped)
    with pytest.raises(ValueError, match='2 images in the batch'):
        end2end_results([dets, labels], [DetDataSample(metainfo=meta)] * 2)
