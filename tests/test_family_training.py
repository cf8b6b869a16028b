"""Each family's *paper* config trains for a few iterations through tools/train.py (and one is
evaluated through tools/test.py), in both toolboxes.

The paper configs are taken as they are and only pointed at the tiny synthetic shapes data with
small images (a programmatic override written to a temporary config file): model, optimizer,
schedulers, hooks and registry scopes are the real ones.
"""
import os.path as osp
import re

import pytest

from conftest import REPO
from test_tools import PY, _scalars, run

DET_CONFIGS = ['maskrcnn_efficientformer_l1', 'maskrcnn_efficientformerv2_s0',
               'maskrcnn_levit_128s', 'retinanet_mobileformer_26m']
SEG_CONFIGS = ['semfpn_efficientformer_l1', 'semfpn_efficientformerv2_s0', 'semfpn_levit_128s',
               'semfpn_mobileformer_151m']
SIZE = (128, 160)


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    from effbackbones.datasets.synthetic import make_shapes_dataset
    root = str(tmp_path_factory.mktemp('famdata') / 'shapes')
    make_shapes_dataset(root, num_train=4, num_val=2, size=SIZE, max_objects=3)
    return root


def _resize_steps(pipeline, scale):
    for step in pipeline:
        if step['type'] in ('Resize', 'RandomResize'):
            step['scale'] = scale
        if step['type'] == 'RandomCrop':
            step['crop_size'] = (128, 128)
        if step['type'] == 'RandomChoiceResize':
            step['scales'] = [scale]
    return pipeline


def _tiny(name, shapes, tmp_path):
    """The paper config, on tiny synthetic data, few iterations; written as a config file."""
    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(REPO, 'configs', name + '.py'))
    cfg.model.backbone.init_cfg = None
    classes = ('circle', 'square', 'triangle')
    if cfg.default_scope == 'mmdet':
        root = shapes + '/coco/'
        for split, loader in (('train', 'train_dataloader'), ('val', 'val_dataloader'),
                              ('val', 'test_dataloader')):
            ds = cfg[loader].dataset
            ds.data_root = root
            ds.ann_file = f'annotations/instances_{split}.json'
            ds.data_prefix = dict(img=f'{split}/')
            ds.metainfo = dict(classes=classes)
            ds.pipeline = _resize_steps(ds.pipeline, (160, 128))
            cfg[loader].num_workers = 0
            cfg[loader].persistent_workers = False
        cfg.train_dataloader.batch_size = 2
        for ev in ('val_evaluator', 'test_evaluator'):
            cfg[ev].ann_file = root + 'annotations/instances_val.json'
        # an untrained model's scores sit below mmdet's 0.05 threshold: keep them all so the
        # metric and the eager/deploy comparison have predictions to work on
        heads = [cfg.model.get('bbox_head')] + [cfg.model.get('roi_head', {}).get(k)
                                                for k in ('bbox_head', 'mask_head')]
        for head in heads:
            if head:
                head.num_classes = len(classes)
        test_cfg = cfg.model.test_cfg
        (test_cfg.rcnn if 'rcnn' in test_cfg else test_cfg).score_thr = 0.0
        cfg.train_cfg.max_epochs = 1
        cfg.train_cfg.val_interval = 1
        cfg.default_hooks.checkpoint.interval = 1
    else:
        root = shapes + '/seg/'
        for split, loader in (('train', 'train_dataloader'), ('val', 'val_dataloader'),
                              ('val', 'test_dataloader')):
            old = cfg[loader].dataset
            cfg[loader].dataset = dict(
                type='BaseSegDataset', data_root=root, img_suffix='.jpg', seg_map_suffix='.png',
                metainfo=dict(classes=('background',) + classes), reduce_zero_label=False,
                data_prefix=dict(img_path=f'img_dir/{split}', seg_map_path=f'ann_dir/{split}'),
                pipeline=_resize_steps(old.pipeline, (160, 128)))
            for step in cfg[loader].dataset.pipeline:
                if step['type'] == 'LoadAnnotations':
                    step['reduce_zero_label'] = False
            cfg[loader].num_workers = 0
            cfg[loader].persistent_workers = False
        cfg.train_dataloader.batch_size = 2
        cfg.model.data_preprocessor.size = (128, 128)
        cfg.train_cfg.max_iters = 2
        cfg.train_cfg.val_interval = 2
        cfg.default_hooks.checkpoint.interval = 2
    cfg.default_hooks.logger.interval = 1
    path = str(tmp_path / f'{name}_tiny.py')
    cfg.dump(path)
    return path, cfg


@pytest.mark.slow
@pytest.mark.parametrize('name', DET_CONFIGS + SEG_CONFIGS)
def test_paper_config_trains_a_few_iterations(name, shapes, tmp_path):
    path, cfg = _tiny(name, shapes, tmp_path)
    wd = str(tmp_path / 'wd')
    proc = run([PY, 'tools/train.py', path, '--work-dir', wd], timeout=900)
    log = proc.stdout + proc.stderr
    losses = [r['loss'] for r in _scalars(wd) if 'loss' in r]
    assert len(losses) >= 2 and all(l == l and l < 1e4 for l in losses), log[-3000:]
    ckpt = osp.join(wd, 'epoch_1.pth' if cfg.default_scope == 'mmdet' else 'iter_2.pth')
    assert osp.isfile(ckpt)
    # the validation at the end of training ran the real metric
    metric = r'coco/bbox_mAP: [\d.-]+' if cfg.default_scope == 'mmdet' else r'mIoU: [\d.]+'
    assert re.search(metric, log), log[-3000:]
    if name == 'maskrcnn_efficientformerv2_s0':
        # V2 in deploy mode through tools/test.py: the same detections as eager
        import pickle
        import numpy as np
        dumps = {}
        for mode, extra in (('eager', []), ('deploy', ['--deploy'])):
            out = str(tmp_path / f'{mode}.pkl')
            run([PY, 'tools/test.py', path, ckpt, '--work-dir', wd, '--out', out] + extra)
            with open(out, 'rb') as f:
                dumps[mode] = pickle.load(f)
        assert len(dumps['eager']) == len(dumps['deploy']) == 2
        for e, d in zip(dumps['eager'], dumps['deploy']):
            se = np.sort(e['pred_instances']['scores'].numpy())[::-1]
            sd = np.sort(d['pred_instances']['scores'].numpy())[::-1]
            assert len(se) > 0 and len(se) == len(sd)
            np.testing.assert_allclose(se, sd, rtol=1e-3, atol=1e-5)
