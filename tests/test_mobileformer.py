"""Mobile-Former: parity with the authors' code, tokens, contract, checkpoints, deploy."""
import re

import pytest
import torch
import torch.nn as nn

from effbackbones import CheckpointError
from effbackbones.checkpoint import load_pretrained
from effbackbones.models.mobileformer import MobileFormer
from effbackbones.models.mobileformer_layers import (Former, FormerToMobile, MobileToFormer,
                                                    PartMajorDepthwise, is_multiplier_depthwise)
from effbackbones.registry import MODELS

from conftest import check_pack_parity, load_pack, make_weights, zero_state_dict

VARIANTS = ['26m', '52m', '96m', '151m', '214m', '294m', '508m']
CHANNELS = {'26m': (12, 24, 64, 96), '52m': (12, 24, 64, 96), '96m': (16, 32, 88, 128),
            '151m': (16, 32, 88, 128), '214m': (20, 40, 112, 160), '294m': (24, 48, 128, 192),
            '508m': (40, 72, 176, 240)}
OUT_BLOCKS = {'26m': (1, 3, 6, 8), '52m': (1, 3, 6, 8), '96m': (1, 3, 6, 8),
              '151m': (2, 4, 8, 11), '214m': (2, 4, 8, 11), '294m': (2, 4, 8, 11),
              '508m': (2, 4, 8, 11)}
TOKENS = {'26m': (3, 128), '52m': (3, 128), '96m': (4, 128), '151m': (6, 192),
          '214m': (6, 192), '294m': (6, 192), '508m': (6, 192)}
CLS_ONLY = ('classifier.', 'local_global.')


def _pretrained(path, **kw):
    return dict(type='Pretrained', checkpoint=str(path), **kw)


def _pack_sd(variant):
    return make_weights().state_dict_from_pack(load_pack('mobileformer', variant))


def _loaded(variant, tmp_path, **kw):
    ckpt = tmp_path / f'{variant}.pth'
    torch.save({'state_dict': _pack_sd(variant)}, ckpt)
    model = MobileFormer(variant, init_cfg=_pretrained(ckpt), **kw)
    model.init_weights()
    return model.eval()


@pytest.mark.parametrize('variant', VARIANTS)
def test_parity_through_init_cfg_eager_and_deploy(variant, tmp_path):
    """Authors' weights saved as their checkpoint saver does -> init_cfg -> same maps."""
    n_hyper, n_multiplier = [], []

    def loaded(model, pack):
        assert sum(p.numel() for p in model.parameters()) == pack['params_dense']
        n_hyper.append(sum(isinstance(m, nn.Linear) for m in model.modules()))
        n_multiplier.append(sum(map(is_multiplier_depthwise, model.modules())))
        assert n_multiplier[0] >= 7

    def deployed(model, pack):
        # every conv->BN pair folded (no BatchNorm left), dynamic ReLU untouched
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        assert sum(isinstance(m, nn.Linear) for m in model.modules()) == n_hyper[0]
        assert not model.training and model.deploy
        # channel-multiplier depthwise convs became plain ones (their readers reordered),
        # except where a grouped 1x1 conv reads them (26M), whose groups a reorder would break
        multiplier = sum(map(is_multiplier_depthwise, model.modules()))
        split = sum(isinstance(m, PartMajorDepthwise) for m in model.modules())
        assert (multiplier, split) == ((n_multiplier[0], 0) if variant == '26m'
                                       else (0, n_multiplier[0]))

    check_pack_parity(MobileFormer, 'mobileformer', variant, tmp_path, wrapper='state_dict',
                      on_loaded=loaded, on_deploy=deployed)


def test_block_deploy_twice_keeps_the_split_and_the_values():
    """A block's own ``switch_to_deploy`` run again (the backbone guards only its own call)
    neither splits nor reorders a second time."""
    torch.manual_seed(0)
    model = MobileFormer('52m', return_tokens=True).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-0.2, 0.2)
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        ref = model(x)
        model.switch_to_deploy()
        once = model(x)
        for m in model.modules():
            if m is not model and hasattr(m, 'switch_to_deploy'):
                m.switch_to_deploy()
        twice = model(x)
    assert sum(isinstance(m, PartMajorDepthwise) for m in model.modules()) == 7
    for a, b, r in zip(once, twice, ref):
        assert torch.equal(a, b)
        assert (a - r).abs().max() <= 1e-5 * r.abs().max()


