"""The ecosystem's own doors load right (issue: 'loads right through every door').

A model holding one of our backbones converts the backbone part of an official / timm file and
refuses a partial or other-variant one through every API users reach it by: plain
``model.load_state_dict``, mmengine's ``load_checkpoint`` (strict or not), mmdet's
``init_detector`` / ``DetInferencer``, mmseg's ``init_model`` / ``MMSegInferencer``. Importing
the plugin changes nothing else in the process; a hostile pickle is named as such, and never runs.

The released files are synthesised from the reference packs as ``test_release_checkpoints``
does (mmdet 2 / mmseg 0 runner files, the backbone in the official dense layout).
"""
import os
import os.path as osp
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO, load_pack, make_weights, random_cls_state_dict
from test_release_checkpoints import DET, DET_V2, RELEASES, SEG, SEG_V1, _build, official_release

PY = sys.executable
#: a non-square input (sides multiples of 32) beside each pack's own input
NON_SQUARE = (1, 3, 160, 224)


@pytest.fixture(scope='module')
def released(tmp_path_factory):
    """config -> (path of the synthesised official release, pack)."""
    root = tmp_path_factory.mktemp('doors')
    out = {}
    for config, (toolbox, family, variant) in RELEASES.items():
        pack = load_pack(family, variant)
        path = root / (osp.basename(config)[:-3] + '_official.pth')
        torch.save(official_release(_build(config), pack, toolbox), path)
        out[config] = (str(path), pack)
    return out


def _reference_backbone(config, path):
    """The backbone of ``config`` loaded through ``init_cfg`` (the path the parity tests check
    against the packs) from the release at ``path``."""
    from effbackbones.checkpoint import load_pretrained
    backbone = _build(config).backbone
    load_pretrained(backbone, path)
    return backbone.eval()


def assert_backbone_is_the_release(backbone, config, released):
    """Pack parity on the pack's input, and the same maps as the reference on a non-square one."""
    path, pack = released[config]
    mw = make_weights()
    backbone.eval()
    with torch.no_grad():
        ok, rep = mw.compare_outputs(list(backbone(mw.input_from_pack(pack))), pack)
        assert ok, rep
        x = torch.randn(NON_SQUARE, generator=torch.Generator().manual_seed(1))
        ref = _reference_backbone(config, path)(x)
        for got, want in zip(backbone(x), ref):
            assert torch.equal(got, want)


# -- mmdet / mmseg / mmengine / torch doors ---------------------------------------------------
@pytest.mark.parametrize('config', [DET, DET_V2])
def test_init_detector_converts_the_released_backbone(config, released):
    from mmdet.apis import init_detector
    model = init_detector(osp.join(REPO, config), released[config][0], device='cpu')
    assert_backbone_is_the_release(model.backbone, config, released)
    assert model.dataset_meta['classes'][0] == 'person'


def test_det_inferencer_converts_the_released_backbone(released):
    from mmdet.apis import DetInferencer
    inferencer = DetInferencer(model=osp.join(REPO, DET), weights=released[DET][0],
                               device='cpu', show_progress=False)
    assert_backbone_is_the_release(inferencer.model.backbone, DET, released)


@pytest.mark.parametrize('config', [SEG, SEG_V1])
def test_init_model_converts_the_released_backbone(config, released):
    from mmseg.apis import init_model
    model = init_model(osp.join(REPO, config), released[config][0], device='cpu')
    assert_backbone_is_the_release(model.backbone, config, released)


def test_mmseg_inferencer_converts_the_released_backbone(released):
    from mmseg.apis import MMSegInferencer
    inferencer = MMSegInferencer(model=osp.join(REPO, SEG), weights=released[SEG][0],
                                 device='cpu')
    assert_backbone_is_the_release(inferencer.model.backbone, SEG, released)


