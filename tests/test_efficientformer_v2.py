"""EfficientFormerV2: parity with the official dense code, both bias modes, contract,
checkpoint layouts, deploy."""
import copy
import itertools
import math
import re

import pytest
import torch
import torch.nn.functional as F

from effbackbones import CheckpointError
from effbackbones.checkpoint import load_pretrained
from effbackbones.models.attention_bias import offset_index
from effbackbones.models.efficientformer_v2 import EfficientFormerV2
from effbackbones.models.layers import LayerScale2d

from conftest import (check_pack_parity, load_pack, make_weights, official_bias_idxs,
                      zero_state_dict)

VARIANTS = ['s0', 's1', 's2', 'l']
WIDTHS = {'s0': (32, 48, 96, 176), 's1': (32, 48, 120, 224), 's2': (32, 64, 144, 288),
          'l': (40, 80, 192, 384)}
DEPTHS = {'s0': (2, 2, 6, 4), 's1': (3, 3, 9, 6), 's2': (4, 4, 12, 8), 'l': (5, 5, 15, 10)}
VIT_NUM = {'s0': 2, 's1': 2, 's2': 4, 'l': 6}


def _pretrained(path, **kw):
    return dict(type='Pretrained', checkpoint=str(path), **kw)


def _pack(variant):
    return load_pack('efficientformerv2', variant)


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


# -------------------------------------------------------------------------------------------
# independent re-statements of the official code (for checks only)
# -------------------------------------------------------------------------------------------
def cls_int_buffers(manifest):
    """The ``attention_bias_idxs`` of a released ImageNet checkpoint (official values)."""
    out = {}
    for k, shape, _ in manifest:
        if k.endswith('attention_bias_idxs'):
            res = math.isqrt(shape[1])
            if shape[0] == shape[1]:
                out[k] = official_bias_idxs(res)
            else:   # Attention4DDownsample: queries on the ceil(res / 2) grid
                res2 = math.ceil(res / 2)
                out[k] = official_bias_idxs(res, res2, math.ceil(res / res2))
    return out


def cls_state_dict(pack, seed=3):
    """Deterministic weights in the released classification layout (official idx buffers)."""
    mw = make_weights()
    return mw.make_state_dict(pack['cls_manifest'], cls_int_buffers(pack['cls_manifest']),
                              seed)


def official_to_timm_key(k):
    """Independent statement of the official -> timm ``efficientformerv2`` key mapping."""
    stem = {'0': 'conv1.conv', '1': 'conv1.bn', '3': 'conv2.conv', '4': 'conv2.bn'}
    m = re.match(r'patch_embed\.(\d)\.(.*)', k)
    if m:
        return f'stem.{stem[m[1]]}.{m[2]}'
    if k.startswith('dist_head.'):
        return 'head_dist.' + k[len('dist_head.'):]
    m = re.match(r'network\.(\d+)\.(\d+)\.(.*)', k)
    if m:
        rest = m[3]
        for a, b in [('mlp.norm1.', 'mlp.fc1.bn.'), ('mlp.fc1.', 'mlp.fc1.conv.'),
                     ('mlp.mid_norm.', 'mlp.mid.bn.'), ('mlp.mid.', 'mlp.mid.conv.'),
                     ('mlp.norm2.', 'mlp.fc2.bn.'), ('mlp.fc2.', 'mlp.fc2.conv.'),
                     ('token_mixer.proj.1.', 'token_mixer.proj.conv.'),
                     ('token_mixer.proj.2.', 'token_mixer.proj.bn.')]:
            if rest.startswith(a):
                rest = b + rest[len(a):]
                break
        rest = re.sub(r'^token_mixer\.(\w+)\.0\.', r'token_mixer.\1.conv.', rest)
        rest = re.sub(r'^token_mixer\.(\w+)\.1\.', r'token_mixer.\1.bn.', rest)
        rest = {'layer_scale_1': 'ls1.gamma', 'layer_scale_2': 'ls2.gamma'}.get(rest, rest)
        return f'stages.{int(m[1]) // 2}.blocks.{m[2]}.{rest}'
    m = re.match(r'network\.(\d+)\.(.*)', k)
    if m:
        rest = m[2]
        rest = re.sub(r'^(proj|conv)\.', 'conv.conv.', rest)
        rest = re.sub(r'^(norm|bn)\.', 'conv.bn.', rest)
        rest = rest.replace('attn.q.local.0.', 'attn.q.local.')
        rest = re.sub(r'^attn\.q\.proj\.0\.', 'attn.q.proj.conv.', rest)
        rest = re.sub(r'^attn\.q\.proj\.1\.', 'attn.q.proj.bn.', rest)
        rest = re.sub(r'^attn\.proj\.1\.', 'attn.proj.conv.', rest)
        rest = re.sub(r'^attn\.proj\.2\.', 'attn.proj.bn.', rest)
        rest = re.sub(r'^attn\.(k|v|v_local)\.0\.', r'attn.\1.conv.', rest)
        rest = re.sub(r'^attn\.(k|v|v_local)\.1\.', r'attn.\1.bn.', rest)
        return f'stages.{(int(m[1]) + 1) // 2}.downsample.{rest}'
    return k


