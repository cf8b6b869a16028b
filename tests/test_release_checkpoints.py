"""The official released dense checkpoints (EfficientFormer / EfficientFormerV2 COCO Mask R-CNN,
ADE20K Semantic FPN) in our configs: whole-model conversion, ``tools/test.py CONFIG FILE`` and
``load_from`` on the released file, the backbone-only ``init_cfg`` path, and loud failures.

The released files are synthesised the way the official runs wrote them (mmdet 2.19 / mmseg 0.19
runner files: ``meta`` with ``CLASSES``, ``state_dict``, mmcv's ``optimizer``): the backbone
part is a reference pack's official dense state dict (``backbone.patch_embed``/``network``/
``norm*``, ``attention_biases_seg``, the ``attention_bias_idxs*`` buffers), the neck and heads
are random tensors under the names of the config's model (mmdet 3 / mmseg 1 kept the mmdet 2 /
mmseg 0 module names of these heads, see ``convert_model_checkpoint``).
"""
import json
import os
import os.path as osp
import re
import shutil
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch

from conftest import REPO, load_pack, load_script, make_weights

PY = sys.executable
DET = 'configs/maskrcnn_efficientformer_l1.py'
SEG = 'configs/semfpn_efficientformerv2_s0.py'
DET_V2 = 'configs/maskrcnn_efficientformerv2_s0.py'
SEG_V1 = 'configs/semfpn_efficientformer_l1.py'
#: config -> (toolbox, pack of the official backbone it builds: detection or ADE20K grids)
RELEASES = {DET: ('mmdet', 'efficientformer', 'l1'), SEG: ('mmseg', 'efficientformerv2_seg', 's0'),
            DET_V2: ('mmdet', 'efficientformerv2', 's0'),
            SEG_V1: ('mmseg', 'efficientformer_seg', 'l1')}


def _build(config):
    from mmengine.config import Config
    from effbackbones.utils.launch import build_model
    return build_model(Config.fromfile(osp.join(REPO, config)))


def official_release(model, pack, toolbox, seed=5):
    """A runner file laid out as the official dense releases (see the module doc)."""
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict(('backbone.' + k, v)
                     for k, v in make_weights().state_dict_from_pack(pack).items())
    for k, v in model.state_dict().items():
        if k.startswith('backbone.'):
            continue
        if k.endswith('running_var'):
            sd[k] = 1 + 0.1 * torch.rand(v.shape, generator=g)
        elif v.is_floating_point():
            sd[k] = 0.02 * torch.randn(v.shape, generator=g)
        else:
            sd[k] = torch.zeros_like(v)
    if toolbox == 'mmdet':
        from mmdet.datasets import CocoDataset
        meta = dict(mmdet_version='2.19.0', CLASSES=CocoDataset.METAINFO['classes'],
                    epoch=12, iter=87936)
    else:
        from mmseg.datasets import ADE20KDataset
        meta = dict(mmseg_version='0.19.0', CLASSES=ADE20KDataset.METAINFO['classes'],
                    PALETTE=[list(c) for c in ADE20KDataset.METAINFO['palette']], iter=40000)
    meta.update(mmcv_version='1.4.0', config='# the official mmdet 2 / mmseg 0 config text',
                env_info='sys.platform: linux', seed=0, hook_msgs=dict(last_ckpt='latest.pth'),
                time='Thu Jun  2 10:00:00 2022')
    optimizer = dict(state={0: dict(step=torch.tensor(100.0), exp_avg=torch.zeros(4),
                                    exp_avg_sq=torch.zeros(4))},
                     param_groups=[dict(lr=2e-6, betas=(0.9, 0.999), eps=1e-8,
                                        weight_decay=1e-4, amsgrad=False, params=[0])])
    return dict(meta=meta, state_dict=sd, optimizer=optimizer)


@pytest.fixture(scope='module')
def releases(tmp_path_factory):
    """config -> (model, pack, path of the synthesised official release)."""
    out = {}
    root = tmp_path_factory.mktemp('releases')
    for config, (toolbox, family, variant) in RELEASES.items():
        model = _build(config)
        pack = load_pack(family, variant)
        path = root / (osp.basename(config)[:-3] + '_official.pth')
        torch.save(official_release(model, pack, toolbox), path)
        out[config] = (model, pack, str(path))
    return out


def _convert_tool(argv):
    mod = load_script(osp.join(REPO, 'tools', 'convert_checkpoint.py'), 'effb_convert_checkpoint')
    return mod.main(argv)