@pytest.mark.parametrize('strict', [False, True])
def test_mmengine_load_checkpoint_and_plain_load_state_dict(strict, released):
    from mmengine.runner import load_checkpoint
    model = _build(SEG_V1)
    load_checkpoint(model, released[SEG_V1][0], map_location='cpu', strict=strict)
    assert_backbone_is_the_release(model.backbone, SEG_V1, released)
    # torch's own load_state_dict, strict: the official backbone names are converted
    model = _build(DET_V2)
    sd = torch.load(released[DET_V2][0], weights_only=True)['state_dict']
    assert any(k.startswith('backbone.network.') for k in sd)
    model.load_state_dict(sd, strict=True)
    assert_backbone_is_the_release(model.backbone, DET_V2, released)


def test_another_variant_is_an_error_naming_tensors(released):
    """An EfficientFormerV2-S0 COCO file into the EfficientFormer-L1 Mask R-CNN config."""
    from mmdet.apis import init_detector
    from effbackbones.checkpoint import CheckpointError
    with pytest.raises(CheckpointError) as err:
        init_detector(osp.join(REPO, DET), released[DET_V2][0], device='cpu')
    msg = str(err.value)
    assert "EfficientFormer(arch='l1')" in msg and 'backbone' in msg, msg
    assert 'stem.conv1.weight: file (16, 3, 3, 3) vs model (24, 3, 3, 3)' in msg, msg


def test_partial_backbone_is_an_error_naming_the_missing_tensor(released):
    from effbackbones.checkpoint import CheckpointError, partial_loads
    release = torch.load(released[SEG][0], weights_only=True)
    release['state_dict'].pop('backbone.network.0.0.mlp.fc1.weight')
    for strict in (False, True):
        model = _build(SEG)
        with pytest.raises(CheckpointError, match=r'stages\.0\.blocks\.0\.mlp\.fc1\.conv\.weight'
                                                  r'|stages\.0\.blocks\.0\.mlp\.fc1\.weight'):
            model.load_state_dict(release['state_dict'], strict=strict)
    # the explicit opt-out: the rest loads, the missing tensor keeps its value
    model = _build(SEG)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    with partial_loads():
        model.load_state_dict(release['state_dict'], strict=False)
    after = model.backbone.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    kept = [k for k in before if torch.equal(before[k], after[k]) and 'fc1' in k
            and k.startswith('stages.0.blocks.0.')]
    assert changed and kept, (len(changed), kept)


def test_heads_only_state_dict_needs_loaded_backbone_or_opt_out(released):
    """The ambiguous case, decided: no backbone tensor at all keeps a backbone that already
    loaded weights, and is an error for one that holds only its random initialisation."""
    from effbackbones.checkpoint import CheckpointError, load_pretrained, partial_loads
    sd = torch.load(released[SEG][0], weights_only=True)['state_dict']
    heads = {k: v for k, v in sd.items() if not k.startswith('backbone.')}
    model = _build(SEG)
    with pytest.raises(CheckpointError, match=r'holds no tensor of that backbone.*random'):
        model.load_state_dict(heads, strict=False)
    with partial_loads():
        model.load_state_dict(heads, strict=False)
    load_pretrained(model.backbone, released[SEG][0])
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.load_state_dict(heads, strict=False)                 # keeps the loaded backbone
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in before.items())


def test_timm_imagenet_file_through_mmengine_load_checkpoint(tmp_path):
    """A timm-layout ImageNet file given to mmengine's load_checkpoint(model.backbone, f)."""
    from mmengine.runner import load_checkpoint
    from effbackbones.checkpoint import load_pretrained
    from test_efficientformer import _official_to_timm_key
    pack = load_pack('efficientformer', 'l1')
    cls_sd = random_cls_state_dict(pack, seed=5)
    path = tmp_path / 'efficientformer_l1_timm.pth'
    torch.save({_official_to_timm_key(k): v for k, v in cls_sd.items()}, path)
    model = _build(DET)
    load_checkpoint(model.backbone, str(path), map_location='cpu', strict=True)
    reference = _build(DET).backbone
    report = load_pretrained(reference, cls_sd)
    got, want = model.backbone.state_dict(), reference.state_dict()
    for k in want:
        if k not in report['new']:
            assert torch.equal(got[k], want[k]), k
    # the official {'model': sd} wrapper of the release, too
    torch.save({'model': cls_sd}, tmp_path / 'official.pth')
    model = _build(DET)
    load_checkpoint(model.backbone, str(tmp_path / 'official.pth'), map_location='cpu')
    assert torch.equal(model.backbone.state_dict()['stages.0.blocks.0.mlp.fc1.weight'],
                       want['stages.0.blocks.0.mlp.fc1.weight'])


