"""EfficientFormer v1: parity with the official dense code, the 'pretrained' bias mode against the
official classification attention, contract, checkpoint layouts, bias cache, deploy."""
import copy
import re

import pytest
import torch
import torch.nn.functional as F

from effbackbones import CheckpointError
from effbackbones.checkpoint import load_pretrained
from effbackbones.models.efficientformer import Attention, EfficientFormer, Flat, Meta3D
from effbackbones.models.attention_bias import offset_index

from conftest import (check_pack_parity, load_pack, make_weights, official_bias_idxs,
                      zero_state_dict)

VARIANTS = ['l1', 'l3', 'l7']
WIDTHS = {'l1': (48, 96, 224, 448), 'l3': (64, 128, 320, 512), 'l7': (96, 192, 384, 768)}
DEPTHS = {'l1': (3, 2, 6, 4), 'l3': (4, 4, 12, 6), 'l7': (6, 6, 18, 8)}
NUM_VIT = {'l1': 1, 'l3': 4, 'l7': 8}
HEADS = 8


def _pretrained(path, **kw):
    return dict(type='Pretrained', checkpoint=str(path), **kw)


def _close(out, ref, rel=2e-4):
    """The pack tolerance: |out - ref| <= rel * max|ref| + 1e-4 * |ref|."""
    bound = rel * ref.abs().max() + 1e-4 * ref.abs()
    return bool(((out - ref).abs() <= bound).all())


def _cls_from_dense(pack, seed=7):
    """Released-classification layout filled with the dense pack's weights; random ImageNet
    bias tables (the dense pack has only placeholders there) and random head/final norm."""
    g = torch.Generator().manual_seed(seed)
    dense = make_weights().state_dict_from_pack(pack)
    idx = official_bias_idxs(7)
    sd = {}
    for k, shape, dtype in pack['cls_manifest']:
        if k.endswith('.attention_biases'):
            sd[k] = 2.0 * torch.randn(shape, generator=g)
        elif k.endswith('.attention_bias_idxs'):
            sd[k] = idx.clone()
        elif k in dense:
            sd[k] = dense[k].clone()
        else:   # norm.*, head.*, dist_head.*
            sd[k] = torch.randn(shape, generator=g)
    return sd


def _random_cls_state_dict(pack, seed=3):
    g = torch.Generator().manual_seed(seed)
    sd = zero_state_dict(pack['cls_manifest'])
    for k, v in sd.items():
        if v.is_floating_point():
            sd[k] = torch.randn(v.shape, generator=g)
            if k.endswith('running_var'):
                sd[k] = sd[k].abs() + 0.5
    sd = {k: (official_bias_idxs(7) if k.endswith('attention_bias_idxs') else v)
          for k, v in sd.items()}
    return sd


def _param_count(model):
    return sum(p.numel() for p in model.parameters())


# -------------------------------------------------------------------------------------------
# parity with the official dense backbone (bias_mode='official')
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize('variant', VARIANTS)
def test_parity_through_init_cfg_and_deploy(variant, tmp_path):
    def loaded(model, pack):
        # official dense counts attention_biases_seg (a Parameter) but not the ImageNet table
        # (a buffer there and here)
        assert _param_count(model) == pack['params_dense']
        assert model.out_channels == WIDTHS[variant]

    def deployed(model, pack):
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())

    check_pack_parity(EfficientFormer, 'efficientformer', variant, tmp_path,
                      on_loaded=loaded, on_deploy=deployed)


def test_parity_fails_with_a_permuted_seg_table():
    """The parity check is sensitive to the bias index mapping."""
    mw = make_weights()
    pack = load_pack('efficientformer', 'l1')
    sd = mw.state_dict_from_pack(pack)
    key = 'network.6.4.token_mixer.attention_biases_seg'
    sd[key] = sd[key][:, torch.randperm(625, generator=torch.Generator().manual_seed(0))]
    model = EfficientFormer('l1')
    load_pretrained(model, sd)
    with torch.no_grad():
        outs = model.eval()(mw.input_from_pack(pack))
    assert not mw.compare_outputs(list(outs), pack)[0]


