"""The backbone contract, checked the same way for every registered family and variant:
registry build from a config dict, strides/channels on non-square inputs, out_indices subsets,
every trainable parameter receives a gradient (what DistributedDataParallel requires with
find_unused_parameters=False, the mmdet/mmseg default), frozen stages receive none."""
import pytest
import torch

import effbackbones  # noqa: F401
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


@pytest.mark.parametrize('family', FAMILIES)
def test_bad_input_errors(family):
    model = MODELS.get(family)(arch=SMALLEST[family])
    with pytest.raises(ValueError, match='input channels'):
        model(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match='unknown'):
        MODELS.get(family)(arch='no-such-arch')