def test_released_file_with_one_extra_tensor_fails_the_strict_load(released):
    """Nothing missing, one tensor the model does not have: the strict load refuses it."""
    from effbackbones.checkpoint import CheckpointError, convert_model_checkpoint
    release = torch.load(released[DET][0], weights_only=True)
    release['state_dict']['rpn_head.extra.weight'] = torch.zeros(3)
    with pytest.raises(CheckpointError) as err:
        convert_model_checkpoint(_build(DET), release, name='extra.pth')
    msg = str(err.value)
    assert 'missing   : 0' in msg and 'unexpected: 1  (rpn_head.extra.weight)' in msg, msg


# -- import hygiene ---------------------------------------------------------------------------
_HYGIENE = r'''
import importlib, torch
import mmengine.runner, mmengine.runner.checkpoint, mmengine.runner.runner
import mmengine.fileio.backends.local_backend as lb
from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader

MODULES = ['mmengine.runner', 'mmengine.runner.checkpoint', 'mmengine.runner.runner',
           'mmengine.runner._flexible_runner']

def state():
    return dict(
        safe_globals=list(torch.serialization.get_safe_globals()),
        loaders=dict(CheckpointLoader._schemes),
        put=lb.LocalBackend.put,
        getstate=HistoryBuffer.__dict__['__getstate__'],
        find_latest={m: importlib.import_module(m).find_latest_checkpoint for m in MODULES},
        torch_load=torch.load)

before = state()
import effbackbones
import effbackbones.models, effbackbones.engine, effbackbones.deploy
assert state() == before, 'importing effbackbones changed the process'
from effbackbones.engine.run_patches import run_patches
with run_patches():
    during = state()
    assert during['loaders'][''] is not before['loaders']['']
    assert during['put'] is not before['put'] and during['getstate'] is not before['getstate']
    assert all(during['find_latest'][m] is not before['find_latest'][m] for m in MODULES)
    assert during['safe_globals'] == before['safe_globals']      # never process-wide
assert state() == before, 'a run left its patches behind'
print('HYGIENE-OK')
'''


