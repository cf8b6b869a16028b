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


def _family(path):
    """``maskrcnn_efficientformerv2_s0.py`` -> ``'efficientformerv2'``."""
    return osp.basename(path).split('_')[1]


#: the variants of each family that have paper configs, per framework
FAMILY_CONFIGS = {
    'swiftformer': dict(maskrcnn=('xs', 's', 'l1', 'l3'), semfpn=('xs', 's', 'l1', 'l3')),
    'efficientformer': dict(maskrcnn=('l1', 'l3', 'l7'), semfpn=('l1', 'l3', 'l7')),
    'efficientformerv2': dict(maskrcnn=('s0', 's1', 's2', 'l'), semfpn=('s0', 's1', 's2', 'l')),
    'mobileformer': dict(retinanet=('26m', '52m', '96m', '151m', '214m', '294m', '508m'),
                         maskrcnn=('151m', '214m', '294m', '508m'),
                         semfpn=('151m', '214m', '294m', '508m')),
    'levit': dict(maskrcnn=('128s', '128', '192', '256', '384'),
                  semfpn=('128s', '128', '192', '256', '384')),
}


def test_every_family_has_configs():
    names = {osp.basename(p) for p in PAPER}
    expected = {f'{fw}_{fam}_{v}.py' for fam, fws in FAMILY_CONFIGS.items()
                for fw, variants in fws.items() for v in variants}
    assert expected <= names, sorted(expected - names)
    # nothing else: every paper config belongs to a family whose recipe is asserted below
    assert names == expected, sorted(names - expected)


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


#: Mask R-CNN 1x per family: (AdamW lr, weight decay, LinearLR warm-up start factor, images per
#: GPU, total batch = auto_scale_lr base). EfficientFormer / V2: the official detection configs
#: (wd 1e-4 / 0.05; schedule_1x.py warms up from ratio 1e-3 in the v1 code release 7916a85 and
#: from 1e-6 since the V2 commit 733456e). SwiftFormer: paper Sec. 4.1, total batch 32 (4 x 8
#: GPUs). Mobile-Former: ours, the EfficientFormer (v1) recipe. LeViT: ours, the LeViT-derived
#: EfficientViT detection optimiser.
MASKRCNN_RECIPES = {
    'swiftformer': (2e-4, 1e-4, 1e-3, 4, 32),
    'efficientformer': (2e-4, 1e-4, 1e-3, 2, 16),
    'efficientformerv2': (2e-4, 0.05, 1e-6, 2, 16),
    'mobileformer': (2e-4, 1e-4, 1e-3, 2, 16),
    'levit': (1e-4, 0.05, 1e-3, 2, 16),
}
#: Semantic FPN 40k per family: (AdamW lr, weight decay, PolyLR eta_min).
SEMFPN_RECIPES = {
    'swiftformer': (2e-4, 1e-4, 0.0),
    'efficientformer': (2e-4, 1e-4, 0.0),
    'efficientformerv2': (2e-4, 1e-4, 1e-6),
    'mobileformer': (2e-4, 1e-4, 0.0),
    'levit': (1e-4, 0.05, 0.0),
}


@pytest.mark.parametrize('path', [p for p in PAPER if 'maskrcnn_' in osp.basename(p)],
                         ids=osp.basename)
def test_maskrcnn_recipe(path):
    cfg, _ = _load(path)
    lr, wd, warm_start, per_gpu, total = MASKRCNN_RECIPES[_family(path)]
    assert cfg.default_scope == 'mmdet'
    opt = cfg.optim_wrapper.optimizer
    assert opt.type == 'AdamW' and opt.lr == pytest.approx(lr)
    assert opt.weight_decay == pytest.approx(wd)
    assert cfg.train_cfg.max_epochs == 12
    assert cfg.train_dataloader.batch_size == per_gpu
    assert cfg.auto_scale_lr.base_batch_size == total and total % per_gpu == 0
    warm, steps = cfg.param_scheduler
    assert warm.type == 'LinearLR' and warm.end == 500 and not warm.by_epoch
    assert warm.start_factor == pytest.approx(warm_start)
    assert any(t['type'] == 'Resize' and tuple(t['scale']) == (1333, 800)
               for t in cfg.train_pipeline)
    assert steps.type == 'MultiStepLR' and list(steps.milestones) == [8, 11]
    assert steps.by_epoch and steps.end == 12
    assert cfg.model.data_preprocessor.pad_size_divisor == 32
    assert cfg.model.backbone.init_cfg.type == 'Pretrained'
    assert 'effbackbones' in cfg.custom_imports.imports