def test_seg_gather_equals_official_index():
    pack = load_pack('efficientformer', 'l3')
    model = EfficientFormer('l3')
    attns = model.attention_bias_modules()
    assert len(attns) == 4
    official = [v for k, v in pack['int_buffers'].items()
                if k.endswith('attention_bias_idxs_seg')]
    assert official
    for v in official:
        assert torch.equal(offset_index((25, 25))[0], v)
    # the per-axis gather of the dense table == indexing it with the official buffer
    with torch.no_grad():
        for a in attns:
            a.attention_biases_seg.normal_()
            assert torch.equal(a.dense_bias_matrix(), a.attention_biases_seg[:, official[0]])
    # and no (625, 625) int64 index is held by the model (the gather is per axis)
    assert not any(b.dtype == torch.long and b.numel() > 1 for a in attns for b in a.buffers())
    # the classification table too: |dy| * 7 + |dx| is the official insertion order
    assert torch.equal(offset_index((7, 7))[0], official_bias_idxs(7))


def test_official_bias_is_resized_bicubically_to_token_count():
    pack = load_pack('efficientformer', 'l1')
    sd = make_weights().state_dict_from_pack(pack)
    model = EfficientFormer('l1')
    load_pretrained(model, sd)
    attn = model.stages[3].blocks[4].token_mixer
    seg = sd['network.6.4.token_mixer.attention_biases_seg']
    full = seg[:, pack['int_buffers']['network.6.4.token_mixer.attention_bias_idxs_seg']]
    for hw in [(2, 3), (7, 7), (25, 40)]:
        n = hw[0] * hw[1]
        ref = F.interpolate(full[None], size=(n, n), mode='bicubic', align_corners=False)[0]
        torch.testing.assert_close(attn.attention_bias(hw, hw), ref, rtol=0, atol=0)


# -------------------------------------------------------------------------------------------
# bias_mode='pretrained'
# -------------------------------------------------------------------------------------------
def _bn(x, sd, p):
    return F.batch_norm(x, sd[p + 'running_mean'], sd[p + 'running_var'], sd[p + 'weight'],
                        sd[p + 'bias'], False, 0.0, 1e-5)


def _reference_cls_stage4(x, sd, depth, num_vit):
    """Independent functional re-statement of the official classification code from the
    stride-16 map to the stage-4 tokens (downsample, Meta4D, Flat, Meta3D with
    ``attention_biases[:, attention_bias_idxs]``, idx built with itertools.product)."""
    idx = official_bias_idxs(7)
    x = F.conv2d(x, sd['network.5.proj.weight'], sd['network.5.proj.bias'], stride=2, padding=1)
    x = _bn(x, sd, 'network.5.norm.')
    b, c, h, w = x.shape
    assert (h, w) == (7, 7)
    for j in range(depth + 1):
        p = f'network.6.{j}.'
        if j < depth - num_vit:            # Meta4D
            y = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False) - x
            x = x + sd[p + 'layer_scale_1'][:, None, None] * y
            y = _bn(F.conv2d(x, sd[p + 'mlp.fc1.weight'], sd[p + 'mlp.fc1.bias']), sd,
                    p + 'mlp.norm1.')
            y = _bn(F.conv2d(F.gelu(y), sd[p + 'mlp.fc2.weight'], sd[p + 'mlp.fc2.bias']), sd,
                    p + 'mlp.norm2.')
            x = x + sd[p + 'layer_scale_2'][:, None, None] * y
        elif j == depth - num_vit:         # Flat
            x = x.flatten(2).transpose(1, 2)
        else:                              # Meta3D
            t = F.layer_norm(x, (c,), sd[p + 'norm1.weight'], sd[p + 'norm1.bias'])
            qkv = F.linear(t, sd[p + 'token_mixer.qkv.weight'], sd[p + 'token_mixer.qkv.bias'])
            q, k, v = qkv.reshape(b, h * w, HEADS, -1).split([32, 32, 128], dim=3)
            q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
            table = sd[p + 'token_mixer.attention_biases']
            attn = (q @ k.transpose(-2, -1)) * 32 ** -0.5 + table[:, idx]
            y = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, h * w, HEADS * 128)
            y = F.linear(y, sd[p + 'token_mixer.proj.weight'], sd[p + 'token_mixer.proj.bias'])
            x = x + sd[p + 'layer_scale_1'] * y
            t = F.layer_norm(x, (c,), sd[p + 'norm2.weight'], sd[p + 'norm2.bias'])
            y = F.linear(F.gelu(F.linear(t, sd[p + 'mlp.fc1.weight'], sd[p + 'mlp.fc1.bias'])),
                         sd[p + 'mlp.fc2.weight'], sd[p + 'mlp.fc2.bias'])
            x = x + sd[p + 'layer_scale_2'] * y
    return x.transpose(1, 2).reshape(b, c, h, w)


