"""SwiftFormer: parity with the official code, contract, checkpoints, deploy."""

import pytest
import torch

from effbackbones import CheckpointError
from effbackbones.models import SwiftFormer

from conftest import check_pack_parity, load_pack, zero_state_dict

VARIANTS = ['xs', 's', 'l1', 'l3']
WIDTHS = {'xs': (48, 56, 112, 220), 's': (48, 64, 168, 224), 'l1': (48, 96, 192, 384),
          'l3': (64, 128, 320, 512)}


def _pretrained(path, **kw):
    return dict(type='Pretrained', checkpoint=str(path), **kw)


@pytest.mark.parametrize('variant', VARIANTS)
def test_parity_through_init_cfg(variant, tmp_path):
    """Official dense weights saved as the repo releases them -> init_cfg -> same outputs,
    eager and after deploy (BN and layer scales folded)."""
    def loaded(model, pack):
        assert sum(p.numel() for p in model.parameters()) == pack['params_dense']

    def deployed(model, pack):
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for n, m in model.named_modules()
                       if not n.startswith('out_norms'))

    check_pack_parity(SwiftFormer, 'swiftformer', variant, tmp_path,
                      on_loaded=loaded, on_deploy=deployed)


@pytest.mark.parametrize('variant', VARIANTS)
def test_param_count_matches_official_classifier_minus_head(variant):
    pack = load_pack('swiftformer', variant)
    model = SwiftFormer(variant)
    assert model.out_channels == WIDTHS[variant]
    assert sum(p.numel() for p in model.parameters()) == pack['params_dense']


