"""Every config under configs/ builds its model in its toolbox and runs a forward; the paper
recipes are what the configs say they are; FPN in_channels match the backbone."""
import glob
import os.path as osp

import pytest
import torch

from conftest import REPO

CONFIGS = sorted(p for p in glob.glob(osp.join(REPO, 'configs', '**', '*.py'), recursive=True)
                 if '_base_' not in p)
PAPER = [p for p in CONFIGS if '/demo/' not in p]


def _load(path):
    from mmengine.config import Config
    from effbackbones.utils.launch import detect_toolbox, register_toolbox
    cfg = Config.fromfile(path)
    toolbox = detect_toolbox(cfg)
    register_toolbox(toolbox)
    return cfg, toolbox


def _build(cfg):
    from mmengine.registry import DefaultScope, MODELS
    cfg.model.backbone.init_cfg = None      # no ImageNet files in CI
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        return MODELS.build(cfg.model)


def test_every_family_has_configs():
    names = {osp.basename(p) for p in PAPER}
    for v in ('xs', 's', 'l1', 'l3'):
        assert f'maskrcnn_swiftformer_{v}.py' in names
        assert f'semfpn_swiftformer_{v}.py' in names


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: osp.relpath(p, osp.join(REPO, 'configs')))
def test_config_builds_and_runs_forward(path):
    cfg, toolbox = _load(path)
    model = _build(cfg).eval()
    backbone = model.backbone
    assert list(cfg.model.neck.in_channels) == list(backbone.out_channels)
    h, w = 128, 192   # non-square, multiples of 32
    x = torch.randn(1, 3, h, w)
    meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w), batch_input_shape=(h, w),
                scale_factor=(1.0, 1.0))
    with torch.no_grad():
        if toolbox == 'mmdet':
            from mmdet.structures import DetDataSample
            out = model(x, [DetDataSample(metainfo=meta)], mode='predict')
            assert hasattr(out[0], 'pred_instances')
        else:
            from mmseg.structures import SegDataSample
            meta['padding_size'] = [0, 0, 0, 0]
            out = model(x, [SegDataSample(metainfo=meta)], mode='predict')
            assert out[0].pred_sem_seg.data.shape[-2:] == (h, w)
        feats = model.extract_feat(x)
        assert len(feats) == cfg.model.neck.num_outs


@pytest.mark.parametrize('path', [p for p in PAPER if 'maskrcnn_' in osp.basename(p)],
                         ids=osp.basename)
def test_maskrcnn_recipe(path):
    cfg, _ = _load(path)
    assert cfg.default_scope == 'mmdet'
    opt = cfg.optim_wrapper.optimizer
    assert opt.type == 'AdamW' and opt.lr == pytest.approx(2e-4)
    assert cfg.train_cfg.max_epochs == 12
    assert cfg.train_dataloader.batch_size == 2 and cfg.auto_scale_lr.base_batch_size == 16
    warm, steps = cfg.param_scheduler
    assert warm.type == 'LinearLR' and warm.end == 500 and not warm.by_epoch
    assert steps.type == 'MultiStepLR' and list(steps.milestones) == [8, 11]
    assert cfg.model.data_preprocessor.pad_size_divisor == 32
    assert cfg.model.backbone.init_cfg.type == 'Pretrained'
    assert 'effbackbones' in cfg.custom_imports.imports


@pytest.mark.parametrize('path', [p for p in PAPER if 'semfpn_' in osp.basename(p)],
                         ids=osp.basename)
def test_semfpn_recipe(path):
    cfg, _ = _load(path)
    assert cfg.default_scope == 'mmseg'
    opt = cfg.optim_wrapper.optimizer
    assert opt.type == 'AdamW' and opt.lr == pytest.approx(2e-4) and opt.weight_decay == 1e-4
    assert cfg.train_cfg.max_iters == 40000
    assert cfg.train_dataloader.batch_size == 4 and cfg.auto_scale_lr.base_batch_size == 32
    (poly,) = cfg.param_scheduler
    assert poly.type == 'PolyLR' and poly.power == 0.9 and poly.end == 40000
    assert tuple(cfg.crop_size) == (512, 512)
    assert cfg.model.decode_head.num_classes == 150
    assert any(t['type'] == 'effbackbones.AlignResize' for t in cfg.test_pipeline)
