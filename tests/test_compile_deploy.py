"""Every family's forward is one graph for ``torch.compile`` (no graph break, no recompile), and
``switch_to_deploy`` folds once, pins the attention biases of a fixed input size and keeps the
outputs."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import effbackbones  # noqa: F401
from effbackbones.models.attention_bias import RelPosBiasAttention
from effbackbones.registry import MODELS

# one small variant per family; (64, 96) keeps every grid non-square
CASES = [('SwiftFormer', 'xs'), ('EfficientFormer', 'l1'), ('EfficientFormerV2', 's0'),
         ('LeViT', '128s'), ('MobileFormer', '26m')]
SIZE = (64, 96)


def _model(family, arch, **kw):
    torch.manual_seed(0)
    model = MODELS.get(family)(arch, **kw)
    model.init_weights()
    # non-trivial BN statistics and biases, so folding and pinning have something to get wrong
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, RelPosBiasAttention):
                m.bias_table().normal_()
    return model.eval()


def _assert_close(outs, refs, rel=1e-5):
    assert len(outs) == len(refs)
    for o, r in zip(outs, refs):
        assert o.shape == r.shape
        err = (o - r).abs().max() / r.abs().max().clamp_min(1e-12)
        assert err < rel, float(err)


def _compile_twice(model, x):
    """Compile with fullgraph (a graph break raises) and call twice with recompiles turned into
    errors: state a forward mutates (caches, flags) would show up as a recompile."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend='eager', fullgraph=True)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        first = compiled(x)
        second = compiled(x)
    torch._dynamo.reset()
    return first, second


@pytest.mark.parametrize('family,arch', CASES)
def test_forward_is_one_graph_without_recompiles(family, arch):
    model = _model(family, arch)
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        ref = model(x)
        cached = model(x)        # eval caches are warm now: the compiled forward must not read them
    first, second = _compile_twice(model, x)
    _assert_close(first, ref)
    _assert_close(second, ref)
    _assert_close(cached, ref)


@pytest.mark.parametrize('family,arch', CASES)
def test_deployed_with_pinned_biases_is_one_graph(family, arch):
    """The deployed forms (pinned biases; SwiftFormer's and Mobile-Former's channels-first
    attentions) are one graph as well, with the eager model's outputs."""
    model = _model(family, arch)
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        ref = model(x)
    model.switch_to_deploy(input_size=SIZE)
    first, second = _compile_twice(model, x)
    _assert_close(first, ref, rel=1e-4)
    _assert_close(second, ref, rel=1e-4)


def test_second_switch_to_deploy_warns_and_changes_nothing():
    model = _model('EfficientFormerV2', 's0').switch_to_deploy()
    assert model.deploy
    before = copy.deepcopy(model.state_dict())
    kinds = [type(m) for m in model.modules()]
    with pytest.warns(UserWarning, match='already in deploy form'):
        assert model.switch_to_deploy() is model
    assert [type(m) for m in model.modules()] == kinds
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def _not_foldable(family, model, name):
    """What deploy keeps on purpose: SwiftFormer's output BNs (after a residual sum: nothing to
    fold into) and EfficientFormer's Meta4D ``ls1`` (it scales ``pool(x) - x``, no weights)."""
    parent = model.get_submodule(name.rpartition('.')[0])
    return ((family == 'SwiftFormer' and name.startswith('out_norms.'))
            or (family == 'EfficientFormer' and type(parent).__name__ == 'Meta4D'
                and name.endswith('.ls1')))


@pytest.mark.parametrize('family,arch', CASES)
def test_deploy_folds_every_batchnorm_and_layer_scale(family, arch):
    from effbackbones.models.layers import DropPath, LayerScale
    model = _model(family, arch, drop_path_rate=0.1)
    noops = (nn.Dropout, DropPath)
    assert family == 'LeViT' or any(isinstance(m, noops) for m in model.modules())
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        ref = model(x)
        model.switch_to_deploy()
        outs = model(x)
    left = [n for n, m in model.named_modules()
            if (isinstance(m, (nn.modules.batchnorm._BatchNorm, LayerScale) + noops)
                and not _not_foldable(family, model, n)) or type(m) is nn.GroupNorm]
    assert not left, left[:5]
    _assert_close(outs, ref, rel=1e-4)