@pytest.mark.parametrize('hw', [(64, 96), (96, 64), (128, 160)])
def test_shapes_non_square(hw):
    model = SwiftFormer('xs').eval()
    outs = model(torch.randn(2, 3, *hw))
    assert len(outs) == 4
    for out, s, c in zip(outs, (4, 8, 16, 32), WIDTHS['xs']):
        assert out.shape == (2, c, hw[0] // s, hw[1] // s)


def test_sides_not_multiple_of_32_follow_documented_ceil_sizes():
    model = SwiftFormer('xs').eval()
    outs = model(torch.randn(1, 3, 70, 45))
    h, w = 70, 45
    sizes = []
    for _ in range(4):
        h, w = -(-h // 2), -(-w // 2)
        if not sizes:
            h, w = -(-h // 2), -(-w // 2)
        sizes.append((h, w))
    assert [tuple(o.shape[2:]) for o in outs] == sizes


def test_out_indices_subset_and_errors():
    model = SwiftFormer('xs', out_indices=(1, 3))
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [56, 220]
    assert model.out_channels == (56, 220)
    with pytest.raises(ValueError, match='out index 4'):
        SwiftFormer('xs', out_indices=(4,))
    with pytest.raises(ValueError, match="unknown SwiftFormer arch 'm'"):
        SwiftFormer('m')
    with pytest.raises(ValueError, match='lacks keys'):
        SwiftFormer(dict(widths=[8, 8, 8, 8]))


def test_wrong_channel_count_is_a_clear_error():
    model = SwiftFormer('xs')
    with pytest.raises(ValueError, match='expects 3 input channels.*got 1'):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match='NCHW'):
        model(torch.randn(3, 64, 64))


def test_frozen_stages_and_norm_eval():
    model = SwiftFormer('xs', frozen_stages=1, norm_eval=True)
    model.train()
    for p in model.stem.parameters():
        assert not p.requires_grad
    for p in model.stages[0].parameters():
        assert not p.requires_grad
    assert not model.out_norms[0].weight.requires_grad
    assert all(p.requires_grad for p in model.stages[1].parameters())
    assert all(not m.training for m in model.modules()
               if isinstance(m, torch.nn.BatchNorm2d))
    # frozen stages keep their running statistics while training
    before = model.stem[1].running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, model.stem[1].running_mean)
    with pytest.raises(ValueError, match='frozen_stages'):
        SwiftFormer('xs', frozen_stages=7)


def test_norm_eval_false_updates_bn_stats():
    model = SwiftFormer('xs').train()
    before = model.stages[1].downsample.norm.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert not torch.equal(before, model.stages[1].downsample.norm.running_mean)


def test_with_cp_same_values_and_grads():
    torch.manual_seed(0)
    ref = SwiftFormer('xs', drop_path_rate=0.0)
    cp_model = SwiftFormer('xs', with_cp=True)
    cp_model.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for m in (ref, cp_model):
        m.train()
        sum(o.sum() for o in m(x)).backward()
    for (n, a), (_, b) in zip(ref.named_parameters(), cp_model.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_with_cp_updates_bn_statistics_once():
    """The checkpoint recompute in backward must not update BatchNorm running statistics a
    second time: one step with with_cp leaves every buffer as one step without it."""
    ref = SwiftFormer('xs')
    cp_model = SwiftFormer('xs', with_cp=True)
    cp_model.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for m in (ref, cp_model):
        m.train()
        sum(o.sum() for o in m(x)).backward()
    bn = 'stages.1.blocks.0.norm.running_mean'       # a BN inside a checkpointed block
    before = SwiftFormer('xs').state_dict()[bn]
    buffers = dict(cp_model.named_buffers())
    assert not torch.equal(buffers[bn], before)      # updated...
    for n, a in ref.named_buffers():                 # ...exactly as much as without with_cp
        torch.testing.assert_close(buffers[n], a, rtol=0, atol=0, msg=n)


def test_drop_path_is_stochastic_in_train_only():
    model = SwiftFormer('xs', drop_path_rate=0.5)
    rates = [b.drop_path.drop_prob for s in model.stages for b in s.blocks
             if hasattr(b.drop_path, 'drop_prob')]
    assert rates and max(rates) == pytest.approx(0.5)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    torch.testing.assert_close(model(x)[3], model(x)[3])


# -------------------------------------------------------------------------------------------
# checkpoints
# -------------------------------------------------------------------------------------------
def _cls_state_dict(pack, seed=3):
    """Random tensors in the released ImageNet (classification) layout."""
    g = torch.Generator().manual_seed(seed)
    sd = zero_state_dict(pack['cls_manifest'])
    for k, v in sd.items():
        if v.is_floating_point():
            sd[k] = torch.randn(v.shape, generator=g)
    return sd


@pytest.mark.parametrize('wrapper', ['model', 'state_dict', 'raw'])
@pytest.mark.parametrize('prefix', ['', 'module.', 'backbone.'])
def test_released_classification_checkpoint_loads(wrapper, prefix, tmp_path, caplog):
    pack = load_pack('swiftformer', 'xs')
    sd = _cls_state_dict(pack)
    sd = {prefix + k: v for k, v in sd.items()}
    obj = sd if wrapper == 'raw' else {wrapper: sd, 'epoch': 299}
    path = tmp_path / 'cls.pth'
    torch.save(obj, path)
    model = SwiftFormer('xs', init_cfg=_pretrained(path))
    from effbackbones.checkpoint import load_pretrained
    report = load_pretrained(model, str(path))
    assert report['layout'] == 'official'
    assert not report['missing'] and not report['unexpected'] and not report['mismatched']
    assert sorted({k.split('.')[0] for k in report['new']}) == ['out_norms']
    assert sorted({k.split('.')[0] for k in report['ignored']}) == ['dist_head', 'head', 'norm']
    # every backbone tensor came from the file
    own = model.state_dict()
    plain = {k[len(prefix):]: v for k, v in sd.items()}
    torch.testing.assert_close(own['stem.0.weight'], plain['patch_embed.0.weight'])
    torch.testing.assert_close(own['stages.3.blocks.3.attn.proj.weight'],
                               plain['network.6.3.attn.Proj.weight'])
    torch.testing.assert_close(own['stages.2.downsample.norm.running_var'],
                               plain['network.3.norm.running_var'])
    torch.testing.assert_close(own['stages.0.blocks.2.layer_scale_1.gamma'],
                               plain['network.0.2.layer_scale_1'])


def test_timm_layout_loads_with_same_values_as_official(tmp_path):
    pack = load_pack('swiftformer', 's')
    cls_sd = _cls_state_dict(pack, seed=5)
    official = SwiftFormer('s')
    rep = official_report = None
    from effbackbones.checkpoint import load_pretrained
    official_report = load_pretrained(official, cls_sd)
    # build the timm layout of the same tensors from the pack's timm manifest (same order)
    timm_keys = [k for k, _, _ in pack['timm_manifest']]
    assert len(timm_keys) == len(cls_sd)
    timm_sd = {tk: v for tk, v in zip(_timm_order_keys(pack), _values_in_timm_order(pack, cls_sd))}
    assert set(timm_sd) == set(timm_keys)
    timm_model = SwiftFormer('s')
    rep = load_pretrained(timm_model, timm_sd)
    assert rep['layout'] == 'timm' and not rep['missing'] and not rep['unexpected']
    for k, v in official.state_dict().items():
        if not k.startswith('out_norms'):
            torch.testing.assert_close(timm_model.state_dict()[k], v, msg=k)
    assert official_report['layout'] == 'official'


def _official_to_timm_key(k):
    # independent re-statement of timm's checkpoint_filter_fn for swiftformer (reverse)
    import re
    k = k.replace('patch_embed.', 'stem.').replace('.Proj.', '.proj.').replace('dist_head', 'head_dist')
    m = re.match(r'network\.(\d+)\.(\d+)\.(.*)', k)
    if m:
        k = f'stages.{int(m[1]) // 2}.blocks.{m[2]}.{m[3]}'
    m = re.match(r'network\.(\d+)\.(.*)', k)
    if m:
        k = f'stages.{(int(m[1]) + 1) // 2}.downsample.{m[2]}'
    if k.endswith(('layer_scale', 'layer_scale_1', 'layer_scale_2')):
        k += '.gamma'
    return k


def _timm_order_keys(pack):
    return [k for k, _, _ in pack['timm_manifest']]


def _values_in_timm_order(pack, cls_sd):
    by_timm = {_official_to_timm_key(k): v for k, v in cls_sd.items()}
    return [by_timm[k] for k in _timm_order_keys(pack)]


def test_partial_checkpoint_is_an_error_unless_not_strict(tmp_path):
    pack = load_pack('swiftformer', 'xs')
    sd = _cls_state_dict(pack)
    sd = {k: v for k, v in sd.items() if not k.startswith('network.6.')}
    path = tmp_path / 'partial.pth'
    torch.save({'model': sd}, path)
    with pytest.raises(CheckpointError, match='would stay random'):
        SwiftFormer('xs', init_cfg=_pretrained(path)).init_weights()
    model = SwiftFormer('xs', init_cfg=_pretrained(path, strict=False))
    model.init_weights()
    torch.testing.assert_close(model.stem[0].weight, sd['patch_embed.0.weight'])


class _Evil:
    def __reduce__(self):
        return (print, ('pwned',))


def test_unsafe_pickle_needs_opt_in(tmp_path):
    import argparse
    pack = load_pack('swiftformer', 'xs')
    sd = _cls_state_dict(pack)
    ok_path = tmp_path / 'with_args.pth'
    torch.save({'model': sd, 'args': argparse.Namespace(lr=1e-3)}, ok_path)
    SwiftFormer('xs', init_cfg=_pretrained(ok_path)).init_weights()   # allow-listed object
    evil = tmp_path / 'evil.pth'
    torch.save({'model': sd, 'extra': _Evil()}, evil)
    with pytest.raises(CheckpointError, match='allow_unsafe=True'):
        SwiftFormer('xs', init_cfg=_pretrained(evil)).init_weights()
    model = SwiftFormer('xs', init_cfg=_pretrained(evil, allow_unsafe=True))
    model.init_weights()
    torch.testing.assert_close(model.stem[0].weight, sd['patch_embed.0.weight'])
