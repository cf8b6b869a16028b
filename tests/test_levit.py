"""LeViT: parity with the official code at 224, any-size bias tables, checkpoints, contract."""
import pytest
import torch
import torch.nn.functional as F

from effbackbones import CheckpointError
from effbackbones.checkpoint import load_pretrained
from effbackbones.models.attention_bias import (axis_offsets, gather_offset_bias, offset_index,
                                                resize_bias_table, table_for_grid)
from effbackbones.models.levit import LeViT, _BiasAttention

from conftest import check_pack_parity, load_pack, make_weights, zero_state_dict

VARIANTS = ['128s', '128', '192', '256', '384']
CHANNELS = {'128s': (32, 64, 128, 256, 384), '128': (32, 64, 128, 256, 384),
            '192': (48, 96, 192, 288, 384), '256': (64, 128, 256, 384, 512),
            '384': (96, 192, 384, 512, 768)}
ALL = (0, 1, 2, 3, 4)


def _pretrained(path, **kw):
    return dict(type='Pretrained', checkpoint=str(path), **kw)


def _random_like(model, seed=0):
    """A state dict for ``model`` with random BN statistics and 2*N bias tables."""
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    for k, v in sd.items():
        if not v.is_floating_point():
            continue
        if k.endswith('running_var'):
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
        elif 'attention_biases' in k:
            sd[k] = 2 * torch.randn(v.shape, generator=g)
        elif k.endswith('bn.weight'):
            sd[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        else:
            sd[k] = 0.1 * torch.randn(v.shape, generator=g) if v.dim() == 1 else \
                torch.randn(v.shape, generator=g) / v[0].numel() ** 0.5
    return sd


def _model(arch='128s', seed=0, **kw):
    m = LeViT(arch, **kw)
    m.load_state_dict(_random_like(m, seed))
    return m


# -------------------------------------------------------------------------------------------
# parity with the official model (packs made from facebookresearch/LeViT levit.py)
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize('variant', VARIANTS)
def test_parity_through_init_cfg_and_deploy(variant, tmp_path, caplog):
    # the saved file is the official layout, idx buffers and heads included
    sd = make_weights().state_dict_from_pack(load_pack('levit', variant))
    assert any(k.endswith('attention_bias_idxs') for k in sd)

    def loaded(model, pack):
        assert sum(p.numel() for p in model.parameters()) == pack['params_dense']
        assert model.out_channels == CHANNELS[variant]

    def deployed(model, pack):
        # every Conv/Linear + BN pair folded, outputs unchanged
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                       for m in model.modules())

    check_pack_parity(LeViT, 'levit', variant, tmp_path, on_loaded=loaded, on_deploy=deployed,
                      out_indices=ALL)


@pytest.mark.parametrize('impl', ['naive', 'sdpa', 'chunked'])
def test_parity_every_attn_impl(impl, monkeypatch):
    """At 224 too: 'chunked' with small chunks (several row blocks per attention)."""
    monkeypatch.setattr(_BiasAttention, 'chunk_elems', 2 ** 13)
    mw = make_weights()
    pack = load_pack('levit', '128s')
    model = LeViT('128s', out_indices=ALL, attn_impl=impl)
    load_pretrained(model, mw.state_dict_from_pack(pack))
    model.eval()
    with torch.no_grad():
        outs = model(mw.input_from_pack(pack))
    ok, report = mw.compare_outputs(list(outs), pack)
    assert ok, report