def _stage4_io(model, x):
    """(stride-16 map entering stage 4, stage-4 output before its output norm)."""
    seen = {}
    h1 = model.stages[3].downsample.register_forward_pre_hook(
        lambda m, a: seen.__setitem__('in', a[0]))
    h2 = model.out_norms[3].register_forward_pre_hook(lambda m, a: seen.__setitem__('out', a[0]))
    with torch.no_grad():
        model(x)
    h1.remove()
    h2.remove()
    return seen['in'], seen['out']


@pytest.mark.parametrize('variant', VARIANTS)
def test_pretrained_mode_at_224_is_the_classification_model(variant, tmp_path):
    pack = load_pack('efficientformer', variant)
    cls_sd = _cls_from_dense(pack)
    assert sorted(cls_sd) == sorted(k for k, _, _ in pack['cls_manifest'])
    path = tmp_path / 'cls.pth'
    torch.save({'model': cls_sd}, path)
    model = EfficientFormer(variant, bias_mode='pretrained', init_cfg=_pretrained(path))
    model.init_weights()
    model.eval()
    x = torch.randn(1, 3, 224, 224)
    stage4_in, ours = _stage4_io(model, x)
    ref = _reference_cls_stage4(stage4_in, cls_sd, DEPTHS[variant][3], NUM_VIT[variant])
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())

    # at the 7x7 pretraining grid nothing is resized: the gathered bias IS the official gather
    idx = official_bias_idxs(7)
    blocks = [b for b in model.stages[3].blocks if isinstance(b, Meta3D)]
    assert len(blocks) == NUM_VIT[variant]
    first = DEPTHS[variant][3] - NUM_VIT[variant] + 1
    for j, blk in enumerate(blocks, start=first):
        table = cls_sd[f'network.6.{j}.token_mixer.attention_biases']
        assert torch.equal(blk.token_mixer.attention_bias((7, 7), (7, 7)), table[:, idx])
        with torch.no_grad():                                             # the eval cache
            assert torch.equal(blk.token_mixer.attention_bias((7, 7), (7, 7)), table[:, idx])

    # the official mode (new 25x25 table, zeros from a cls checkpoint) gives other features
    official = EfficientFormer(variant, init_cfg=_pretrained(path))
    official.init_weights()
    official.eval()
    off_in, off_out = _stage4_io(official, x)
    torch.testing.assert_close(off_in, stage4_in, rtol=0, atol=0)
    assert (off_out - ours).abs().max() > 1e-2 * ours.abs().max()


def _table_on_grid_reference(table, src, hw):
    """The pretrained-table rule (shared with LeViT / V2), written out axis by axis: along an
    axis where the grid side is <= ``src`` the learned offsets ``0..side-1`` are kept (crop),
    along a larger one the offset axis is resized bicubically (align_corners=False)."""
    img = table.reshape(1, -1, src, src)
    h, w = hw
    img = F.interpolate(img, size=(h, img.shape[3]), mode='bicubic', align_corners=False) \
        if h > src else img[:, :, :h]
    img = F.interpolate(img, size=(img.shape[2], w), mode='bicubic', align_corners=False) \
        if w > src else img[:, :, :, :w]
    return img[0]