def test_importing_the_plugin_changes_nothing_else():
    """In a fresh interpreter: torch's safe globals, mmengine's loaders, LocalBackend.put,
    HistoryBuffer and find_latest_checkpoint are what they were; a run's patches are undone."""
    proc = subprocess.run([PY, '-c', _HYGIENE], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0 and 'HYGIENE-OK' in proc.stdout, proc.stderr[-3000:]


def test_nonfinite_buffers_of_other_models_still_load_through_mmengine(tmp_path):
    """Some models store -inf masks on purpose: the plugin's import does not refuse them."""
    import effbackbones  # noqa: F401
    from mmengine.runner import load_checkpoint
    model = torch.nn.Module()
    model.register_buffer('mask', torch.tensor([0.0, float('-inf')]))
    path = tmp_path / 'mask.pth'
    torch.save({'state_dict': model.state_dict()}, path)
    other = torch.nn.Module()
    other.register_buffer('mask', torch.zeros(2))
    load_checkpoint(other, str(path), map_location='cpu', strict=True)
    assert other.mask[1] == float('-inf')


# -- a hostile pickle -------------------------------------------------------------------------
class _Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


def test_hostile_pickle_is_named_and_never_runs(tmp_path):
    from effbackbones.checkpoint import CheckpointError, load_checkpoint_file
    from effbackbones.engine.run_patches import run_patches
    marker = tmp_path / 'pwned'
    path = tmp_path / 'hostile.pth'
    torch.save({'state_dict': {'w': torch.ones(2)}, 'x': _Hostile(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_file(path)
    msg = str(err.value)
    assert re.search(r'(posix|os)\.system', msg) and 'Nothing of the file was run' in msg, msg
    assert 'corrupt' not in msg and 'damaged' not in msg
    from mmengine.runner.checkpoint import CheckpointLoader
    with run_patches(), pytest.raises(CheckpointError, match=r'EFFB_TRUST_CHECKPOINTS=1'):
        CheckpointLoader.load_checkpoint(str(path), map_location='cpu')
    assert not marker.exists()


# -- mmdet's and mmseg's own tools on our demo configs ----------------------------------------
def _own_tool(package, name):
    import importlib
    path = osp.join(osp.dirname(importlib.import_module(package).__file__), '.mim', 'tools',
                    f'{name}.py')
    assert osp.isfile(path), f'{package} ships no {name}.py at {path}'
    return path


@pytest.mark.slow
def test_mmseg_own_train_resumes_exactly_and_test_loads_strictly(tmp_path):
    """mmseg's tools/train.py on our demo config, killed and resumed with its own --resume,
    ends bit-identical to the uninterrupted run (our hooks run inside mmseg's tool); its
    tools/test.py refuses a checkpoint that lacks a tensor."""
    from test_reliability import (SEG_ITERS, assert_same_training_state, load, run,
                                  seg_args, train_until_killed)
    from effbackbones.datasets.synthetic import make_shapes_dataset
    shapes = str(tmp_path / 'shapes')
    make_shapes_dataset(shapes, num_train=6, num_val=2, size=(64, 96), max_objects=2)
    train, test = _own_tool('mmseg', 'train'), _own_tool('mmseg', 'test')
    ref, wd = str(tmp_path / 'ref'), str(tmp_path / 'resumed')
    run([PY, train] + seg_args(shapes, ref))
    train_until_killed(seg_args(shapes, wd), stop_at=5, script=train)
    log = run([PY, train] + seg_args(shapes, wd) + ['--resume'])
    assert 'resuming at iteration 4' in log.stdout + log.stderr
    final = osp.join(wd, f'iter_{SEG_ITERS}.pth')
    assert_same_training_state(final, osp.join(ref, f'iter_{SEG_ITERS}.pth'))

    from effbackbones.engine.run_patches import run_patches
    ckpt = load(final)
    ckpt['state_dict'].pop('decode_head.conv_seg.weight')
    with run_patches():         # its message hub pickles as our runs write it
        torch.save(ckpt, tmp_path / 'partial.pth')
    args = seg_args(shapes, str(tmp_path / 'test'))
    proc = run([PY, test, args[0], str(tmp_path / 'partial.pth')] + args[1:], check=False)
    assert proc.returncode != 0
    assert 'missing   : 1  (decode_head.conv_seg.weight)' in proc.stdout + proc.stderr
    proc = run([PY, test, args[0], final] + args[1:])
    assert re.search(r'mIoU: [\d.]+', proc.stdout + proc.stderr)


@pytest.mark.slow
def test_mmdet_own_train_and_test_on_the_demo_config(tmp_path):
    from test_reliability import det_args, run
    from effbackbones.datasets.synthetic import make_shapes_dataset
    shapes = str(tmp_path / 'shapes')
    make_shapes_dataset(shapes, num_train=4, num_val=2, size=(64, 96), max_objects=2)
    wd = str(tmp_path / 'wd')
    args = det_args(shapes, wd) + ['train_cfg.max_epochs=1']
    run([PY, _own_tool('mmdet', 'train')] + args)
    with open(osp.join(wd, 'last_checkpoint')) as f:
        latest = f.read().strip()
    proc = run([PY, _own_tool('mmdet', 'test'), args[0], latest] + args[1:])
    out = proc.stdout + proc.stderr
    assert re.search(r'coco/bbox_mAP: -?[\d.]+', out), out[-3000:]
    assert 'do not match exactly' not in out