@pytest.mark.parametrize('variant', ['128s', '384'])
def test_official_index_tables_are_offset_index(variant):
    """Every official ``attention_bias_idxs`` (224) == our |dy|*W+|dx| index, and our per-axis
    gather == indexing the table with it (so any grid uses the official rule)."""
    pack = load_pack('levit', variant)
    model = LeViT(variant)
    modules = dict(model.named_modules())
    converted = model.checkpoint_filter_fn(make_weights().state_dict_from_pack(pack))
    converted = {k: v for k, v in converted.items() if k.endswith('attention_bias_idxs')}
    assert len(converted) == len(model.attention_bias_modules())
    for key, idx in converted.items():
        m = modules[key[:-len('.attention_bias_idxs')]]
        k_hw = m.table_hw                               # 224: key grid == table grid
        q_hw = tuple((s - 1) // m.q_stride + 1 for s in k_hw)
        ours, table_hw = offset_index(q_hw, k_hw, m.q_stride)
        assert table_hw == k_hw
        assert torch.equal(ours, idx), key
        table = torch.randn(m.attention_biases.shape)
        gathered = gather_offset_bias(table.reshape(-1, *k_hw),
                                      *axis_offsets(q_hw, k_hw, m.q_stride))
        assert torch.equal(gathered, table[:, idx])


@pytest.mark.parametrize('variant', VARIANTS)
def test_param_count_matches_official_without_heads(variant):
    pack = load_pack('levit', variant)
    assert sum(p.numel() for p in LeViT(variant).parameters()) == pack['params_dense']


# -------------------------------------------------------------------------------------------
# any input size
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize('hw', [(512, 512), (800, 1344)])
def test_detection_sizes_shapes_and_finite(hw):
    model = _model('128s', out_indices=ALL).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *hw))
    h, w = hw
    expect = [(h // 4, w // 4), (h // 8, w // 8), (h // 16, w // 16), (h // 32, w // 32),
              (-(-h // 64), -(-w // 64))]
    assert [tuple(o.shape[2:]) for o in outs] == expect
    assert tuple(o.shape[1] for o in outs) == CHANNELS['128s']
    assert all(torch.isfinite(o).all() for o in outs)
    assert all(o.std() > 0.05 for o in outs)     # features, not collapsed


@pytest.mark.parametrize('hw', [(96, 160), (160, 96), (224, 320)])
def test_non_square_shapes(hw):
    model = _model('128s', out_indices=ALL).eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, *hw))
    h, w = hw
    assert [tuple(o.shape[2:]) for o in outs] == [
        (h // 4, w // 4), (h // 8, w // 8), (h // 16, w // 16), (h // 32, w // 32),
        (-(-h // 64), -(-w // 64))]
    assert all(torch.isfinite(o).all() for o in outs)


def test_non_square_subsample_against_explicit_reference():
    """Shrink attention on a 6x10 grid (table 14x14 cropped): queries are the official
    ``[:, ::2, ::2]`` tokens (3x5), bias = table[|dy|*10+|dx|] with queries at stride 2."""
    model = _model('128s', out_indices=(3,)).eval()
    att = model.stages[1].downsample.attn_downsample
    x = torch.randn(2, 60, 128)
    with torch.no_grad():
        out = att(x, (6, 10))
        kv = att.kv(x).view(2, 60, 8, -1)
        k, v = kv[..., :16].transpose(1, 2), kv[..., 16:].transpose(1, 2)
        q = att.q.ln(x.view(2, 6, 10, 128)[:, ::2, ::2].reshape(2, 15, 128))
        q = q.view(2, 15, 8, 16).transpose(1, 2)
        table = att.attention_biases.reshape(8, 14, 14)[:, :6, :10].reshape(8, -1)
        idx = torch.tensor([[abs(2 * qy - ky) * 10 + abs(2 * qx - kx)
                             for ky in range(6) for kx in range(10)]
                            for qy in range(3) for qx in range(5)])
        attn = (q @ k.transpose(-2, -1) * 16 ** -0.5 + table[:, idx]).softmax(-1)
        ref = att.proj((attn @ v).transpose(1, 2).reshape(2, 15, -1))
    assert out.shape == (2, 15, 256)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_input_size_errors():
    model = LeViT('128s')
    with pytest.raises(ValueError, match='multiples of 32'):
        model(torch.randn(1, 3, 224, 200))
    with pytest.raises(ValueError, match='expects 3 input channels'):
        model(torch.randn(1, 1, 224, 224))


# -------------------------------------------------------------------------------------------
# bias tables for the runtime grid
# -------------------------------------------------------------------------------------------
def test_bias_table_same_size_is_identity():
    table = torch.randn(4, 196)
    assert resize_bias_table(table, (14, 14), (14, 14)) is table
    assert torch.equal(table_for_grid(table, (14, 14), (14, 14)),
                       table.reshape(4, 14, 14))


def test_bias_table_smaller_grid_is_exact_crop():
    table = torch.randn(4, 196)
    out = table_for_grid(table, (14, 14), (9, 5))
    assert torch.equal(out, table.reshape(4, 14, 14)[:, :9, :5])


def test_bias_table_larger_grid_is_bicubic_resize():
    table = torch.randn(3, 49)
    out = table_for_grid(table, (7, 7), (25, 42))
    ref = F.interpolate(table.reshape(1, 3, 7, 7), size=(25, 42), mode='bicubic',
                        align_corners=False)[0]
    assert out.shape == (3, 25, 42)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # a constant table stays constant; a smooth one keeps its zero-offset value
    const = table_for_grid(torch.full((2, 196), 1.5), (14, 14), (50, 84))
    torch.testing.assert_close(const, torch.full_like(const, 1.5))
    dy, dx = torch.meshgrid(torch.arange(14.), torch.arange(14.), indexing='ij')
    smooth = (-0.1 * (dy ** 2 + dx ** 2) ** 0.5).exp().reshape(1, -1)
    big = table_for_grid(smooth, (14, 14), (50, 84))
    span = (smooth.max() - smooth.min()).item()
    # zero offset and far corner keep their values within 5% of the table's range (bicubic
    # with align_corners=False samples half a cell inside and overshoots slightly at the peak)
    assert abs(big[0, 0, 0] - smooth[0, 0]).item() < 0.05 * span
    assert abs(big[0, -1, -1] - smooth[0, -1]).item() < 0.05 * span
    # and it stays monotone along each axis like the table
    assert (big[0, 1:, 0] <= big[0, :-1, 0] + 1e-6).all()


def test_bias_table_mixed_grid_resizes_one_side_and_crops_the_other():
    """Runtime 20x10 on a 14x14 table: dy resized (14 -> 20), dx cropped (exact values)."""
    g = torch.randn(2, 1, 14)                           # varies along dx only
    table = g.expand(2, 14, 14).reshape(2, -1)
    out = table_for_grid(table, (14, 14), (20, 10))
    assert out.shape == (2, 20, 10)
    torch.testing.assert_close(out, g[:, :, :10].expand(2, 20, 10), rtol=0, atol=1e-6)
    g = torch.randn(2, 14, 1)                           # varies along dy only
    out = table_for_grid(g.expand(2, 14, 14).reshape(2, -1), (14, 14), (10, 20))
    torch.testing.assert_close(out, g[:, :10].expand(2, 10, 20), rtol=0, atol=1e-6)


def test_runtime_bias_equals_spec_definition():
    """At 320x448 (stage-1 grid 20x28 > 14x14) each block's bias = bicubic-resized table
    indexed at |dy|*W+|dx| (subsample queries at stride 2)."""
    model = _model('128s', out_indices=(3,)).eval()
    cases = [(model.stages[0].blocks[0].attn, (20, 28), (20, 28)),
             (model.stages[1].downsample.attn_downsample, (10, 14), (20, 28)),
             (model.stages[1].blocks[2].attn, (10, 14), (10, 14))]
    for att, q_hw, k_hw in cases:
        r = att.table_hw[0]
        full = F.interpolate(att.attention_biases.detach().reshape(1, -1, r, r), size=k_hw,
                             mode='bicubic', align_corners=False)[0].flatten(1)
        idx, _ = offset_index(q_hw, k_hw, att.q_stride)
        with torch.no_grad():
            torch.testing.assert_close(att.attention_bias(q_hw, k_hw, torch.float32), full[:, idx],
                                       rtol=0, atol=0)


@pytest.mark.parametrize('impl', ['chunked', 'sdpa'])
def test_bias_cache_per_size_cleared_on_train_and_load(impl):
    model = _model('128s', out_indices=(2,), attn_impl=impl)
    att = model.stages[0].blocks[0].attn
    # chunked caches only the (heads, H, W) offset table, sdpa the (heads, Nq, Nk) bias too
    cache = att._table_cache if impl == 'chunked' else att._bias_cache

    def key_grid(key):                                  # key grid of a cache entry
        return key if impl == 'chunked' else key[1]

    x = torch.randn(1, 3, 256, 256)
    model.train()
    model(x)
    assert not len(att._table_cache) and not len(att._bias_cache)   # never cached in training
    model.eval()
    with torch.no_grad():
        first = model(x)[0]
        (key,) = cache.keys()
        assert key_grid(key) == (16, 16)
        value = cache[key]
        if impl == 'chunked':
            assert not len(att._bias_cache)
        model(x)
        assert cache[key] is value                      # reused for the same size
        model(torch.randn(1, 3, 320, 256))              # another size replaces it (one entry)
        (key,) = cache.keys()
        assert key_grid(key) == (20, 16)
    model.train()
    assert not len(cache)
    # loading new weights in eval mode: the loader hook drops the gathered biases
    model.eval()
    with torch.no_grad():
        model(x)
    assert len(cache)
    other = _random_like(model, seed=7)
    load_pretrained(model, other)
    assert not any(len(m._bias_cache) or len(m._table_cache)
                   for m in model.attention_bias_modules())
    fresh = LeViT('128s', out_indices=(2,), attn_impl=impl)
    fresh.load_state_dict(other)
    fresh.eval()
    with torch.no_grad():
        new, ref = model(x)[0], fresh(x)[0]
    torch.testing.assert_close(new, ref)
    assert not torch.allclose(new, first)
    # even a plain in-place edit of a table is noticed (tensor version in the cache stamp)
    with torch.no_grad():
        att.attention_biases.add_(1.0)
        fresh.stages[0].blocks[0].attn.attention_biases.add_(1.0)
        moved = model(x)[0]
        torch.testing.assert_close(moved, fresh(x)[0])
    assert not torch.allclose(moved, new)


@pytest.mark.parametrize('impl', ['chunked', 'sdpa'])
def test_cache_follows_dtype_changes(impl):
    model = _model('128s', out_indices=(3,), attn_impl=impl).eval()
    x = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        ref = model(x)[0]
        model.double()
        out = model(x.double())[0]
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), ref, rtol=1e-4, atol=1e-4)


def test_grads_reach_bias_tables_at_large_grid():
    model = _model('128s', out_indices=(3,)).train()
    model(torch.randn(1, 3, 320, 448))[0].square().mean().backward()
    for m in list(model.stages[0].modules()) + list(model.stages[1].modules()):
        if isinstance(m, _BiasAttention):
            assert m.attention_biases.grad is not None and m.attention_biases.grad.abs().sum() > 0


# -------------------------------------------------------------------------------------------
# attention implementations, with_cp, drop path, freezing
# -------------------------------------------------------------------------------------------
def _assert_rel_close(a, b, tol, msg=''):
    """``max|a - b| <= tol * max|b|`` (gradients summed over many terms: relative to scale)."""
    err = (a - b).abs().max().item()
    assert err <= tol * b.abs().max().item() + 1e-12, f'{msg}: {err} vs max {b.abs().max()}'


def _loss(outs):
    return sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs)


def test_attn_impls_agree_values_and_grads(monkeypatch):
    # tiny chunks so 'chunked' really splits every attention into several row blocks
    monkeypatch.setattr(_BiasAttention, 'chunk_elems', 2 ** 12)
    sd = _random_like(LeViT('128s', out_indices=ALL))
    x = torch.randn(2, 3, 192, 256)
    res = {}
    for impl in ('naive', 'sdpa', 'chunked'):
        m = LeViT('128s', out_indices=ALL, attn_impl=impl)
        m.load_state_dict(sd)
        m.train()
        outs = m(x)
        _loss(outs).backward()
        m.eval()
        with torch.no_grad():
            res[impl] = (outs, {n: p.grad for n, p in m.named_parameters()}, m(x))
    ref = res['naive']
    for impl in ('sdpa', 'chunked'):
        outs, grads, ev = res[impl]
        for a, b in zip(outs + ev, ref[0] + ref[2]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        for n, g in grads.items():
            _assert_rel_close(g, ref[1][n], 1e-4, f'{impl} {n}')
    with pytest.raises(ValueError, match='attn_impl'):
        LeViT('128s', attn_impl='flash')


@pytest.mark.parametrize('impl', ['sdpa', 'chunked'])
def test_with_cp_same_grads_and_bn_stats(impl, monkeypatch):
    monkeypatch.setattr(_BiasAttention, 'chunk_elems', 2 ** 12)
    sd = _random_like(LeViT('128s', out_indices=ALL))
    x = torch.randn(2, 3, 128, 192)
    models = []
    for with_cp in (False, True):
        m = LeViT('128s', out_indices=ALL, with_cp=with_cp, attn_impl=impl)
        m.load_state_dict(sd)
        m.train()
        _loss(m(x)).backward()
        models.append(m)
    ref, cp_model = models
    for (n, a), (_, b) in zip(ref.named_parameters(), cp_model.named_parameters()):
        _assert_rel_close(b.grad, a.grad, 1e-4, n)
    # the recompute does not update BatchNorm statistics a second time
    for (n, a), (_, b) in zip(ref.named_buffers(), cp_model.named_buffers()):
        torch.testing.assert_close(b, a, msg=n)


def test_drop_path_follows_official_residual():
    model = _model('128s', out_indices=(3,), drop_path_rate=0.3)
    rates = {b.drop_path for s in model.stages for b in s.blocks}
    rates.add(model.stages[1].downsample.drop_path)
    assert rates == {0.3}                         # one rate everywhere, as the official code
    x = torch.randn(4, 3, 64, 64)
    model.eval()
    torch.testing.assert_close(model(x)[0], model(x)[0])
    model.train()
    torch.manual_seed(1)
    a = model(x)[0]
    torch.manual_seed(2)
    b = model(x)[0]
    assert not torch.allclose(a, b)


def test_frozen_stages_and_norm_eval():
    model = LeViT('128s', out_indices=ALL, frozen_stages=3, norm_eval=True)
    model.train()
    for m in (model.stem.conv1, model.stem.conv2, model.stem.conv3, model.stem.conv4,
              model.stages[0]):
        assert not any(p.requires_grad for p in m.parameters())
    assert all(p.requires_grad for p in model.stages[1].parameters())
    assert all(not m.training for m in model.modules()
               if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    before = model.stages[1].blocks[0].mlp.ln1.bn.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, model.stages[1].blocks[0].mlp.ln1.bn.running_mean)
    # frozen_stages=0: only stem.conv1; without norm_eval the rest updates its statistics
    model = LeViT('128s', frozen_stages=0).train()
    assert not any(p.requires_grad for p in model.stem.conv1.parameters())
    assert all(p.requires_grad for p in model.stem.conv2.parameters())
    before = model.stem.conv2.bn.running_mean.clone()
    frozen = model.stem.conv1.bn.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert not torch.equal(before, model.stem.conv2.bn.running_mean)
    assert torch.equal(frozen, model.stem.conv1.bn.running_mean)
    with pytest.raises(ValueError, match='frozen_stages'):
        LeViT('128s', frozen_stages=6)


def test_out_indices_including_stride_64():
    model = _model('128s', out_indices=(4,)).eval()
    (out,) = model(torch.randn(1, 3, 256, 320))
    assert out.shape == (1, 384, 4, 5)
    assert model.out_channels == (384,)
    model = _model('192', out_indices=(1, 4)).eval()
    outs = model(torch.randn(1, 3, 128, 128))
    assert [tuple(o.shape) for o in outs] == [(1, 96, 16, 16), (1, 384, 2, 2)]
    assert LeViT('128s').strides == (4, 8, 16, 32, 64)
    assert LeViT('128s').out_indices == (0, 1, 2, 3)
    with pytest.raises(ValueError, match='out index 5'):
        LeViT('128s', out_indices=(5,))


def test_arch_names_and_errors():
    assert LeViT('LeViT-128S').arch_name == '128s'
    assert LeViT('levit_256').arch_name == '256'
    with pytest.raises(ValueError, match="unknown LeViT arch '512'"):
        LeViT('512')
    with pytest.raises(ValueError, match='lacks keys'):
        LeViT(dict(embed_dims=(64, 128, 192)))


def test_registry_builds_it():
    from effbackbones.registry import MODELS
    m = MODELS.build(dict(type='LeViT', arch='128', out_indices=(1, 2)))
    assert isinstance(m, LeViT) and m.out_channels == (64, 128)


# -------------------------------------------------------------------------------------------
# checkpoints
# -------------------------------------------------------------------------------------------
def _cls_state_dict(pack, seed=3):
    """Random floats in the released ImageNet layout (official index buffers kept as stored)."""
    g = torch.Generator().manual_seed(seed)
    sd = zero_state_dict(pack['cls_manifest'])
    for k, v in sd.items():
        if v.is_floating_point():
            sd[k] = torch.randn(v.shape, generator=g)
        elif k.endswith('attention_bias_idxs'):
            sd[k] = pack['int_buffers'][k]
    return sd


def _timm_state_dict(pack, cls_sd, conv=False):
    """The same tensors in timm's layout: timm's ``checkpoint_filter_fn`` drops the index
    buffers and zips the rest with its own state dict by position; ``levit_conv_*`` stores the
    token Linear layers as 1x1 convs."""
    official = [(k, v) for k, v in cls_sd.items() if 'attention_bias_idxs' not in k]
    timm_keys = pack['timm_manifest']
    assert len(official) == len(timm_keys)
    out = {}
    for (ko, v), (kt, shape, _) in zip(official, timm_keys):
        assert list(v.shape) == list(shape), (ko, kt)
        if conv and kt.startswith('stages.') and kt.endswith('.linear.weight'):
            v = v[:, :, None, None]
        out[kt] = v
    return out


def _check_matches_official(model, cls_sd):
    own = model.state_dict()
    torch.testing.assert_close(own['stem.conv4.c.weight'], cls_sd['patch_embed.6.c.weight'])
    torch.testing.assert_close(own['stages.0.blocks.1.attn.attention_biases'],
                               cls_sd['blocks.2.m.attention_biases'])
    torch.testing.assert_close(own['stages.0.blocks.1.mlp.ln2.bn.running_var'],
                               cls_sd['blocks.3.m.2.bn.running_var'])
    torch.testing.assert_close(own['stages.1.downsample.attn_downsample.q.ln.c.weight'],
                               cls_sd['blocks.4.q.1.c.weight'])
    torch.testing.assert_close(own['stages.1.downsample.mlp.ln1.c.weight'],
                               cls_sd['blocks.5.m.0.c.weight'])
    torch.testing.assert_close(own['stages.2.blocks.3.attn.proj.ln.bn.bias'],
                               cls_sd['blocks.20.m.proj.1.bn.bias'])


@pytest.mark.parametrize('wrapper,prefix', [('model', ''), ('raw', ''), ('model', 'module.'),
                                            ('state_dict', 'module.')])
def test_official_release_layout_loads(wrapper, prefix, tmp_path):
    pack = load_pack('levit', '128s')
    sd = _cls_state_dict(pack)
    obj = {prefix + k: v for k, v in sd.items()}
    obj = obj if wrapper == 'raw' else {wrapper: obj, 'epoch': 999}
    path = tmp_path / 'LeViT-128S.pth'
    torch.save(obj, path)
    model = LeViT('128s')
    report = load_pretrained(model, str(path))
    assert report['layout'] == 'official'
    assert not report['missing'] and not report['unexpected'] and not report['new']
    ignored = report['ignored']
    assert sum(k.endswith('attention_bias_idxs') for k in ignored) == 11   # stale, ignored
    assert {k.split('.')[0] for k in ignored if 'idxs' not in k} == {'head', 'head_dist'}
    assert len(report['matched']) == len(model.state_dict())
    _check_matches_official(model, sd)


@pytest.mark.parametrize('conv', [False, True])
def test_timm_layouts_load_same_values(conv):
    pack = load_pack('levit', '128s')
    cls_sd = _cls_state_dict(pack, seed=5)
    timm_sd = _timm_state_dict(pack, cls_sd, conv=conv)
    assert ('stem.conv1.linear.weight' in timm_sd and
            timm_sd['stages.0.blocks.0.attn.qkv.linear.weight'].dim() == (4 if conv else 2))
    official = LeViT('128s')
    load_pretrained(official, cls_sd)
    model = LeViT('128s')
    report = load_pretrained(model, timm_sd)
    assert report['layout'] == ('timm_conv' if conv else 'timm')
    assert not report['missing'] and not report['unexpected'] and not report['new']
    assert {k.split('.')[0] for k in report['ignored']} == {'head', 'head_dist'}
    for k, v in official.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, msg=k)
    _check_matches_official(model, cls_sd)


def test_timm_layout_parity_at_224():
    """Pack weights converted to the timm layout give the official outputs."""
    mw = make_weights()
    pack = load_pack('levit', '192')
    sd = mw.state_dict_from_pack(pack)
    model = LeViT('192', out_indices=ALL)
    load_pretrained(model, _timm_state_dict(pack, sd, conv=True))
    model.eval()
    with torch.no_grad():
        outs = model(mw.input_from_pack(pack))
    ok, report = mw.compare_outputs(list(outs), pack)
    assert ok, report


def test_wrong_variant_in_timm_layout_is_a_shape_error(tmp_path):
    # (the official layout, unrelated and corrupt files: tests/test_contract.py)
    pack = load_pack('levit', '256')
    timm_path = tmp_path / 'levit_256.pth'
    torch.save(_timm_state_dict(pack, _cls_state_dict(pack)), timm_path)
    with pytest.raises(CheckpointError, match='other shapes'):
        LeViT('192', init_cfg=_pretrained(timm_path)).init_weights()


def test_partial_checkpoint_needs_strict_false(tmp_path):
    pack = load_pack('levit', '128s')
    sd = {k: v for k, v in _cls_state_dict(pack).items() if not k.startswith('blocks.2')}
    path = tmp_path / 'partial.pth'
    torch.save({'model': sd}, path)
    with pytest.raises(CheckpointError, match='would stay random'):
        LeViT('128s', init_cfg=_pretrained(path)).init_weights()
    model = LeViT('128s', init_cfg=_pretrained(path, strict=False))
    model.init_weights()
    torch.testing.assert_close(model.stem.conv1.c.weight, sd['patch_embed.0.c.weight'])