@pytest.mark.parametrize('hw', [(4, 6), (1, 3), (7, 7), (9, 5), (5, 12), (10, 12)])
def test_pretrained_table_is_cropped_or_resized_over_the_offset_grid(hw):
    model = EfficientFormer('l1', bias_mode='pretrained')
    attn = model.stages[3].blocks[4].token_mixer
    with torch.no_grad():
        attn.attention_biases.copy_(torch.randn(HEADS, 49))
    table = attn.attention_biases.detach()
    img = _table_on_grid_reference(table, 7, hw)
    h, w = hw
    pos = [(y, x) for y in range(h) for x in range(w)]
    ref = torch.stack([torch.stack([img[:, abs(p[0] - q[0]), abs(p[1] - q[1])] for q in pos], -1)
                       for p in pos], -2)
    bias = attn.attention_bias(hw, hw)
    assert bias.shape == (HEADS, h * w, h * w)
    torch.testing.assert_close(bias, ref, rtol=0, atol=1e-6)
    if h <= 7 and w <= 7:
        # a grid that fits in the pretraining one: exactly the learned values of its offsets
        flat = torch.tensor([[abs(p[0] - q[0]) * 7 + abs(p[1] - q[1]) for q in pos] for p in pos])
        assert torch.equal(bias, table[:, flat])


def test_modes_own_different_tensors():
    off = EfficientFormer('l3')
    pre = EfficientFormer('l3', bias_mode='pretrained')
    off_params = dict(off.named_parameters())
    off_state = off.state_dict()
    for k in off_state:
        if k.endswith('.attention_biases'):
            assert k not in off_params and off_state[k].shape == (HEADS, 49)
    assert sum(k.endswith('attention_biases_seg') for k in off_params) == 4
    assert not any('attention_biases_seg' in k for k in pre.state_dict())
    assert sum(k.endswith('.attention_biases') for k, _ in pre.named_parameters()) == 4
    # index tables are computed, never loaded
    assert not any('idxs' in k for k in list(off_state) + list(pre.state_dict()))
    pack = load_pack('efficientformer', 'l3')
    head = sum(torch.Size(s).numel() for k, s, _ in pack['cls_manifest']
               if k.startswith(('norm.', 'head.', 'dist_head.')))
    assert _param_count(pre) == pack['params_cls'] - head + 2 * sum(WIDTHS['l3'])


@pytest.mark.parametrize('variant', VARIANTS)
def test_pretrained_mode_deploy_parity_non_square(variant):
    pack = load_pack('efficientformer', variant)
    model = EfficientFormer(variant, bias_mode='pretrained')
    load_pretrained(model, _cls_from_dense(pack))
    model.eval()
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        ref = model(x)
        deployed = copy.deepcopy(model).switch_to_deploy()
        outs = deployed(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deployed.modules())
    assert outs[3].shape == (1, WIDTHS[variant][3], 3, 5)
    for o, r in zip(outs, ref):
        assert _close(o, r, rel=1e-4)


def test_official_mode_deploy_parity_non_square():
    pack = load_pack('efficientformer', 'l1')
    model = EfficientFormer('l1')
    load_pretrained(model, make_weights().state_dict_from_pack(pack))
    model.eval()
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        ref = model(x)
        deployed = copy.deepcopy(model).switch_to_deploy()
        outs = deployed(x)
    for o, r in zip(outs, ref):
        assert _close(o, r, rel=1e-4)