@pytest.mark.parametrize('bias_mode', ['official', 'pretrained'])
def test_pinned_biases_are_graph_constants(bias_mode):
    """Traced (what ``torch.onnx.export(dynamo=False)`` records) at the pinned size, the graph
    has no bicubic resize and no gather of the tables left; without pinning it has."""
    model = _model('EfficientFormer', 'l1', bias_mode=bias_mode)
    x = torch.randn(1, 3, 128, 192)     # 4x6 grid at stride 32: larger than nothing, resized
    with torch.no_grad():
        ref = model(x)
        model(x)                        # a warm eval cache must not leak into the trace

    def traced_ops(m):
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            graph = torch.jit.trace(m, x, check_trace=False).inlined_graph
        return {n.kind() for n in graph.nodes()}

    deployed = copy.deepcopy(model).switch_to_deploy()
    resize = 'aten::upsample_bicubic2d'
    assert resize in traced_ops(deployed) or bias_mode == 'pretrained'
    assert 'aten::index' in traced_ops(deployed)
    with pytest.warns(UserWarning, match='already in deploy form'):
        deployed.switch_to_deploy(input_size=(128, 192))   # pins all the same
    attns = [m for m in deployed.modules() if isinstance(m, RelPosBiasAttention)]
    assert attns and all(m.pinned_bias is not None for m in attns)
    ops = traced_ops(deployed)
    assert resize not in ops and 'aten::index' not in ops
    with torch.no_grad():
        _assert_close(deployed(x), ref, rel=1e-4)


