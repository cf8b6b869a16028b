"""The backbone contract, checked the same way for every registered family and variant:
registry build from a config dict, strides/channels on non-square inputs, out_indices subsets,
every trainable parameter receives a gradient (what DistributedDataParallel requires with
find_unused_parameters=False, the mmdet/mmseg default), frozen stages receive none; checkpoint
errors (wrong variant, unrelated file, corrupt or missing file) are the same clear errors in every
family."""
import pytest
import torch

import effbackbones  # noqa: F401
from effbackbones import CheckpointError
from effbackbones.registry import MODELS

FAMILIES = sorted(name for name, cls in MODELS.module_dict.items()
                  if getattr(cls, 'arch_zoo', None))
SMALLEST = {}
for _name in FAMILIES:
    _cls = MODELS.get(_name)
    # one representative variant per family keeps this file fast; families test every variant
    SMALLEST[_name] = min(_cls.arch_zoo, key=lambda a: sum(
        p.numel() for p in _cls(arch=a).parameters()))


def test_all_families_registered():
    assert {'SwiftFormer', 'EfficientFormer', 'EfficientFormerV2', 'MobileFormer',
            'LeViT'} <= set(FAMILIES)


@pytest.mark.parametrize('family', FAMILIES)
def test_build_from_config_dict_and_strides(family):
    from mmengine.registry import MODELS as ROOT
    model = ROOT.build(dict(type=f'effbackbones.{family}', arch=SMALLEST[family])).eval()
    h, w = 64, 96
    outs = model(torch.randn(2, 3, h, w))
    assert len(outs) == len(model.out_indices) == 4
    for out, i, c in zip(outs, model.out_indices, model.out_channels):
        s = model.strides[i]
        assert out.shape == (2, c, h // s, w // s), (family, i, out.shape)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize('family', FAMILIES)
@pytest.mark.parametrize('out_indices', [(0, 1, 2, 3), (1, 2), (0,)])
def test_every_trainable_parameter_gets_a_gradient(family, out_indices):
    model = MODELS.get(family)(arch=SMALLEST[family], out_indices=out_indices).train()
    outs = model(torch.randn(2, 3, 64, 64))
    sum(o.float().mean() for o in outs).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f'{family} {out_indices}: parameters without gradient {no_grad[:5]}'


@pytest.mark.parametrize('family', FAMILIES)
def test_frozen_stages_get_no_gradient_and_keep_stats(family):
    model = MODELS.get(family)(arch=SMALLEST[family], frozen_stages=1).train()
    groups = model.stage_groups()
    frozen = [p for g in groups[:2] for m in g if m is not None for p in m.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)
    outs = model(torch.randn(2, 3, 64, 64))
    sum(o.float().mean() for o in outs).backward()
    assert all(p.grad is None for p in frozen)


#: what ``frozen_stages=1`` freezes in each family's smallest variant (stem + the first stage),
#: as module-name prefixes, written out here rather than read from ``stage_groups()``
FROZEN_AT_1 = {
    'SwiftFormer': ('stem.', 'stages.0.', 'out_norms.0.'),
    'EfficientFormer': ('stem.', 'stages.0.', 'out_norms.0.'),
    'EfficientFormerV2': ('stem.', 'stages.0.'),
    'LeViT': ('stem.conv1.', 'stem.conv2.'),
    # 26M: no block at stride 2, blocks 0 and 1 at stride 4
    'MobileFormer': ('stem.', 'tokens.', 'features.0.', 'features.1.'),
}


def test_frozen_lists_cover_every_family():
    assert set(FROZEN_AT_1) == set(FAMILIES)


@pytest.mark.parametrize('family', FAMILIES)
def test_frozen_stages_keep_batchnorm_statistics_without_norm_eval(family):
    """With ``norm_eval=False`` a train-mode forward updates the running statistics of every
    BatchNorm it runs, except those of the frozen stages (they are in eval mode)."""
    from torch.nn.modules.batchnorm import _BatchNorm
    model = MODELS.get(family)(arch=SMALLEST[family], frozen_stages=1, norm_eval=False).train()
    bns = {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)}
    before = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in bns.items()}
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64) * 2 + 1)
    moved = {n for n, m in bns.items()
             if not (torch.equal(m.running_mean, before[n][0])
                     and torch.equal(m.running_var, before[n][1]))}
    frozen = {n for n in bns if (n + '.').startswith(FROZEN_AT_1[family])}
    assert frozen, f'{family}: no BatchNorm in {FROZEN_AT_1[family]}'
    assert not frozen & moved, f'{family}: frozen BatchNorms updated: {sorted(frozen & moved)[:5]}'
    assert moved, f'{family}: no BatchNorm updated in train mode'
    assert all(not bns[n].training for n in frozen)