@pytest.mark.parametrize('config', [DET, SEG, DET_V2, SEG_V1])
def test_convert_release_loads_strictly_with_parity_and_classes(config, releases, tmp_path,
                                                                  capsys):
    model, pack, src = releases[config]
    dst = str(tmp_path / 'converted.pth')
    assert _convert_tool([src, dst, '--config', config]) == 0
    printed = capsys.readouterr().out
    own = model.state_dict()
    assert re.search(rf'matched   : {len(own)}/{len(own)} model tensors', printed), printed
    assert 'missing   : 0' in printed and 'unexpected: 0' in printed
    assert re.search(r"backbone EfficientFormer(V2)?\('(l1|s0)'\) at 'backbone\.', official "
                     r"layout", printed), printed
    assert re.search(r'ignored   : \d+  \(backbone\..*attention_bias_idxs', printed), printed

    ckpt = torch.load(dst, weights_only=True)
    assert set(ckpt) == {'meta', 'state_dict'}                  # mmcv's optimizer dropped
    original = torch.load(src, weights_only=True)
    assert ckpt['meta']['dataset_meta']['classes'] == tuple(original['meta']['CLASSES'])
    assert ckpt['meta']['mmcv_version'] == '1.4.0'               # the rest of meta is kept
    model.load_state_dict(ckpt['state_dict'], strict=True)
    for k, v in original['state_dict'].items():                 # neck / heads: same names
        if not k.startswith('backbone.'):
            assert torch.equal(ckpt['state_dict'][k], v), k
    # the backbone inside the whole model gives the official dense outputs
    mw = make_weights()
    model.eval()
    with torch.no_grad():
        outs = model.backbone(mw.input_from_pack(pack))
    ok, rep = mw.compare_outputs(list(outs), pack)
    assert ok, rep


def test_partial_or_mismatched_release_is_an_error_naming_the_tensors(releases):
    from effbackbones.checkpoint import CheckpointError, convert_model_checkpoint
    model, _, src = releases[DET]
    release = torch.load(src, weights_only=True)
    sd = release['state_dict']
    sd.pop('roi_head.mask_head.conv_logits.weight')
    sd.pop('backbone.network.6.4.token_mixer.attention_biases_seg')
    sd['rpn_head.extra.weight'] = torch.zeros(3)
    with pytest.raises(CheckpointError) as err:
        convert_model_checkpoint(model, release, name='partial.pth')
    msg = str(err.value)
    assert 'missing   : 2' in msg and 'unexpected: 1' in msg
    for name in ('roi_head.mask_head.conv_logits.weight', 'rpn_head.extra.weight',
                 'backbone.stages.3.blocks.4.token_mixer.attention_biases_seg'):
        assert name in msg, msg
    assert '--load-not-strict' in msg
    # another number of classes: a shape mismatch, named with both shapes
    release = torch.load(src, weights_only=True)
    w = release['state_dict']['roi_head.bbox_head.fc_cls.weight']
    release['state_dict']['roi_head.bbox_head.fc_cls.weight'] = w[:21]
    with pytest.raises(CheckpointError, match=r'roi_head\.bbox_head\.fc_cls\.weight: file '
                                              r'\(21, 1024\) vs model \(81, 1024\)'):
        convert_model_checkpoint(model, release)
    # the explicit opt-out loads the rest and leaves the mismatched tensor out
    new, report = convert_model_checkpoint(model, release, strict=False)
    assert 'roi_head.bbox_head.fc_cls.weight' not in new['state_dict']
    assert [k for k, _, _ in report['mismatched']] == ['roi_head.bbox_head.fc_cls.weight']


def test_release_of_the_other_bias_grid_is_a_shape_error(releases):
    """A COCO (25x25 grid) backbone given to the ADE20K config (16x16): named shape errors."""
    from effbackbones.checkpoint import CheckpointError, convert_model_checkpoint
    model, _, _ = releases[SEG_V1]
    release = official_release(model, load_pack('efficientformer', 'l1'), 'mmseg')
    with pytest.raises(CheckpointError,
                       match=r'backbone\.stages\.3\.blocks\.4\.token_mixer\.attention_biases_seg: '
                             r'file \(8, 625\) vs model \(8, 256\)'):
        convert_model_checkpoint(model, release)


def test_own_mmengine_checkpoint_passes_through_for_resume(releases):
    """What our training saves (mmengine layout, optimizer + message hub) is unchanged, so
    load_from / --resume keep working with the hook in place."""
    from effbackbones.checkpoint import convert_model_checkpoint
    model, _, _ = releases[SEG]
    ours = dict(meta=dict(epoch=1, iter=4, dataset_meta=dict(classes=('a', 'b'))),
                state_dict=OrderedDict(model.state_dict()),
                optimizer=dict(state={}, param_groups=[]), message_hub=dict(log_scalars={}))
    new, report = convert_model_checkpoint(model, ours)
    assert set(new) == set(ours) and new['optimizer'] is ours['optimizer']
    assert list(new['state_dict']) == list(ours['state_dict']) and not report['ignored']
    assert new['meta']['dataset_meta'] == dict(classes=('a', 'b'))