@pytest.mark.parametrize('variant', VARIANTS)
def test_param_count_channels_tokens(variant):
    pack = load_pack('mobileformer', variant)
    model = MobileFormer(variant)
    assert sum(p.numel() for p in model.parameters()) == pack['params_dense']
    assert model.out_channels == CHANNELS[variant]
    assert model.out_blocks == OUT_BLOCKS[variant]
    assert tuple(model.tokens.weight.shape) == TOKENS[variant]
    assert [o.shape[1] for o in pack['outputs']] == list(CHANNELS[variant])
    # our module names are the authors' for the backbone part
    own = set(model.state_dict())
    assert own == {k for k, _, _ in pack['dense_manifest'] if not k.startswith(CLS_ONLY)}


def test_aliases_and_registry():
    assert MobileFormer('mobile_former_294m').arch_name == '294m'
    assert MobileFormer('MobileFormer-26M').arch_name == '26m'
    model = MODELS.build(dict(type='MobileFormer', arch='52m', out_indices=(3,)))
    assert isinstance(model, MobileFormer) and model.out_channels == (96,)


# -------------------------------------------------------------------------------------------
# tokens
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize('variant', ['26m', '151m'])
def test_return_tokens_are_the_official_final_tokens(variant, tmp_path):
    mw = make_weights()
    pack = load_pack('mobileformer', variant)
    x = mw.input_from_pack(pack)
    model = _loaded(variant, tmp_path, return_tokens=True)
    with torch.no_grad():
        outs = model(x)
    assert len(outs) == 5
    tokens = outs[-1]
    assert tuple(tokens.shape) == (2,) + TOKENS[variant]
    ok, report = mw.compare_outputs(list(outs[:4]), pack)
    assert ok, report

    # an independent run of the authors' forward order: stem, tokens repeated, every block
    with torch.no_grad():
        f = model.stem(x)
        z = model.tokens.weight[None].repeat(2, 1, 1)
        for block in model.features:
            f, z = block(f, z)
    torch.testing.assert_close(tokens, z, rtol=0, atol=0)

    # the returned tokens are the ones the last block's Former->Mobile bridge and dynamic
    # ReLUs used for the stride-32 map the authors' code produced: substitute them (and, as a
    # control, perturbed tokens) for the last block's token update and re-check that map
    last = model.features[-1]

    def with_tokens(z_sub):
        last.global_block.forward = lambda _z: z_sub
        try:
            with torch.no_grad():
                return model(x)[3]
        finally:
            del last.global_block.forward

    ok, report = mw.compare_outputs([with_tokens(tokens)], dict(pack, outputs=pack['outputs'][3:]))
    assert ok, report
    bad = tokens + 0.05 * torch.randn_like(tokens)
    ok, _ = mw.compare_outputs([with_tokens(bad)], dict(pack, outputs=pack['outputs'][3:]))
    assert not ok


def test_return_tokens_runs_every_block_whatever_out_indices():
    model = MobileFormer('26m', out_indices=(0,), return_tokens=True).eval()
    full = MobileFormer('26m', return_tokens=True).eval()
    full.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a = model(x)
        b = full(x)
    assert len(a) == 2 and len(b) == 5
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[4])
    assert a[1].shape == (1, 3, 128)


def test_out_indices_subset_skips_later_blocks():
    model = MobileFormer('151m', out_indices=(0, 2)).eval()
    full = MobileFormer('151m').eval()
    full.load_state_dict(model.state_dict())
    calls = []
    for i, block in enumerate(model.features):
        block.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outs = model(x)
        ref = full(x)
    assert calls == list(range(9))          # features[8] gives stride 16; 9..11 never run
    assert [o.shape[1] for o in outs] == [16, 88] and model.out_channels == (16, 88)
    torch.testing.assert_close(outs[0], ref[0])
    torch.testing.assert_close(outs[1], ref[2])
    with pytest.raises(ValueError, match='out index 4'):
        MobileFormer('26m', out_indices=(4,))