def test_pinning_keeps_state_dict_and_is_dropped_by_loading():
    model = _model('LeViT', '128s', attn_impl='sdpa', out_indices=(0, 1, 2, 3, 4))
    keys = list(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    model.pin_attention_biases((64, 64))
    attns = model.attention_bias_modules()
    assert all(m.pinned_bias is not None for m in attns)
    assert list(model.state_dict()) == keys           # non-persistent: checkpoints unchanged
    with torch.no_grad():
        _assert_close(model(x), ref)
        other = model(torch.randn(1, 3, 96, 64))       # another size computes its own bias
    assert other[3].shape[2:] == (3, 2)
    model.eval()                                       # eval() / train() keep the pin
    assert all(m.pinned_bias is not None for m in attns)
    # a new table: the pin would be stale, so loading drops it
    sd = model.state_dict()
    sd['stages.0.blocks.0.attn.attention_biases'] += 1.0
    model.load_state_dict(sd)
    assert all(m.pinned_bias is None for m in attns)
    with torch.no_grad():
        changed = model(x)
    assert not torch.allclose(changed[2], ref[2])


def test_pinned_bias_is_ignored_when_the_table_needs_gradients():
    model = _model('EfficientFormer', 'l1')
    x = torch.randn(1, 3, 64, 96)
    model.pin_attention_biases((64, 96))
    attn = model.stages[3].blocks[4].token_mixer
    assert attn.pinned_bias is not None
    model.train()
    outs = model(x)     # (a plain sum of GroupNorm outputs would not depend on the input)
    sum((o * torch.randn_like(o)).sum() for o in outs).backward()
    assert attn.attention_biases_seg.grad is not None
    assert attn.attention_biases_seg.grad.abs().sum() > 0


# v1 / V2 pin biases (official and pretrained mode), LeViT sdpa biases, LeViT chunked tables
PIN_CASES = [('EfficientFormer', 'l1', dict(bias_mode='pretrained')),
             ('EfficientFormerV2', 's0', {}), ('LeViT', '128s', dict(attn_impl='sdpa')),
             ('LeViT', '128s', {})]


def _unpinned_copy(model):
    fresh = copy.deepcopy(model)
    for m in fresh.attention_bias_modules():
        m.drop_pinned_bias()
    return fresh


@pytest.mark.parametrize('family,arch,kw', PIN_CASES)
def test_pinned_bias_follows_in_place_table_edits(family, arch, kw):
    """A table edited in place after pinning (an optimiser step, a manual edit) is what the
    output uses, also when the model is converted to another dtype afterwards."""
    model = _model(family, arch, **kw)
    x = torch.randn(1, 3, 64, 64)
    model.pin_attention_biases((64, 64))
    attns = [m for m in model.attention_bias_modules() if m.pinned_bias is not None]
    assert attns       # (LeViT's attentions after the last out_indices do not run: no pin)
    with torch.no_grad():
        pinned = model(x)
        for m in attns:
            m.bias_table().mul_(-3.0).add_(1.0)
        edited = model(x)
        _assert_close(edited, _unpinned_copy(model)(x))
        assert not torch.allclose(edited[-1], pinned[-1])
        assert all(m.pinned_bias is not None for m in attns)     # pinned again, not dropped
        for m in attns:
            m.bias_table().add_(2.0)
        model.double()                      # a stale pin stays stale through the conversion
        _assert_close(model(x.double()), _unpinned_copy(model)(x.double()))


@pytest.mark.parametrize('family,arch,kw', PIN_CASES)
def test_pinned_bias_is_converted_not_recomputed_for_another_dtype(family, arch, kw,
                                                                   monkeypatch):
    model = _model(family, arch, **kw)
    x = torch.randn(1, 3, 64, 64)
    model.pin_attention_biases((64, 64))
    with torch.no_grad():
        ref = model(x)
    from effbackbones.models import attention_bias
    computed = []      # what computes a bias or an offset table from the table
    compute_bias, table_for_grid = RelPosBiasAttention._compute_bias, attention_bias.table_for_grid
    monkeypatch.setattr(RelPosBiasAttention, '_compute_bias',
                        lambda self, *a: computed.append(a) or compute_bias(self, *a))
    monkeypatch.setattr(attention_bias, 'table_for_grid',
                        lambda *a: computed.append(a) or table_for_grid(*a))
    model.double()
    assert all(m.pinned_bias.dtype == torch.float64 for m in model.attention_bias_modules()
               if m.pinned_bias is not None)
    with torch.no_grad():
        outs = model(x.double())
    assert not computed
    _assert_close(outs, ref)


@pytest.mark.parametrize('bad', [(64,), (64, 0), (64.0, 64), 'big'])
def test_pin_input_size_is_checked(bad):
    with pytest.raises(ValueError, match='input_size'):
        _model('LeViT', '128s').pin_attention_biases(bad)


def test_with_cp_reaches_every_stage():
    from effbackbones.models.base import BlockStage
    model = MODELS.get('SwiftFormer')('xs', with_cp=True)
    stages = [m for m in model.modules() if isinstance(m, BlockStage)]
    assert len(stages) == 4 and all(s.with_cp for s in stages)
    model.with_cp = False
    assert not any(s.with_cp for s in stages)


@pytest.mark.parametrize('groups,shape', [(1, (2, 6, 5, 7)), (3, (1, 6, 4, 9)), (2, (2, 4, 11))])
def test_exportable_group_norm_equals_group_norm(groups, shape):
    from effbackbones.models.layers import ExportableGroupNorm, exportable_group_norms_
    gn = nn.GroupNorm(groups, shape[1])
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5)
        gn.bias.uniform_(-1, 1)
    holder = nn.Sequential(gn)
    exportable_group_norms_(holder)
    assert type(holder[0]) is ExportableGroupNorm
    assert holder[0].state_dict().keys() == gn.state_dict().keys()
    x = torch.randn(shape) * 3 + 5           # a mean large against the spread
    with torch.no_grad():
        torch.testing.assert_close(holder[0](x), gn(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# the folds themselves, against the layers they replace. float64 and small running variances
# (~1e-4, as trained BNs after a ReLU often have): a fold that drops ``eps`` (1e-5, a tenth of
# the variance) or the layer's own bias is off by far more than the tolerance.
# --------------------------------------------------------------------------------------------
def _trained_bn(bn, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        n = bn.num_features
        bn.running_mean.copy_(torch.randn(n, generator=g, dtype=torch.float64) * 0.1)
        bn.running_var.copy_(torch.rand(n, generator=g, dtype=torch.float64) * 1e-4 + 5e-5)
        bn.weight.copy_(torch.rand(n, generator=g, dtype=torch.float64) + 0.5)
        bn.bias.copy_(torch.randn(n, generator=g, dtype=torch.float64))
    return bn.eval()


def _with_bias(layer, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g, dtype=torch.float64))
    return layer.eval()


def _assert_fold_exact(fused, reference, x):
    with torch.no_grad():
        out, ref = fused(x), reference(x)
    err = (out - ref).abs().max() / ref.abs().max()
    assert err < 1e-10, float(err)


@pytest.mark.parametrize('conv_kw', [dict(kernel_size=3, padding=1, bias=True),
                                     dict(kernel_size=3, padding=1, groups=8, bias=True),
                                     dict(kernel_size=1, bias=False)],
                         ids=['dense', 'depthwise', 'no-bias'])
def test_fuse_conv_bn_equals_bn_of_conv(conv_kw):
    from effbackbones.models.layers import fuse_conv_bn
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, **conv_kw).double()
    if conv.bias is not None:
        _with_bias(conv, 1)
    bn = _trained_bn(nn.BatchNorm2d(8).double(), 2)
    fused = fuse_conv_bn(conv, bn)
    _assert_fold_exact(fused, nn.Sequential(conv, bn), torch.randn(2, 8, 7, 9).double())


def test_fuse_bn_conv1x1_equals_conv_of_bn():
    from effbackbones.models.layers import fuse_bn_conv1x1
    torch.manual_seed(0)
    conv = _with_bias(nn.Conv2d(8, 12, 1).double(), 1)
    bn = _trained_bn(nn.BatchNorm2d(8).double(), 2)
    fused = fuse_bn_conv1x1(bn, conv)
    _assert_fold_exact(fused, nn.Sequential(bn, conv), torch.randn(2, 8, 5, 6).double())


@pytest.mark.parametrize('bn_first', [False, True], ids=['linear-bn', 'bn-linear'])
def test_fuse_linear_bn_both_orders(bn_first):
    from effbackbones.models.layers import fuse_bn_linear, fuse_linear_bn
    torch.manual_seed(0)
    linear = _with_bias(nn.Linear(8, 8).double(), 1)
    bn = _trained_bn(nn.BatchNorm1d(8).double(), 2)
    x = torch.randn(16, 8).double()
    if bn_first:
        _assert_fold_exact(fuse_bn_linear(bn, linear), nn.Sequential(bn, linear), x)
    else:
        _assert_fold_exact(fuse_linear_bn(linear, bn), nn.Sequential(linear, bn), x)


def test_fold_bn_keeps_child_names_and_values():
    """fold_bn_ on a ConvBN with a conv bias (the official EfficientFormer / SwiftFormer
    downsample) and on a LeViT LinearBN: the same values, the BN left as an Identity."""
    from effbackbones.models.layers import ConvBN, LinearBN
    torch.manual_seed(0)
    for block, x in ((ConvBN(8, 8, 3, 1, 1, bias=True, names=('proj', 'norm')),
                      torch.randn(2, 8, 6, 5)),
                     (LinearBN(8, 12), torch.randn(2, 5, 8))):
        block = block.double()
        conv_or_linear, bn = list(block.children())
        if conv_or_linear.bias is not None:
            _with_bias(conv_or_linear, 1)
        _trained_bn(bn, 2)
        block.eval()
        with torch.no_grad():
            ref = block(x.double())
        block.switch_to_deploy()
        assert isinstance(list(block.children())[1], nn.Identity)
        _assert_fold_exact(block, lambda t: ref, x.double())