def timm_state_dict(pack, cls_sd):
    """The same tensors in timm's layout (timm keeps no index buffers; gamma is (C,))."""
    out = {}
    for k, v in cls_sd.items():
        if k.endswith('attention_bias_idxs'):
            continue
        tk = official_to_timm_key(k)
        out[tk] = v.reshape(-1) if tk.endswith('.gamma') else v
    timm = {k: tuple(s) for k, s, _ in pack['timm_manifest']}
    assert set(out) == set(timm), set(out) ^ set(timm)
    assert all(tuple(out[k].shape) == s for k, s in timm.items())
    return out


def _cls_attention_key(our_module_name):
    """Our attention module name -> the classification-layout prefix (independent)."""
    m = re.match(r'stages\.(\d)\.blocks\.(\d+)\.token_mixer$', our_module_name)
    if m:
        return f'network.{2 * int(m[1])}.{m[2]}.token_mixer'
    assert our_module_name == 'stages.3.downsample.attn', our_module_name
    return 'network.5.attn'


def _attention_grids(name, h, w):
    """(q_hw, k_hw) of an attention module for an input of h x w."""
    if name.startswith('stages.2.'):        # stride-2 attention on the stride-16 map
        g = (h // 32, w // 32)
        return g, g
    if name.startswith('stages.3.downsample'):
        return (h // 32, w // 32), (h // 16, w // 16)
    g = (h // 32, w // 32)
    return g, g


# -------------------------------------------------------------------------------------------
# parity with the official dense backbone (bias_mode='official')
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize('variant', VARIANTS)
def test_parity_through_init_cfg_and_deploy(variant, tmp_path):
    def loaded(model, pack):
        assert model.bias_mode == 'official' and not model.norm_eval
        # the official count: the dense tables are Parameters, the ImageNet placeholders buffers
        assert _n_params(model) == pack['params_dense']
        names = {n for n, _ in model.named_parameters()}
        assert not any(n.endswith('.attention_biases') for n in names)
        assert sum(n.endswith('.attention_biases_seg') for n in names) == \
            2 * VIT_NUM[variant] + 1
        # our index order equals the official index tables, and the per-axis gather of each
        # dense table equals indexing it with the official buffer
        for k, v in pack['int_buffers'].items():
            if k.endswith('attention_bias_idxs_seg'):
                m = model.get_submodule(official_to_timm_key(k).rsplit('.', 1)[0])
                q_hw = tuple(math.ceil(s / m.q_stride) for s in m.dense_hw)
                assert torch.equal(offset_index(q_hw, m.dense_hw, m.q_stride)[0], v), k
                with torch.no_grad():
                    assert torch.equal(m.dense_bias_matrix(), m.attention_biases_seg[:, v]), k
        with torch.no_grad():
            outs = model(make_weights().input_from_pack(pack))
        assert isinstance(outs, tuple) and len(outs) == 4

    def deployed(model, pack):
        # every BN folded (stem, MLPs, attention projections, downsample), layer scales
        # folded; the talking heads stay; outputs unchanged
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        assert not any(isinstance(m, LayerScale2d) for m in model.modules())

    check_pack_parity(EfficientFormerV2, 'efficientformerv2', variant, tmp_path,
                      on_loaded=loaded, on_deploy=deployed)


@pytest.mark.parametrize('variant', VARIANTS)
def test_param_counts_both_modes(variant):
    pack = _pack(variant)
    model = EfficientFormerV2(variant)
    assert model.out_channels == WIDTHS[variant]
    assert _n_params(model) == pack['params_dense']
    # pretrained mode = classification model without its norm / heads
    c = WIDTHS[variant][-1]
    head = 2 * (1000 * c + 1000) + 2 * c
    assert _n_params(EfficientFormerV2(variant, bias_mode='pretrained')) == \
        pack['params_cls'] - head


def test_stage_layout_and_drop_path_schedule():
    model = EfficientFormerV2('l', drop_path_rate=0.1)
    blocks = [b for s in model.stages for b in s.blocks]
    assert [len(s.blocks) for s in model.stages] == list(DEPTHS['l'])
    # attention in the last vit_num blocks of stages 3 and 4 (stride 2 in stage 3)
    for i, s in enumerate(model.stages):
        with_attn = [b.token_mixer is not None for b in s.blocks]
        n = VIT_NUM['l'] if i >= 2 else 0
        assert with_attn == [False] * (len(s.blocks) - n) + [True] * n
    assert model.stages[2].blocks[-1].token_mixer.stride_conv is not None
    assert model.stages[3].blocks[-1].token_mixer.stride_conv is None
    assert model.stages[3].downsample.attn is not None
    assert model.stages[2].downsample.attn is None
    # expansion ratios of stage 3 (official expansion_ratios_L['2'])
    hidden = [b.mlp.fc1.conv.out_channels // 192 for b in model.stages[2].blocks]
    assert hidden == [4, 4, 4, 4, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4]
    # official schedule: rate * global index / (total - 1)
    rates = [getattr(b.drop_path, 'drop_prob', 0.0) for b in blocks]
    assert rates == pytest.approx([0.1 * i / 34 for i in range(35)])


# -------------------------------------------------------------------------------------------
# bias_mode='pretrained'
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize('variant', ['s0', 'l'])
def test_pretrained_bias_mode_equals_classification_model_at_224(variant):
    pack = _pack(variant)
    sd = cls_state_dict(pack)
    model = EfficientFormerV2(variant, bias_mode='pretrained')
    report = load_pretrained(model, {'model': sd})
    assert report['layout'] == 'official' and not report['new']
    model.eval()
    attns = {n: m for n, m in model.named_modules() if hasattr(m, 'attention_bias')}
    assert len(attns) == 2 * VIT_NUM[variant] + 1
    ref_bias = {}
    for name, m in attns.items():
        cls_prefix = _cls_attention_key(name)
        table = sd[cls_prefix + '.attention_biases']
        idx = sd[cls_prefix + '.attention_bias_idxs']
        ref_bias[name] = table[:, idx]
        with torch.no_grad():
            ours = m.attention_bias(*_attention_grids(name, 224, 224))
        assert torch.equal(ours, ref_bias[name]), name

    # the features with the official classification gather plugged in
    ref_model = copy.deepcopy(model)
    for name, m in ref_model.named_modules():
        if name in ref_bias:
            m.attention_bias = (lambda b: (lambda q_hw, k_hw: b))(ref_bias[name])
    x = make_weights().make_input(7, (1, 3, 224, 224))
    with torch.no_grad():
        outs = model(x)
        ref = ref_model(x)
    for o, r in zip(outs, ref):
        assert torch.equal(o, r)
    # official mode on the same ImageNet weights: dense tables are new (zero) -> other features
    official = EfficientFormerV2(variant)
    load_pretrained(official, {'model': sd})
    official.eval()
    with torch.no_grad():
        off = official(x)
    assert torch.equal(off[0], outs[0]) and torch.equal(off[1], outs[1])
    for j in (2, 3):
        rel = (off[j] - outs[j]).abs().max() / outs[j].abs().max()
        assert rel > 1e-3, (j, rel)


@pytest.mark.parametrize('hw', [(64, 96), (256, 384), (96, 64), (256, 96)])
def test_pretrained_bias_is_cropped_or_resized_offset_table(hw):
    """Off 224 the ImageNet table is brought to the runtime key grid per dimension -- cropped
    where the grid side is <= the table's (learned values exact), resized bicubically where
    larger -- then gathered (64x96: all cropped; 256x384: all resized; 256x96: mixed)."""
    pack = _pack('s0')
    model = EfficientFormerV2('s0', bias_mode='pretrained')
    load_pretrained(model, cls_state_dict(pack, seed=11))
    model.eval()
    h, w = hw
    for name, m in model.named_modules():
        if not hasattr(m, 'attention_bias'):
            continue
        q_hw, k_hw = _attention_grids(name, h, w)
        src = 14 if name.startswith('stages.3.downsample') else 7
        stride = 2 if name.startswith('stages.3.downsample') else 1
        heads = m.attention_biases.shape[0]
        grid = m.attention_biases.detach().reshape(1, heads, src, src)
        # resize the axes whose runtime side is larger (a kept side is sampled at its own
        # positions), then keep offsets 0..side-1 of every axis
        size = (max(k_hw[0], src), max(k_hw[1], src))
        if size != (src, src):
            grid = F.interpolate(grid, size=size, mode='bicubic', align_corners=False)
        grid = grid[0, :, :k_hw[0], :k_hw[1]]
        expect = torch.empty(heads, q_hw[0] * q_hw[1], k_hw[0] * k_hw[1])
        for qi, (qy, qx) in enumerate(itertools.product(range(q_hw[0]), range(q_hw[1]))):
            for ki, (ky, kx) in enumerate(itertools.product(range(k_hw[0]), range(k_hw[1]))):
                expect[:, qi, ki] = grid[:, abs(stride * qy - ky), abs(stride * qx - kx)]
        with torch.no_grad():
            bias = m.attention_bias(q_hw, k_hw)
        torch.testing.assert_close(bias, expect, rtol=0, atol=0)
        if k_hw[0] <= src and k_hw[1] <= src:      # cropped: exactly the learned table values
            flat = m.attention_biases.detach()
            for qi, (qy, qx) in enumerate(itertools.product(range(q_hw[0]), range(q_hw[1]))):
                for ki, (ky, kx) in enumerate(itertools.product(range(k_hw[0]),
                                                                range(k_hw[1]))):
                    off = abs(stride * qy - ky) * src + abs(stride * qx - kx)
                    assert torch.equal(bias[:, qi, ki], flat[:, off])
    outs = model(torch.randn(1, 3, h, w))
    for out, s, c in zip(outs, (4, 8, 16, 32), WIDTHS['s0']):
        assert out.shape == (1, c, h // s, w // s)


def test_pretrained_mode_refuses_dense_checkpoint():
    sd = make_weights().state_dict_from_pack(_pack('s0'))
    model = EfficientFormerV2('s0', bias_mode='pretrained')
    with pytest.raises(CheckpointError, match="bias_mode='official'"):
        load_pretrained(model, {'model': sd})


@pytest.mark.parametrize('variant', VARIANTS)
def test_deploy_parity_pretrained_mode(variant):
    mw = make_weights()
    model = EfficientFormerV2(variant, bias_mode='pretrained')
    load_pretrained(model, cls_state_dict(_pack(variant), seed=5))
    model.eval()
    x = torch.randn(1, 3, 128, 192)
    with torch.no_grad():
        ref = model(x)
    model.switch_to_deploy()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        outs = model(x)
    ok, report = mw.compare_outputs(list(outs), {'outputs': list(ref)})
    assert ok, report


# -------------------------------------------------------------------------------------------
# contract
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize('hw', [(64, 96), (96, 64), (256, 384)])
def test_shapes_non_square(hw):
    model = EfficientFormerV2('s0').eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, *hw))
    assert len(outs) == 4
    for out, s, c in zip(outs, (4, 8, 16, 32), WIDTHS['s0']):
        assert out.shape == (2, c, hw[0] // s, hw[1] // s)
        assert torch.isfinite(out).all()


def test_input_errors():
    model = EfficientFormerV2('s0')
    with pytest.raises(ValueError, match='expects 3 input channels.*got 1'):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match='multiples of 32, got 80x64'):
        model(torch.randn(1, 3, 80, 64))
    with pytest.raises(ValueError, match='multiples of 32, got 64x48'):
        model(torch.randn(1, 3, 64, 48))
    with pytest.raises(ValueError, match='NCHW'):
        model(torch.randn(3, 64, 64))


def test_constructor_errors():
    with pytest.raises(ValueError, match="unknown EfficientFormerV2 arch 'm'"):
        EfficientFormerV2('m')
    with pytest.raises(ValueError, match='bias_mode must be one of'):
        EfficientFormerV2('s0', bias_mode='imagenet')
    with pytest.raises(ValueError, match='lacks keys'):
        EfficientFormerV2(dict(widths=[8, 8, 8, 8], depths=[1, 1, 1, 1]))
    with pytest.raises(ValueError, match='one ratio per block'):
        EfficientFormerV2(dict(widths=[8, 16, 32, 64], depths=[1, 1, 2, 2], vit_num=1,
                               mlp_ratios=[[4], [4], [4], [4, 4]]))
    with pytest.raises(ValueError, match='out index 4'):
        EfficientFormerV2('s0', out_indices=(4,))
    assert EfficientFormerV2('S-0').arch_name == 's0'
    assert EfficientFormerV2('L', out_indices=(3,)).out_channels == (384,)


def test_out_indices_subset():
    model = EfficientFormerV2('s0', out_indices=(1, 3)).eval()
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [48, 176]
    assert model.out_channels == (48, 176)
    model = EfficientFormerV2('s0', out_indices=(0,)).eval()
    assert [o.shape for o in model(torch.randn(1, 3, 64, 64))] == [(1, 32, 16, 16)]


def test_frozen_stages_and_norm_eval():
    model = EfficientFormerV2('s0', frozen_stages=1, norm_eval=True)
    model.train()
    assert all(not p.requires_grad for p in model.stem.parameters())
    assert all(not p.requires_grad for p in model.stages[0].parameters())
    assert all(p.requires_grad for p in model.stages[1].parameters())
    assert all(not m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = model.stages[2].downsample.conv.bn.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, model.stages[2].downsample.conv.bn.running_mean)
    with pytest.raises(ValueError, match='frozen_stages'):
        EfficientFormerV2('s0', frozen_stages=5)


def test_norm_eval_false_is_default_and_updates_bn_stats():
    model = EfficientFormerV2('s0').train()
    assert model.stages[3].downsample.attn.proj.bn.training
    before = model.stages[3].downsample.attn.proj.bn.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert not torch.equal(before, model.stages[3].downsample.attn.proj.bn.running_mean)


@pytest.mark.parametrize('bias_mode', ['official', 'pretrained'])
def test_with_cp_same_values_and_grads(bias_mode):
    torch.manual_seed(0)
    ref = EfficientFormerV2('s0', bias_mode=bias_mode)
    for n, b in ref.named_parameters():    # non-zero bias tables so their grads matter
        if 'attention_biases' in n:
            b.data.normal_()
    cp_model = EfficientFormerV2('s0', bias_mode=bias_mode, with_cp=True)
    cp_model.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 96)
    for m in (ref, cp_model):
        m.train()
        sum(o.sum() for o in m(x)).backward()
    table = 'attention_biases_seg' if bias_mode == 'official' else 'attention_biases'
    grads = dict(ref.named_parameters())
    assert grads[f'stages.3.blocks.3.token_mixer.{table}'].grad.abs().sum() > 0
    for (n, a), (_, b) in zip(ref.named_parameters(), cp_model.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize('bias_mode', ['official', 'pretrained'])
def test_bias_cache_per_input_size(bias_mode):
    model = EfficientFormerV2('s0', bias_mode=bias_mode, bias_cache_size=2)
    for n, b in model.named_parameters():
        if 'attention_biases' in n:
            b.data.normal_()
    attn = model.stages[3].blocks[3].token_mixer
    down = model.stages[3].downsample.attn
    model.eval()
    xa, xb, xc = torch.randn(1, 3, 64, 96), torch.randn(1, 3, 96, 64), torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out_a = model(xa)
        assert len(attn._bias_cache) == 1 and len(down._bias_cache) == 1
        cached = attn.attention_bias((2, 3), (2, 3))
        assert cached is attn.attention_bias((2, 3), (2, 3))     # served from the cache
        out_b = model(xb)
        assert len(attn._bias_cache) == 2
        # every cached entry equals a fresh computation for its size
        for m in (attn, down):
            for q_hw, k_hw, dtype in m._bias_cache.keys():
                bias = m._bias_cache[q_hw, k_hw, dtype]
                assert bias.shape == (8, q_hw[0] * q_hw[1], k_hw[0] * k_hw[1])
                torch.testing.assert_close(bias, m._compute_bias(q_hw, k_hw), rtol=0, atol=0)
        model(xc)                                                # LRU: size a evicted
        assert len(attn._bias_cache) == 2
        assert ((2, 3), (2, 3)) not in [k[:2] for k in attn._bias_cache.keys()]
        # a cold model gives the same outputs for every size
        fresh = copy.deepcopy(model)
        fresh.clear_bias_cache()
        for x, ref in ((xa, out_a), (xb, out_b)):
            for o, r in zip(fresh(x), ref):
                torch.testing.assert_close(o, r, rtol=0, atol=0)
    # cleared by train()/eval(), by load_state_dict and by the loader's hook
    model.train()
    assert len(attn._bias_cache) == 0
    model.eval()
    with torch.no_grad():
        model(xa)
    assert len(attn._bias_cache) == 1
    sd = model.state_dict()
    table = 'attention_biases_seg' if bias_mode == 'official' else 'attention_biases'
    sd[f'stages.3.blocks.3.token_mixer.{table}'] = torch.zeros_like(attn.bias_table())
    model.load_state_dict(sd)
    assert len(attn._bias_cache) == 0
    with torch.no_grad():
        model(xa)
        assert attn.attention_bias((2, 3), (2, 3)).abs().max() == 0   # not the stale bias
    model.after_load_pretrained()
    assert len(attn._bias_cache) == 0 and len(down._bias_cache) == 0
    # eval mode with gradients wanted for the table: computed live, gradient flows
    model(xa)[3].sum().backward()
    assert attn.bias_table().grad is not None
    assert len(attn._bias_cache) == 0


def test_official_mode_imagenet_tables_are_unused_buffers():
    model = EfficientFormerV2('s0')
    attn = model.stages[2].blocks[5].token_mixer
    assert 'attention_biases' in dict(attn.named_buffers())
    assert 'attention_biases' not in dict(attn.named_parameters())
    assert 'stages.2.blocks.5.token_mixer.attention_biases' in model.state_dict()
    assert 'stages.2.blocks.5.token_mixer.attention_bias_idxs_seg' not in model.state_dict()
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        attn.attention_biases.normal_()
        model.clear_bias_cache()
        torch.testing.assert_close(model(x)[3], ref[3], rtol=0, atol=0)


# -------------------------------------------------------------------------------------------
# checkpoints
# -------------------------------------------------------------------------------------------
def _expected_ignored(sd):
    return sorted(k for k in sd if k.endswith('attention_bias_idxs') or
                  k.startswith(('norm.', 'head.', 'dist_head.')))


@pytest.mark.parametrize('wrapper', ['model', 'state_dict', 'raw'])
@pytest.mark.parametrize('prefix', ['', 'module.'])
def test_released_classification_checkpoint_loads(wrapper, prefix, tmp_path):
    pack = _pack('s0')
    sd = cls_state_dict(pack)
    raw = {prefix + k: v for k, v in sd.items()}
    torch.save(raw if wrapper == 'raw' else {wrapper: raw, 'epoch': 449}, tmp_path / 'c.pth')
    model = EfficientFormerV2('s0')
    report = load_pretrained(model, str(tmp_path / 'c.pth'))
    assert report['layout'] == 'official'
    assert not report['missing'] and not report['unexpected'] and not report['mismatched']
    seg = sorted(k for k in model.state_dict() if k.endswith('attention_biases_seg'))
    assert len(seg) == 5 and sorted(report['new']) == seg
    ignored = sorted(official_to_timm_key(k) for k in _expected_ignored(sd))
    assert sorted(report['ignored']) == ignored
    own = model.state_dict()
    for k, v in sd.items():
        tk = official_to_timm_key(k)
        if k.endswith('attention_bias_idxs') or k.startswith(('norm.', 'head', 'dist_head')):
            continue
        assert torch.equal(own[tk], v.reshape(own[tk].shape)), k
    # the dense tables start as the official dense code initialises them
    assert all(own[k].abs().max() == 0 for k in seg)


def test_classification_checkpoint_pretrained_mode_report():
    sd = cls_state_dict(_pack('s1'))
    report = load_pretrained(EfficientFormerV2('s1', bias_mode='pretrained'), sd)
    assert not report['new'] and not report['missing'] and not report['unexpected']
    assert sorted(report['ignored']) == sorted(official_to_timm_key(k)
                                               for k in _expected_ignored(sd))


@pytest.mark.parametrize('bias_mode', ['official', 'pretrained'])
def test_timm_layout_loads_same_tensors(bias_mode):
    pack = _pack('s2')
    cls_sd = cls_state_dict(pack, seed=4)
    a = EfficientFormerV2('s2', bias_mode=bias_mode)
    load_pretrained(a, cls_sd)
    b = EfficientFormerV2('s2', bias_mode=bias_mode)
    rep = load_pretrained(b, timm_state_dict(pack, cls_sd))
    assert rep['layout'] == 'timm' and not rep['missing'] and not rep['unexpected']
    assert sorted(rep['ignored']) == ['head.bias', 'head.weight', 'head_dist.bias',
                                      'head_dist.weight', 'norm.bias', 'norm.num_batches_tracked',
                                      'norm.running_mean', 'norm.running_var', 'norm.weight']
    if bias_mode == 'official':
        assert rep['new'] and all(k.endswith('attention_biases_seg') for k in rep['new'])
    else:
        assert not rep['new']
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_native_round_trip(tmp_path):
    mw = make_weights()
    model = EfficientFormerV2('s0')
    load_pretrained(model, mw.state_dict_from_pack(_pack('s0')))
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'ours.pth')
    again = EfficientFormerV2('s0', init_cfg=_pretrained(tmp_path / 'ours.pth'))
    again.init_weights()
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_partial_checkpoint_is_an_error_unless_not_strict():
    sd = {k: v for k, v in cls_state_dict(_pack('s0')).items()
          if not k.startswith('network.6.')}
    with pytest.raises(CheckpointError, match='would stay random'):
        load_pretrained(EfficientFormerV2('s0'), sd)
    model = EfficientFormerV2('s0')
    load_pretrained(model, sd, strict=False)
    assert torch.equal(model.stem.conv1.conv.weight, sd['patch_embed.0.weight'])


def test_zero_manifest_layouts_convert_completely():
    """Every key of every variant's classification / dense / timm manifest converts."""
    for variant in VARIANTS:
        pack = _pack(variant)
        for mode, manifest in (('official', pack['dense_manifest']),
                               ('official', pack['cls_manifest']),
                               ('pretrained', pack['cls_manifest']),
                               ('official', pack['timm_manifest'])):
            model = EfficientFormerV2(variant, bias_mode=mode)
            converted = model.checkpoint_filter_fn(zero_state_dict(manifest))
            own = model.state_dict()
            unknown = [k for k in converted if k not in own and
                       not re.search(r'attention_bias_idxs|^(norm|head|head_dist)\.', k)]
            assert not unknown, (variant, unknown[:5])
            bad = [k for k in converted if k in own and converted[k].shape != own[k].shape]
            assert not bad, (variant, bad[:5])


def test_syncbn_conversion_keeps_keys_and_outputs():
    """The official V2 detection / segmentation runs train with SyncBN (configs: sync_bn)."""
    model = EfficientFormerV2('s0').eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = model(x)
    sync = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    assert isinstance(sync.stages[3].downsample.attn.proj.bn, torch.nn.SyncBatchNorm)
    assert sync.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        for o, r in zip(sync(x), ref):
            torch.testing.assert_close(o, r, rtol=0, atol=0)
        sync.switch_to_deploy()
        for o, r in zip(sync(x), ref):
            torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-5)