@pytest.mark.parametrize('config', [DET, SEG])
def test_init_cfg_pretrained_takes_the_whole_release(config, releases):
    """Backbone-only path: the full runner file (neck, heads, meta, optimizer) gives the
    backbone part, every backbone tensor matched, official outputs."""
    from effbackbones.checkpoint import load_pretrained
    model, pack, src = releases[config]
    cls = type(model.backbone)
    backbone = cls(model.backbone.arch_name, bias_grid=model.backbone.bias_grid,
                   init_cfg=dict(type='Pretrained', checkpoint=src))
    backbone.init_weights()
    report = load_pretrained(backbone, src)
    assert report['wrapper'] == 'state_dict' and report['layout'] == 'official'
    assert not report['missing'] and not report['unexpected'] and not report['new']
    mw = make_weights()
    with torch.no_grad():
        ok, rep = mw.compare_outputs(list(backbone.eval()(mw.input_from_pack(pack))), pack)
    assert ok, rep


@pytest.mark.parametrize('config', [DET, SEG])
def test_pretrained_bias_mode_refuses_dense_tables_in_both_families(config, releases):
    """One policy for v1 and V2: a dense file's tables are what its weights were trained with,
    so bias_mode='pretrained' (ImageNet tables) refuses the file instead of dropping them."""
    from effbackbones.checkpoint import CheckpointError, load_pretrained
    model, _, src = releases[config]
    backbone = type(model.backbone)(model.backbone.arch_name, bias_mode='pretrained')
    with pytest.raises(CheckpointError, match=r"attention_biases_seg.*bias_mode='official'"):
        load_pretrained(backbone, src)


def _runner(model, classes, warnings=None):
    """The parts of an mmengine Runner the hook reads (test loop built, as in runner.test())."""
    from types import SimpleNamespace
    dataset = SimpleNamespace(metainfo=dict(classes=classes))
    logger = SimpleNamespace(warning=(warnings if warnings is not None else []).append)
    return SimpleNamespace(model=model, _load_from='release.pth', logger=logger,
                           _test_loop=SimpleNamespace(dataloader=SimpleNamespace(dataset=dataset)))


def test_strict_load_hook_converts_in_place_and_checks_the_class_order(releases):
    """What mmengine's Runner.load_checkpoint (load_from, tools/test.py, resume) hands to the
    hook is converted in place; the same classes in another order are refused."""
    from effbackbones.checkpoint import CheckpointError
    from effbackbones.engine import StrictLoadHook
    model, _, src = releases[SEG]
    classes = tuple(torch.load(src, weights_only=True)['meta']['CLASSES'])
    ckpt = torch.load(src, weights_only=True)
    StrictLoadHook().after_load_checkpoint(_runner(model, classes), ckpt)
    assert set(ckpt) == {'meta', 'state_dict'}
    assert ckpt['meta']['dataset_meta']['classes'] == classes
    model.load_state_dict(ckpt['state_dict'], strict=True)
    swapped = (classes[1], classes[0]) + classes[2:]
    with pytest.raises(CheckpointError, match=r"index 0: \('wall', 'building', 'sky'\) \(file\)"
                       r".*another order"):
        StrictLoadHook().after_load_checkpoint(_runner(model, swapped),
                                               torch.load(src, weights_only=True))
    # other class names (e.g. a dataset that renames a class): a warning
    warnings = []
    StrictLoadHook().after_load_checkpoint(_runner(model, ('cat',) + classes[1:], warnings),
                                           torch.load(src, weights_only=True))
    assert len(warnings) == 1 and "('wall', 'building', 'sky') (file)" in warnings[0]


def test_tools_add_the_hook_once_and_the_opt_out_flag_reaches_it():
    import argparse
    from mmengine.config import Config
    from effbackbones.utils.launch import add_common_args, parse_common, prepare_config
    for flags, strict in (([], True), (['--load-not-strict'], False)):
        cfg = Config.fromfile(osp.join(REPO, SEG))          # lists the hook in custom_hooks
        args = parse_common(add_common_args(argparse.ArgumentParser()), flags)
        hooks = [h for h in prepare_config(cfg, args, 'work_dirs/x').custom_hooks
                 if h['type'] == 'effbackbones.StrictLoadHook']
        assert len(hooks) == 1 and hooks[0].get('strict', True) is strict
    cfg = Config(dict(model=dict(type='EncoderDecoder'), launcher='none'))   # a foreign config
    args = parse_common(add_common_args(argparse.ArgumentParser()), [])
    assert prepare_config(cfg, args, 'work_dirs/x').custom_hooks == [
        dict(type='effbackbones.StrictLoadHook')]