# -------------------------------------------------------------------------------------------
# input sizes and errors
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize('hw', [(64, 96), (96, 64)])
@pytest.mark.parametrize('variant', ['26m', '294m'])
def test_shapes_non_square(variant, hw):
    model = MobileFormer(variant, return_tokens=True).eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, *hw))
    for out, s, c in zip(outs[:4], (4, 8, 16, 32), CHANNELS[variant]):
        assert out.shape == (2, c, hw[0] // s, hw[1] // s)
    assert outs[4].shape == (2,) + TOKENS[variant]


def test_odd_sides_give_ceil_sizes():
    model = MobileFormer('96m').eval()
    assert model.size_divisor is None
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 70, 45))
    assert [tuple(o.shape[2:]) for o in outs] == [(-(-70 // s), -(-45 // s))
                                                   for s in (4, 8, 16, 32)]
    assert [tuple(o.shape[2:]) for o in outs] == [(18, 12), (9, 6), (5, 3), (3, 2)]


def test_wrong_input_is_a_clear_error():
    model = MobileFormer('26m')
    with pytest.raises(ValueError, match='expects 3 input channels.*got 1'):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match='NCHW'):
        model(torch.randn(3, 64, 64))


def test_arch_errors():
    with pytest.raises(ValueError, match="unknown MobileFormer arch '100m'"):
        MobileFormer('100m')
    with pytest.raises(ValueError, match='lacks keys'):
        MobileFormer(dict(stem_channels=8, blocks=[]))
    cfg = dict(MobileFormer.arch_zoo['52m'])
    cfg['blocks'] = [('mbconv', 3, 12, 2, 0)] + list(cfg['blocks'][1:])
    with pytest.raises(ValueError, match='block 0'):
        MobileFormer(cfg)
    cfg['blocks'] = list(MobileFormer.arch_zoo['52m']['blocks'][:-2])
    with pytest.raises(ValueError, match='no block at stride 32'):
        MobileFormer(cfg)


# -------------------------------------------------------------------------------------------
# training contract
# -------------------------------------------------------------------------------------------
def test_frozen_stages_and_norm_eval():
    model = MobileFormer('151m', frozen_stages=1, norm_eval=True)
    model.train()
    frozen = [model.stem, model.tokens] + [model.features[i] for i in (0, 1, 2)]
    for m in frozen:
        assert all(not p.requires_grad for p in m.parameters())
        assert not m.training
    for i in range(3, 12):
        assert all(p.requires_grad for p in model.features[i].parameters())
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    # LayerNorms of the token path are not BatchNorms: they keep training mode
    assert model.features[5].local_global.layer_norm.training
    before = model.stem[1].running_mean.clone()
    before_late = model.features[9].conv2[1].running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, model.stem[1].running_mean)
    assert torch.equal(before_late, model.features[9].conv2[1].running_mean)
    with pytest.raises(ValueError, match='frozen_stages'):
        MobileFormer('26m', frozen_stages=5)


def test_frozen_stem_group_of_small_variants_and_bn_updates():
    # 26M/52M have no block at stride 2: the stem group is the stem and the initial tokens
    model = MobileFormer('26m', frozen_stages=0).train()
    assert [type(m).__name__ for m in model.stage_groups()[0]] == ['Stem', 'Embedding']
    assert not model.tokens.weight.requires_grad
    assert all(p.requires_grad for p in model.features[0].parameters())
    before = model.features[0].conv[1].running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert not torch.equal(before, model.features[0].conv[1].running_mean)


def test_with_cp_same_values_and_grads(monkeypatch):
    import effbackbones.models.base as base
    calls = []
    real = base.cp.checkpoint
    monkeypatch.setattr(base.cp, 'checkpoint', lambda *a, **k: calls.append(1) or real(*a, **k))
    ref = MobileFormer('26m', return_tokens=True)
    cp_model = MobileFormer('26m', return_tokens=True, with_cp=True)
    cp_model.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for m in (ref, cp_model):
        m.train()
        outs = m(x)
        assert len(calls) == (9 if m is cp_model else 0)
        sum((o * torch.linspace(0, 1, o.numel()).reshape(o.shape)).sum() for o in outs).backward()
    for (n, a), (_, b) in zip(ref.named_parameters(), cp_model.named_parameters()):
        assert a.grad is not None, n
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=n)
    assert ref.tokens.weight.grad.abs().sum() > 0


def test_drop_path_schedule_and_train_only():
    model = MobileFormer('52m', drop_path_rate=0.3, return_tokens=True)
    blocks = model.features
    assert blocks[0].drop_path.__class__.__name__ == 'Identity'   # conv-only dw-pw-dw-pw
    for i in range(1, 9):
        expected = 0.3 * (i + 1) / 9
        for m in (blocks[i].drop_path, blocks[i].local_global.drop_path,
                  blocks[i].global_block.drop_path, blocks[i].global_local.drop_path):
            assert m.drop_prob == pytest.approx(expected)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    a, b = model(x), model(x)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v)
    model.train()
    torch.manual_seed(1)
    c = model(x)
    torch.manual_seed(2)
    d = model(x)
    assert not torch.allclose(c[-1], d[-1])
    with pytest.raises(ValueError, match='drop_path_rate'):
        MobileFormer('26m', drop_path_rate=1.0)