# -------------------------------------------------------------------------------------------
# contract
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize('bias_mode', ['official', 'pretrained'])
@pytest.mark.parametrize('hw', [(64, 96), (96, 64), (256, 384)])
def test_shapes_non_square(hw, bias_mode):
    model = EfficientFormer('l1', bias_mode=bias_mode).eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, *hw))
    assert len(outs) == 4
    for out, s, c in zip(outs, (4, 8, 16, 32), WIDTHS['l1']):
        assert out.shape == (2, c, hw[0] // s, hw[1] // s)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize('bias_mode', ['official', 'pretrained'])
def test_sides_not_multiple_of_32_follow_documented_ceil_sizes(bias_mode):
    model = EfficientFormer('l1', bias_mode=bias_mode).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 70, 45))
    h, w, sizes = 70, 45, []
    h, w = -(-h // 4), -(-w // 4)
    for _ in range(4):
        sizes.append((h, w))
        h, w = -(-h // 2), -(-w // 2)
    assert [tuple(o.shape[2:]) for o in outs] == sizes == [(18, 12), (9, 6), (5, 3), (3, 2)]


def test_out_indices_subset_and_errors():
    model = EfficientFormer('l1', out_indices=(1, 3))
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [96, 448]
    assert model.out_channels == (96, 448)
    assert isinstance(model.out_norms[0], torch.nn.Identity)
    with pytest.raises(ValueError, match='out index 4'):
        EfficientFormer('l1', out_indices=(4,))
    with pytest.raises(ValueError, match="unknown EfficientFormer arch 'l5'"):
        EfficientFormer('l5')
    with pytest.raises(ValueError, match='lacks keys'):
        EfficientFormer(dict(widths=[8, 8, 8, 8], depths=[1, 1, 1, 1]))
    with pytest.raises(ValueError, match='num_vit'):
        EfficientFormer(dict(widths=[8, 16, 24, 32], depths=[1, 1, 1, 2], num_vit=3))
    with pytest.raises(ValueError, match="bias_mode must be one of.*got 'imagenet'"):
        EfficientFormer('l1', bias_mode='imagenet')
    assert EfficientFormer('EfficientFormer-L3').arch_name == 'l3'


def test_out_indices_subset_loads_dense_checkpoint():
    mw = make_weights()
    pack = load_pack('efficientformer', 'l1')
    model = EfficientFormer('l1', out_indices=(1, 3))
    rep = load_pretrained(model, mw.state_dict_from_pack(pack))
    assert not rep['missing'] and not rep['unexpected']
    assert {k.split('.')[1] for k in rep['ignored'] if k.startswith('out_norms')} == {'0', '2'}
    with torch.no_grad():
        outs = model.eval()(mw.input_from_pack(pack))
    assert _close(outs[0], pack['outputs'][1]) and _close(outs[1], pack['outputs'][3])


def test_custom_arch_all_attention_and_no_attention():
    for num_vit in (0, 2):
        model = EfficientFormer(dict(widths=[8, 16, 24, 32], depths=[1, 1, 1, 2],
                                     num_vit=num_vit)).eval()
        kinds = [type(b).__name__ for b in model.stages[3].blocks]
        assert kinds == (['Meta4D', 'Meta4D'] if num_vit == 0 else ['Flat', 'Meta3D', 'Meta3D'])
        assert model(torch.randn(1, 3, 64, 96))[3].shape == (1, 32, 2, 3)


def test_wrong_channel_count_is_a_clear_error():
    model = EfficientFormer('l1')
    with pytest.raises(ValueError, match='expects 3 input channels.*got 1'):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match='NCHW'):
        model(torch.randn(3, 64, 64))


def test_frozen_stages_and_norm_eval():
    model = EfficientFormer('l1', frozen_stages=1, norm_eval=True)
    model.train()
    assert not any(p.requires_grad for p in model.stem.parameters())
    assert not any(p.requires_grad for p in model.stages[0].parameters())
    assert not model.out_norms[0].weight.requires_grad
    assert all(p.requires_grad for p in model.stages[1].parameters())
    assert model.stages[3].blocks[4].token_mixer.training
    assert all(not m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = model.stem.norm1.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, model.stem.norm1.running_mean)
    with pytest.raises(ValueError, match='frozen_stages'):
        EfficientFormer('l1', frozen_stages=5)


def test_norm_eval_false_updates_bn_stats():
    model = EfficientFormer('l1').train()
    before = model.stages[1].downsample.norm.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert not torch.equal(before, model.stages[1].downsample.norm.running_mean)


@pytest.mark.parametrize('bias_mode', ['official', 'pretrained'])
def test_with_cp_same_grads_and_every_parameter_is_used(bias_mode):
    ref = EfficientFormer('l1', bias_mode=bias_mode)
    with torch.no_grad():
        for a in ref.attention_bias_modules():
            getattr(a, 'attention_biases_seg', a.attention_biases).normal_()
    cp_model = EfficientFormer('l1', bias_mode=bias_mode, with_cp=True)
    cp_model.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 96, 64)
    # random weights: a plain sum of a GroupNorm output has no gradient
    weights = [torch.randn(2, c, 96 // s, 64 // s) for c, s in zip(WIDTHS['l1'], (4, 8, 16, 32))]
    for m in (ref, cp_model):
        m.train()
        sum((o * w).sum() for o, w in zip(m(x), weights)).backward()
    for (n, a), (_, b) in zip(ref.named_parameters(), cp_model.named_parameters()):
        assert a.grad is not None, f'{n} got no gradient (DDP would fail)'
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=n)
    table = 'attention_biases_seg' if bias_mode == 'official' else 'attention_biases'
    grad = getattr(ref.stages[3].blocks[4].token_mixer, table).grad
    assert grad.abs().sum() > 0


def test_drop_path_follows_official_schedule():
    model = EfficientFormer('l3', drop_path_rate=0.3)
    blocks = [b for s in model.stages for b in s.blocks if not isinstance(b, Flat)]
    total = sum(DEPTHS['l3'])
    assert len(blocks) == total
    for k, b in enumerate(blocks):
        expected = 0.3 * k / (total - 1)
        got = b.drop_path.drop_prob if hasattr(b.drop_path, 'drop_prob') else 0.0
        assert got == pytest.approx(expected)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    torch.testing.assert_close(model(x)[3], model(x)[3])
    model.train()
    assert not torch.allclose(model(x)[3], model(x)[3])


# -------------------------------------------------------------------------------------------
# bias cache
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize('bias_mode', ['official', 'pretrained'])
def test_bias_cache_per_input_size(bias_mode):
    torch.manual_seed(1)
    model = EfficientFormer('l1', bias_mode=bias_mode)
    with torch.no_grad():
        for a in model.attention_bias_modules():
            getattr(a, 'attention_biases_seg', a.attention_biases).normal_(0, 2)
    state = copy.deepcopy(model.state_dict())
    model.eval()
    attn = model.stages[3].blocks[4].token_mixer
    sizes = [(64, 96), (96, 64), (64, 96), (128, 64)]
    with torch.no_grad():
        for hw in sizes:
            x = torch.randn(1, 3, *hw)
            fresh = EfficientFormer('l1', bias_mode=bias_mode)
            fresh.load_state_dict(state)
            expected = fresh.eval()(x)
            got = model(x)
            for g, e in zip(got, expected):
                assert torch.equal(g, e)
    assert set(attn._bias_cache) == {(g, g, None) for g in [(2, 3), (3, 2), (4, 2)]}
    # a changed table is picked up after loading, train() empties the cache
    state2 = copy.deepcopy(state)
    name = [k for k in state2 if k.endswith(('attention_biases_seg', 'attention_biases'))
            and not (bias_mode == 'pretrained' and k.endswith('_seg'))][0]
    state2[name] = state2[name] + 1.0
    model.load_state_dict(state2)
    assert not attn._bias_cache
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 96))
    assert attn._bias_cache
    model.train()
    assert not attn._bias_cache
    model.eval()
    # bounded: only the most recent sizes stay
    small = EfficientFormer('l1', bias_mode=bias_mode, bias_cache_size=1).eval()
    with torch.no_grad():
        for hw in sizes:
            small(torch.randn(1, 3, *hw))
    a = small.stages[3].blocks[4].token_mixer
    assert a._bias_cache.keys() == [((4, 2), (4, 2), None)]
    assert len(a._table_cache) == (1 if bias_mode == 'pretrained' else 0)
    # training with many sizes (multi-scale) caches nothing
    small.train()
    for hw in sizes:
        small(torch.randn(1, 3, *hw))
    assert not a._bias_cache and not a._table_cache