@pytest.mark.parametrize('path', [p for p in PAPER if 'semfpn_' in osp.basename(p)],
                         ids=osp.basename)
def test_semfpn_recipe(path):
    cfg, _ = _load(path)
    lr, wd, eta_min = SEMFPN_RECIPES[_family(path)]
    assert cfg.default_scope == 'mmseg'
    opt = cfg.optim_wrapper.optimizer
    assert opt.type == 'AdamW' and opt.lr == pytest.approx(lr)
    assert opt.weight_decay == pytest.approx(wd)
    assert cfg.train_cfg.max_iters == 40000
    assert cfg.train_dataloader.batch_size == 4 and cfg.auto_scale_lr.base_batch_size == 32
    (poly,) = cfg.param_scheduler
    assert poly.type == 'PolyLR' and poly.power == 0.9 and poly.end == 40000
    assert poly.eta_min == pytest.approx(eta_min, abs=0)
    assert tuple(cfg.crop_size) == (512, 512)
    assert cfg.model.decode_head.num_classes == 150
    assert any(t['type'] == 'effbackbones.AlignResize' for t in cfg.test_pipeline)
    assert cfg.model.backbone.init_cfg.type == 'Pretrained'
    assert 'effbackbones' in cfg.custom_imports.imports


@pytest.mark.parametrize('path', [p for p in PAPER if 'retinanet_' in osp.basename(p)],
                         ids=osp.basename)
def test_retinanet_recipe(path):
    """Mobile-Former's paper framework (RetinaNet 1x); optimiser ours (PVT's RetinaNet)."""
    cfg, _ = _load(path)
    assert cfg.default_scope == 'mmdet' and cfg.model.type == 'RetinaNet'
    opt = cfg.optim_wrapper.optimizer
    assert opt.type == 'AdamW' and opt.lr == pytest.approx(1e-4)
    assert opt.weight_decay == pytest.approx(1e-4)
    assert cfg.train_cfg.max_epochs == 12
    assert cfg.train_dataloader.batch_size == 2 and cfg.auto_scale_lr.base_batch_size == 16
    warm, steps = cfg.param_scheduler
    assert warm.type == 'LinearLR' and warm.end == 500 and not warm.by_epoch
    assert steps.type == 'MultiStepLR' and list(steps.milestones) == [8, 11]
    neck = cfg.model.neck
    assert neck.start_level == 1 and neck.add_extra_convs == 'on_input' and neck.num_outs == 5
    assert cfg.model.bbox_head.num_classes == 80
    assert cfg.model.data_preprocessor.pad_size_divisor == 32
    assert any(t['type'] == 'Resize' and tuple(t['scale']) == (1333, 800)
               for t in cfg.train_pipeline)
    assert cfg.model.backbone.init_cfg.type == 'Pretrained'
    assert 'effbackbones' in cfg.custom_imports.imports


#: the official ImageNet release each paper config initialises from (file names of the
#: releases: SwiftFormer_X.pth, efficientformer_lX_300d.pth, eformer_X_450.pth,
#: mobile-former-XXXm (.pth.tar, timm CheckpointSaver), LeViT-X-<hash>.pth)
LEVIT_RELEASES = {'128s': 'LeViT-128S-96703c44.pth', '128': 'LeViT-128-b88c2750.pth',
                  '192': 'LeViT-192-92712e41.pth', '256': 'LeViT-256-13b5763e.pth',
                  '384': 'LeViT-384-9bdaf2e2.pth'}
RELEASES = {
    'swiftformer': lambda a: f'SwiftFormer_{a.upper()}.pth',
    'efficientformer': lambda a: f'efficientformer_{a}_300d.pth',
    'efficientformerv2': lambda a: f'eformer_{a}_450.pth',
    'mobileformer': lambda a: f'mobile-former-{a}.pth.tar',
    'levit': LEVIT_RELEASES.__getitem__,
}
BACKBONE_TYPES = {'swiftformer': 'SwiftFormer', 'efficientformer': 'EfficientFormer',
                  'efficientformerv2': 'EfficientFormerV2', 'mobileformer': 'MobileFormer',
                  'levit': 'LeViT'}


@pytest.mark.parametrize('path', PAPER, ids=osp.basename)
def test_backbone_and_release_match_the_file_name(path):
    cfg, _ = _load(path)
    family = _family(path)
    arch = osp.splitext(osp.basename(path))[0].split('_')[2]
    bb = cfg.model.backbone
    assert bb.type == f'effbackbones.{BACKBONE_TYPES[family]}' and bb.arch == arch
    assert bb.init_cfg == dict(type='Pretrained',
                               checkpoint=f'checkpoints/{RELEASES[family](arch)}')