@pytest.mark.parametrize('family', FAMILIES)
def test_bad_input_errors(family):
    model = MODELS.get(family)(arch=SMALLEST[family])
    with pytest.raises(ValueError, match='input channels'):
        model(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match='unknown'):
        MODELS.get(family)(arch='no-such-arch')


# -------------------------------------------------------------------------------------------
# checkpoint errors, the same for every family (pack folder -> registered class, the official
# release wrapper, (file variant, model variant) pairs whose shapes differ)
# -------------------------------------------------------------------------------------------
CKPT_FAMILIES = {
    'swiftformer': ('SwiftFormer', 'model', [('l1', 'xs')]),
    'efficientformer': ('EfficientFormer', 'model', [('l3', 'l1')]),
    'efficientformerv2': ('EfficientFormerV2', 'model', [('s1', 's0')]),
    'levit': ('LeViT', 'model', [('128', '128s')]),
    'mobileformer': ('MobileFormer', 'state_dict', [('151m', '294m'), ('26m', '52m'),
                                                    ('96m', '151m')]),
}
WRONG_VARIANT = [(pack, a, b) for pack, (_, _, pairs) in CKPT_FAMILIES.items()
                 for a, b in pairs]


def _pretrained(path, **kw):
    return dict(type='Pretrained', checkpoint=str(path), **kw)


def _ckpt_model(pack_family, path, variant=None):
    name, _, pairs = CKPT_FAMILIES[pack_family]
    return MODELS.get(name)(variant or pairs[0][1], init_cfg=_pretrained(path))


def test_checkpoint_families_cover_every_registered_family():
    assert {v[0] for v in CKPT_FAMILIES.values()} == set(FAMILIES)


@pytest.mark.parametrize('pack_family,file_variant,model_variant', WRONG_VARIANT)
def test_wrong_variant_is_a_shape_error(pack_family, file_variant, model_variant, tmp_path):
    from conftest import load_pack, random_cls_state_dict
    _, wrapper, _ = CKPT_FAMILIES[pack_family]
    path = tmp_path / f'{file_variant}.pth'
    torch.save({wrapper: random_cls_state_dict(load_pack(pack_family, file_variant))}, path)
    model = _ckpt_model(pack_family, path, model_variant)
    with pytest.raises(CheckpointError, match='other shapes'):
        model.init_weights()


@pytest.mark.parametrize('pack_family', sorted(CKPT_FAMILIES))
def test_unrelated_checkpoint_matches_nothing(pack_family, tmp_path):
    path = tmp_path / 'resnet.pth'
    torch.save({'state_dict': {'conv1.weight': torch.zeros(64, 3, 7, 7),
                               'fc.weight': torch.zeros(10, 64)}}, path)
    with pytest.raises(CheckpointError, match='Nothing in the checkpoint matches'):
        _ckpt_model(pack_family, path).init_weights()


@pytest.mark.parametrize('pack_family', sorted(CKPT_FAMILIES))
def test_corrupt_and_missing_files(pack_family, tmp_path):
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'not a checkpoint at all')
    with pytest.raises(CheckpointError, match='corrupt'):
        _ckpt_model(pack_family, bad).init_weights()
    with pytest.raises(FileNotFoundError, match='checkpoint file not found'):
        _ckpt_model(pack_family, tmp_path / 'nope.pth').init_weights()