def test_cache_is_cleared_after_load_pretrained_and_to():
    pack = load_pack('efficientformer', 'l1')
    model = EfficientFormer('l1', bias_mode='pretrained').eval()
    attn = model.stages[3].blocks[4].token_mixer
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    key = ((7, 7), (7, 7), None)
    stale = attn._bias_cache[key].clone()
    cls_sd = _cls_from_dense(pack)
    load_pretrained(model, cls_sd)
    assert not attn._bias_cache
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    fresh = attn._bias_cache[key]
    assert not torch.equal(stale, fresh)
    assert torch.equal(fresh, cls_sd['network.6.4.token_mixer.attention_biases'][
        :, official_bias_idxs(7)])
    model.double()
    assert not attn._bias_cache
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64, dtype=torch.float64))[3].dtype == torch.float64


# -------------------------------------------------------------------------------------------
# checkpoints
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize('wrapper', ['model', 'state_dict', 'raw'])
@pytest.mark.parametrize('prefix', ['', 'module.'])
def test_released_classification_checkpoint_loads(wrapper, prefix, tmp_path):
    pack = load_pack('efficientformer', 'l1')
    sd = _random_cls_state_dict(pack)
    sd['network.6.4.token_mixer.attention_bias_idxs'] = torch.ones(49, 49, dtype=torch.long)
    wrapped = {prefix + k: v for k, v in sd.items()}
    obj = wrapped if wrapper == 'raw' else {wrapper: wrapped, 'epoch': 299}
    path = tmp_path / 'cls.pth'
    torch.save(obj, path)
    for bias_mode, new_groups in (('official', {'out_norms', 'attention_biases_seg'}),
                                  ('pretrained', {'out_norms'})):
        model = EfficientFormer('l1', bias_mode=bias_mode, init_cfg=_pretrained(path))
        model.init_weights()     # the user's path
        report = load_pretrained(model, str(path))
        assert report['layout'] == 'official'
        assert not report['missing'] and not report['unexpected'] and not report['mismatched']
        assert {k.split('.')[0] if k.startswith('out_norms') else k.split('.')[-1]
                for k in report['new']} == new_groups
        assert {re.sub(r'^stages.*\.', '', k).split('.')[0] for k in report['ignored']} == \
            {'head', 'head_dist', 'norm', 'attention_bias_idxs'}
        own = model.state_dict()
        torch.testing.assert_close(own['stem.conv1.weight'], sd['patch_embed.0.weight'])
        torch.testing.assert_close(own['stem.norm2.running_var'], sd['patch_embed.4.running_var'])
        torch.testing.assert_close(own['stages.3.downsample.conv.weight'],
                                   sd['network.5.proj.weight'])
        torch.testing.assert_close(own['stages.2.blocks.5.ls2.gamma'],
                                   sd['network.4.5.layer_scale_2'])
        torch.testing.assert_close(own['stages.3.blocks.4.token_mixer.attention_biases'],
                                   sd['network.6.4.token_mixer.attention_biases'])
        # official mode: learnt from scratch like the official dense code (zeros)
        if bias_mode == 'official':
            assert not own['stages.3.blocks.4.token_mixer.attention_biases_seg'].any()
        # the stale index buffer of the file (all ones) had no effect
        a = model.stages[3].blocks[4].token_mixer
        if bias_mode == 'pretrained':
            assert torch.equal(a.attention_bias((7, 7), (7, 7)),
                               sd['network.6.4.token_mixer.attention_biases'][
                                   :, official_bias_idxs(7)])