#: official dense drop_path_rate of EfficientFormerV2 (efficientformerv2_X_feat)
V2_DROP_PATH = {'s0': 0.0, 's1': 0.0, 's2': 0.02, 'l': 0.1}


def _official_bias_grid(path):
    """The official dense bias grid of the task: 16 in the ADE20K segmentation backbones
    (segmentation/backbone.py Attention(resolution=16), backbonev2.py resolution 512), 25 in the
    detection ones (Attention(resolution=25), resolution 800; the backbones' default)."""
    return 16 if osp.basename(path).startswith('semfpn_') else 25


def _bias_grid(cfg):
    import inspect
    from effbackbones.registry import MODELS
    bb = cfg.model.backbone
    default = inspect.signature(MODELS.get(bb.type.split('.')[-1]).__init__).parameters[
        'bias_grid'].default
    return bb.get('bias_grid', default)


@pytest.mark.parametrize('path', [p for p in PAPER if _family(p) == 'efficientformerv2'],
                         ids=osp.basename)
def test_efficientformerv2_official_dense_settings(path):
    """Official V2 runs: dense bias tables on the task's grid, drop path per arch, BN trained as
    SyncBN."""
    cfg, _ = _load(path)
    bb = cfg.model.backbone
    assert bb.bias_mode == 'official'
    assert _bias_grid(cfg) == _official_bias_grid(path)
    assert bb.drop_path_rate == V2_DROP_PATH[bb.arch]
    assert bb.norm_eval is False and cfg.sync_bn == 'torch'


@pytest.mark.parametrize('path', [p for p in PAPER if _family(p) == 'efficientformer'],
                         ids=osp.basename)
def test_efficientformer_official_dense_settings(path):
    """Official v1 runs: dense bias tables on the task's grid, no drop path, plain (per-GPU) BN
    that trains."""
    cfg, _ = _load(path)
    bb = cfg.model.backbone
    assert bb.bias_mode == 'official' and bb.drop_path_rate == 0.0
    assert _bias_grid(cfg) == _official_bias_grid(path)
    assert not bb.get('norm_eval', False) and cfg.get('sync_bn') is None


@pytest.mark.parametrize('path', [p for p in PAPER if 'maskrcnn_efficientformer_' in p
                                  or 'maskrcnn_swiftformer_' in p], ids=osp.basename)
def test_recipe_header_states_what_the_config_does(path):
    """The header comment of a config names the recipe it runs: the v1 warm-up ratio (and why
    not the repository HEAD's), the SwiftFormer batch and the paper section it comes from."""
    cfg, _ = _load(path)
    header = ''.join(line for line in open(path) if line.startswith('#'))
    warm = cfg.param_scheduler[0].start_factor
    batch = cfg.auto_scale_lr.base_batch_size
    if _family(path) == 'efficientformer':
        assert warm == pytest.approx(1e-3)
        assert 'ratio 1e-3' in header and '7916a85' in header and '733456e' in header
    else:
        assert batch == 32 and cfg.train_dataloader.batch_size == 4
        assert 'Sec. 4.1' in header and 'batch 32 = 4 images x 8 GPUs' in header
        assert 'Table 4' not in header


@pytest.mark.parametrize('path', [p for p in PAPER if _family(p) == 'levit'], ids=osp.basename)
def test_levit_no_weight_decay_on_attention_biases(path):
    """The custom key really reaches every LeViT bias table, and nothing else."""
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DefaultScope
    cfg, _ = _load(path)
    assert dict(cfg.optim_wrapper.paramwise_cfg.custom_keys) == {
        'attention_biases': dict(decay_mult=0.0)}
    model = _build(cfg)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    decay = {id(p): g['weight_decay'] for g in wrapper.optimizer.param_groups
             for p in g['params']}
    tables = [n for n, _ in model.named_parameters() if n.endswith('.attention_biases')]
    assert tables and all(n.startswith('backbone.') for n in tables)
    n_attn = sum(1 for n, m in model.backbone.named_modules() if hasattr(m, 'attention_biases'))
    assert len(tables) == n_attn
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any(n in tables for n, _ in trainable)
    for name, p in trainable:
        expected = 0.0 if name in tables else 0.05
        assert decay[id(p)] == pytest.approx(expected), name