# -------------------------------------------------------------------------------------------
# checkpoints
# -------------------------------------------------------------------------------------------
def _cls_state_dict(variant, seed=3):
    """Random tensors in the authors' classification layout (= the pack's manifest)."""
    g = torch.Generator().manual_seed(seed)
    sd = zero_state_dict(load_pack('mobileformer', variant)['cls_manifest'])
    for k, v in sd.items():
        if v.is_floating_point():
            sd[k] = torch.randn(v.shape, generator=g)
    return sd


@pytest.mark.parametrize('wrapper', ['state_dict', 'state_dict_ema', 'raw'])
@pytest.mark.parametrize('prefix', ['', 'module.'])
def test_authors_checkpoint_layouts_load(wrapper, prefix, tmp_path):
    sd = _cls_state_dict('26m')
    wrapped = {prefix + k: v for k, v in sd.items()}
    obj = wrapped if wrapper == 'raw' else {wrapper: wrapped, 'epoch': 450, 'arch': 'x'}
    path = tmp_path / 'cls.pth.tar'
    torch.save(obj, path)
    model = MobileFormer('26m', init_cfg=_pretrained(path))
    report = load_pretrained(model, str(path))
    assert report['wrapper'] == wrapper and report['layout'] == 'official'
    assert not report['missing'] and not report['unexpected'] and not report['mismatched']
    assert not report['new']
    assert sorted(report['ignored']) == sorted(k for k in sd if k.startswith(CLS_ONLY))
    assert {k.split('.')[0] for k in report['ignored']} == {'classifier', 'local_global'}
    assert len(report['matched']) == len(model.state_dict())
    own = model.state_dict()
    for k in ('tokens.weight', 'stem.0.weight', 'features.0.conv.4.weight',
              'features.8.global_block.ffn.2.weight', 'features.7.hyper3.hyper.2.bias',
              'features.5.conv2.1.running_var'):
        torch.testing.assert_close(own[k], sd[k], msg=k)
    # the same loading goes through init_cfg
    model.init_weights()


def test_both_wrappers_present_uses_state_dict(tmp_path):
    sd, ema = _cls_state_dict('26m', seed=1), _cls_state_dict('26m', seed=2)
    path = tmp_path / 'both.pth'
    torch.save({'state_dict': sd, 'state_dict_ema': ema}, path)
    model = MobileFormer('26m', init_cfg=_pretrained(path))
    model.init_weights()
    torch.testing.assert_close(model.tokens.weight, sd['tokens.weight'])


def test_effbackbones_and_detector_checkpoints_load(tmp_path):
    src = MobileFormer('52m')
    path = tmp_path / 'det.pth'
    torch.save({'state_dict': {**{'backbone.' + k: v for k, v in src.state_dict().items()},
                               'neck.conv.weight': torch.zeros(1)}}, path)
    model = MobileFormer('52m', init_cfg=_pretrained(path))
    report = load_pretrained(model, str(path))
    assert report['layout'] == 'native' and not report['ignored']
    torch.testing.assert_close(model.features[4].global_local.k.weight,
                               src.features[4].global_local.k.weight)


def test_partial_checkpoint_is_an_error_unless_not_strict(tmp_path):
    # (wrong variant, unrelated and corrupt files: tests/test_contract.py)
    sd = {k: v for k, v in _cls_state_dict('26m').items() if not k.startswith('features.8.')}
    path = tmp_path / 'partial.pth'
    torch.save({'state_dict': sd}, path)
    with pytest.raises(CheckpointError, match='would stay random'):
        MobileFormer('26m', init_cfg=_pretrained(path)).init_weights()
    model = MobileFormer('26m', init_cfg=_pretrained(path, strict=False))
    model.init_weights()
    torch.testing.assert_close(model.stem[0].weight, sd['stem.0.weight'])


@pytest.mark.parametrize('make,who', [
    (lambda: MobileToFormer(30, 192, num_heads=4), 'Mobile->Former bridge: 30 channels'),
    (lambda: FormerToMobile(30, 192, num_heads=4), 'Former->Mobile bridge: 30 channels'),
    (lambda: Former(190, num_heads=4), 'Former (token_dim): 190 channels'),
])
def test_attention_widths_the_heads_do_not_divide(make, who):
    """Each attention of the family refuses a width its heads do not divide, saying which."""
    with pytest.raises(ValueError, match=re.escape(who) + ' are not divisible by 4 heads'):
        make()