def _official_to_timm_key(k):
    """Independent re-statement of timm's efficientformer layout (from the official one)."""
    stem = {'0': 'conv1', '1': 'norm1', '3': 'conv2', '4': 'norm2'}
    m = re.match(r'patch_embed\.(\d)\.(.*)', k)
    if m:
        return f'stem.{stem[m[1]]}.{m[2]}'
    k = k.replace('layer_scale_1', 'ls1.gamma').replace('layer_scale_2', 'ls2.gamma')
    m = re.match(r'network\.(\d+)\.(\d+)\.(.*)', k)
    if m:
        return f'stages.{int(m[1]) // 2}.blocks.{m[2]}.{m[3]}'
    m = re.match(r'network\.(\d+)\.(proj|norm)\.(.*)', k)
    if m:
        return f'stages.{(int(m[1]) + 1) // 2}.downsample.' \
               f'{"conv" if m[2] == "proj" else "norm"}.{m[3]}'
    return k.replace('dist_head.', 'head_dist.')


@pytest.mark.parametrize('variant', ['l1', 'l7'])
def test_timm_layout_gives_same_tensors_as_official(variant):
    pack = load_pack('efficientformer', variant)
    cls_sd = _random_cls_state_dict(pack, seed=5)
    timm_sd = {_official_to_timm_key(k): v for k, v in cls_sd.items()}
    manifest = {k: tuple(s) for k, s, _ in pack['timm_manifest']}
    assert {k: tuple(v.shape) for k, v in timm_sd.items()} == manifest
    for bias_mode in ('official', 'pretrained'):
        official = EfficientFormer(variant, bias_mode=bias_mode)
        rep_off = load_pretrained(official, cls_sd)
        timm_model = EfficientFormer(variant, bias_mode=bias_mode)
        rep = load_pretrained(timm_model, timm_sd)
        assert rep_off['layout'] == 'official' and rep['layout'] == 'timm'
        assert not rep['missing'] and not rep['unexpected']
        assert sorted(rep['new']) == sorted(rep_off['new'])
        timm_state = timm_model.state_dict()
        for k, v in official.state_dict().items():
            if k not in rep['new']:
                assert torch.equal(timm_state[k], v), k