# -------------------------------------------------------------------------------------------
# tools/test.py CONFIG RELEASED_FILE on tiny datasets in the official folder layouts
# -------------------------------------------------------------------------------------------
def _run(args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.fixture(scope='module')
def official_layout_data(tmp_path_factory):
    """3 shapes images as COCO 2017 val (``annotations/instances_val2017.json``, ``val2017/``;
    the COCO category list, shapes labelled person / bicycle / car) and as ADEChallengeData2016
    (``images/validation``, ``annotations/validation``; one training image)."""
    from mmdet.datasets import CocoDataset
    from effbackbones.datasets.synthetic import make_shapes_dataset
    root = tmp_path_factory.mktemp('official_data')
    shapes = str(root / 'shapes')
    make_shapes_dataset(shapes, num_train=1, num_val=3, size=(128, 160), max_objects=2)
    coco = root / 'coco'
    shutil.copytree(osp.join(shapes, 'coco', 'val'), coco / 'val2017')
    with open(osp.join(shapes, 'coco', 'annotations', 'instances_val.json')) as f:
        ann = json.load(f)
    ann['categories'] = [dict(id=i + 1, name=c)
                         for i, c in enumerate(CocoDataset.METAINFO['classes'])]
    os.makedirs(coco / 'annotations')
    with open(coco / 'annotations' / 'instances_val2017.json', 'w') as f:
        json.dump(ann, f)
    ade = root / 'ade' / 'ADEChallengeData2016'
    for split, ours in (('validation', 'val'), ('training', 'train')):
        shutil.copytree(osp.join(shapes, 'seg', 'img_dir', ours), ade / 'images' / split)
        shutil.copytree(osp.join(shapes, 'seg', 'ann_dir', ours), ade / 'annotations' / split)
    return dict(coco=str(coco) + '/', ade=str(ade) + '/')


def _test_opts(config, data):
    if config == DET:
        return ['--cfg-options', f'test_dataloader.dataset.data_root={data["coco"]}',
                f'test_evaluator.ann_file={data["coco"]}annotations/instances_val2017.json',
                'test_dataloader.dataset.pipeline.1.scale=(320,256)',
                # the synthetic heads score every class ~1/81: keep their boxes for the metric
                'model.test_cfg.rcnn.score_thr=0.0',
                'test_dataloader.num_workers=0', 'test_dataloader.persistent_workers=False']
    return ['--cfg-options', f'test_dataloader.dataset.data_root={data["ade"]}',
            'test_dataloader.dataset.pipeline.1.scale=(320,256)',
            'test_dataloader.num_workers=0', 'test_dataloader.persistent_workers=False']


@pytest.mark.slow
@pytest.mark.parametrize('config', [DET, SEG])
def test_tools_test_takes_the_released_file(config, releases, official_layout_data, tmp_path):
    model, _, src = releases[config]
    proc = _run([PY, 'tools/test.py', config, src, '--work-dir', str(tmp_path)]
                + _test_opts(config, official_layout_data))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    n = len(model.state_dict())
    assert re.search(rf'matched   : {n}/{n} model tensors', out), out[-5000:]
    assert 'missing   : 0' in out and 'unexpected: 0' in out
    assert 'do not match exactly' not in out
    metric = r'coco/bbox_mAP: -?[\d.]+' if config == DET else r'mIoU: [\d.]+'
    assert re.search(metric, out), out[-3000:]


@pytest.mark.slow
def test_load_from_a_partial_file_stops_training_before_it_starts(releases, official_layout_data,
                                                                 tmp_path):
    """``load_from`` (training) goes through the same hook: a partial release is an error with
    the names, exit status 2, and no iteration is trained."""
    _, _, src = releases[SEG]
    release = torch.load(src, weights_only=True)
    release['state_dict'].pop('decode_head.conv_seg.weight')
    bad = tmp_path / 'partial.pth'
    torch.save(release, bad)
    root = official_layout_data['ade']
    proc = _run([PY, 'tools/train.py', SEG, '--work-dir', str(tmp_path), '--cfg-options',
                 f'load_from={bad}', f'train_dataloader.dataset.data_root={root}',
                 f'val_dataloader.dataset.data_root={root}', 'train_dataloader.batch_size=1',
                 'train_dataloader.num_workers=0', 'train_dataloader.persistent_workers=False',
                 'val_dataloader.num_workers=0', 'val_dataloader.persistent_workers=False',
                 'train_cfg.max_iters=1'])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert 'missing   : 1  (decode_head.conv_seg.weight)' in proc.stderr
    assert 'Iter(train)' not in out                              # nothing trained