def test_dense_checkpoint_in_pretrained_mode_is_refused():
    """Same policy as V2 (checkpoint.reject_dense_tables): the dense weights were trained with
    the _seg tables, the ImageNet tables of the file are unused placeholders."""
    pack = load_pack('efficientformer', 'l3')
    sd = make_weights().state_dict_from_pack(pack)
    model = EfficientFormer('l3', bias_mode='pretrained')
    with pytest.raises(CheckpointError, match=r"4 x attention_biases_seg.*bias_mode='official'"):
        load_pretrained(model, sd)
    # an mmdet detector file: the backbone part is used
    det = {'backbone.' + k: v for k, v in sd.items()}
    det['neck.lateral_convs.0.conv.weight'] = torch.zeros(256, 64, 1, 1)
    rep = load_pretrained(EfficientFormer('l3'), {'state_dict': det})
    assert rep['layout'] == 'official' and not rep['new'] and not rep['missing']
    # and our own (native) official-mode checkpoint round-trips
    off = EfficientFormer('l3')
    load_pretrained(off, sd)
    rep = load_pretrained(EfficientFormer('l3'), off.state_dict())
    assert rep['layout'] == 'native' and not rep['new'] and not rep['ignored']


def test_partial_checkpoint_is_an_error_unless_not_strict(tmp_path):
    pack = load_pack('efficientformer', 'l1')
    sd = {k: v for k, v in _random_cls_state_dict(pack).items()
          if not k.startswith('network.6.4.')}
    path = tmp_path / 'partial.pth'
    torch.save({'model': sd}, path)
    with pytest.raises(CheckpointError, match='would stay random'):
        EfficientFormer('l1', init_cfg=_pretrained(path)).init_weights()
    model = EfficientFormer('l1', init_cfg=_pretrained(path, strict=False))
    model.init_weights()
    torch.testing.assert_close(model.stem.conv1.weight, sd['patch_embed.0.weight'])


def test_registered_in_scope():
    from effbackbones.registry import MODELS
    model = MODELS.build(dict(type='EfficientFormer', arch='l1', bias_mode='pretrained',
                              out_indices=(3,)))
    assert isinstance(model, EfficientFormer) and model.out_channels == (448,)
    assert isinstance(model.stages[3].blocks[4].token_mixer, Attention)
