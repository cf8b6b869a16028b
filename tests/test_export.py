"""ONNX export and the onnxruntime / OpenVINO runtimes (effbackbones.deploy, tools/export_onnx.py,
tools/test.py --backend).

* every family's exported file, eager and deploy, reproduces the official reference pack in both
  runtimes (``compare_outputs``), the checkpoint going through the init_cfg loader;
* a dynamic-size export runs at two sizes (and batches) in both runtimes; for the families with
  attention-bias tables (LeViT, EfficientFormer v1 / V2 in both bias modes) at sizes whose token
  grids are smaller than, equal to and larger than the tables (non-square, mixed), with the
  tables random so that a wrong bias shows; the two bias rules alone match PyTorch's biases;
* a whole Semantic FPN (image -> logits) matches PyTorch; tools/test.py with the file in a
  runtime gives PyTorch's metrics on the synthetic data;
* OpenVINO bfloat16 inference (CPUs with native bf16) stays near float32 and is really not
  float32; where it cannot run (onnxruntime, a CPU without bf16) it is refused;
* impossible requests fail with a message saying what to do.
"""
import os.path as osp
import re
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import REPO, load_pack, load_script, make_weights

PY = sys.executable
SEG = 'configs/demo/semfpn_swiftformer_xs_shapes.py'

# one variant per family (the smallest; Mobile-Former also 52M), the pack's release wrapper and
# model arguments
FAMILIES = [
    ('SwiftFormer', 'swiftformer', 'xs', 'model', {}),
    ('EfficientFormer', 'efficientformer', 'l1', 'model', {}),
    ('EfficientFormerV2', 'efficientformerv2', 's0', 'model', {}),
    ('LeViT', 'levit', '128s', 'model', dict(out_indices=(0, 1, 2, 3, 4))),
    ('MobileFormer', 'mobileformer', '26m', 'state_dict', {}),
    # 26M's grouped 1x1 convs keep the multiplier depthwise convs; 52M's deploy form splits them
    ('MobileFormer', 'mobileformer', '52m', 'state_dict', {}),
]


def _pack_checkpoint(family, variant, wrapper, tmp_path):
    mw = make_weights()
    pack = load_pack(family, variant)
    ckpt = tmp_path / f'{family}_{variant}.pth'
    torch.save({wrapper: mw.state_dict_from_pack(pack)}, ckpt)
    return pack, str(ckpt)


@pytest.mark.parametrize('deploy,runtime', [(False, 'onnxruntime'), (True, 'onnxruntime'),
                                            (True, 'openvino')],
                         ids=['eager', 'deploy', 'deploy-for-openvino'])
@pytest.mark.parametrize('cls_name,family,variant,wrapper,kw', FAMILIES,
                         ids=[f'{f[1]}_{f[2]}' for f in FAMILIES])
def test_pack_parity_in_both_runtimes(cls_name, family, variant, wrapper, kw, deploy, runtime,
                                      tmp_path):
    """The file of each family -- eager, deploy, and deploy tuned for OpenVINO (another graph:
    the maps with 16-64 channels reach their channels-first consumers another way) --
    reproduces the official pack in both runtimes."""
    import onnx
    from effbackbones.deploy import RuntimeSession, build_backbone, export
    mw = make_weights()
    pack, ckpt = _pack_checkpoint(family, variant, wrapper, tmp_path)
    x = mw.input_from_pack(pack)
    model = build_backbone(cls_name, variant, ckpt, kw.get('out_indices'))
    out = str(tmp_path / 'model.onnx')
    # the export's own onnxruntime check is done below against the pack instead
    export(model, x.shape[2:], out, batch=x.shape[0], deploy=deploy, check=False,
           runtime=runtime, log=lambda *_: None)
    assert model.deploy == deploy
    if runtime == 'openvino':
        plain = str(tmp_path / 'plain.onnx')
        export(model, x.shape[2:], plain, batch=x.shape[0], check=False, log=lambda *_: None)
        assert [n.op_type for n in onnx.load(out).graph.node] != \
            [n.op_type for n in onnx.load(plain).graph.node]
    for backend in ('onnxruntime', 'openvino'):
        outs = RuntimeSession(out, backend, threads=1)(x)
        ok, report = mw.compare_outputs(outs, pack)
        assert ok, f'{family} {variant} ({"deploy" if deploy else "eager"}, {runtime} file, ' \
                   f'{backend}):\n{report}'


def _op_count(path, op):
    import onnx
    return [n.op_type for n in onnx.load(path).graph.node].count(op)


def _concats_of(path, op):
    """How many Concat nodes of the ONNX file ``path`` join only outputs of ``op`` nodes."""
    import onnx
    graph = onnx.load(path).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    return sum(all(producer.get(i) == op for i in n.input)
               for n in graph.node if n.op_type == 'Concat')


@pytest.mark.parametrize('variant', ['26m', '52m'])
def test_openvino_tuned_export_matches_the_pack_in_both_runtimes(variant, tmp_path, capsys):
    """tools/export_onnx.py --runtime openvino: Mobile-Former's bridges read the 16-64-channel
    maps through SpaceToDepth; the export checks the file in both runtimes, and both match the
    official pack."""
    from effbackbones.deploy import RuntimeSession
    sys.path.insert(0, osp.join(REPO, 'tools'))
    import export_onnx
    mw = make_weights()
    pack, ckpt = _pack_checkpoint('mobileformer', variant, 'state_dict', tmp_path)
    x = mw.input_from_pack(pack)
    out = str(tmp_path / 'ov.onnx')
    assert export_onnx.main(['--model', 'MobileFormer', '--arch', variant, '--checkpoint', ckpt,
                             '--shape', *map(str, x.shape[2:]), '--batch', str(x.shape[0]),
                             '--runtime', 'openvino', '--out', out]) == 0
    log = capsys.readouterr().out
    assert 'tuned for openvino' in log
    assert '[onnxruntime vs PyTorch' in log and '[openvino vs PyTorch' in log
    # at 224x224 blocks 2-6 write 24, 24, 48, 48, 64 channels (28x28, 14x14): their 5
    # Former->Mobile bridges (a SpaceToDepth and a DepthToSpace each) and the Mobile->Former
    # bridges of blocks 3-7, which read those maps
    assert (_op_count(out, 'SpaceToDepth'), _op_count(out, 'DepthToSpace')) == (10, 5)
    for backend in ('onnxruntime', 'openvino'):
        session = RuntimeSession(out, backend, threads=1)
        assert session.metadata['effbackbones.tuned_for'] == 'openvino'
        ok, report = mw.compare_outputs(session(x), pack)
        assert ok, f'{variant} tuned for openvino, run in {backend}:\n{report}'


def test_openvino_tuning_only_where_the_blocks_fit(tmp_path):
    """The pixel blocks follow the traced sizes: 208x224 blocks the stride-8 maps (26x28) but
    not the stride-16 ones (13x14, odd); the graph for int8 kernels reads no blocks (its bridges
    read the pixel rows) and activates the split depthwise convs per part; a dynamic export is
    never tuned. Each file passes the export's own parity checks (both runtimes for the static
    ones), and the export leaves the model untuned (the stand-ins live in the traced copy
    only)."""
    from effbackbones.deploy import RuntimeSession, build_backbone, export
    from effbackbones.models.mobileformer import (DoubleDepthwiseBlock, FormerToMobile,
                                                  MobileToFormer)
    model = build_backbone('MobileFormer', '52m')
    static, dyn = str(tmp_path / 'static.onnx'), str(tmp_path / 'dyn.onnx')
    reports = export(model, (208, 224), static, runtime='openvino', log=lambda *_: None)
    assert [r.split(',')[0] for r in reports] == ['[onnxruntime vs PyTorch', '[openvino vs PyTorch']
    # stride 8: the Former->Mobile bridges of blocks 2 and 3 and the Mobile->Former bridges of
    # blocks 3 and 4 (the maps of blocks 4-6 are 13x14)
    assert (_op_count(static, 'SpaceToDepth'), _op_count(static, 'DepthToSpace')) == (4, 2)
    assert _concats_of(static, 'Max') == 0
    int8_form = str(tmp_path / 'int8_form.onnx')
    reports = export(model, (208, 224), int8_form, runtime='openvino', form='int8',
                     log=lambda *_: None)
    assert [r.split(',')[0] for r in reports] == ['[onnxruntime vs PyTorch', '[openvino vs PyTorch']
    assert (_op_count(int8_form, 'SpaceToDepth'), _op_count(int8_form, 'DepthToSpace')) == (0, 0)
    # the three bridged stride-2 blocks' two split multiplier depthwise convs each: dynamic ReLU
    # per part (Max), then the concatenation
    assert _concats_of(int8_form, 'Max') == 6
    with pytest.raises(ValueError, match="form must be one of"):
        export(model, (208, 224), str(tmp_path / 'x.onnx'), runtime='openvino', form='bf16',
               log=lambda *_: None)
    export(model, (224, 224), dyn, dynamic=True, runtime='openvino', log=lambda *_: None)
    assert _op_count(dyn, 'SpaceToDepth') == 0 and _concats_of(dyn, 'Max') == 0
    assert RuntimeSession(dyn, 'onnxruntime').metadata['effbackbones.tuned_for'] == 'none'
    kinds = (MobileToFormer, FormerToMobile, DoubleDepthwiseBlock)
    own = [m for m in model.modules() if isinstance(m, kinds)]
    assert own and all(type(m) in kinds for m in own)


@pytest.mark.parametrize('cls_name,arch,kw', [
    ('SwiftFormer', 'xs', {}), ('EfficientFormerV2', 's0', {}),
    ('LeViT', '128s', dict(out_indices=(0, 1, 2, 3, 4)))])
def test_openvino_file_hands_out_channels_last_maps_through_a_transpose(cls_name, arch, kw,
                                                                         tmp_path):
    """Tuned for OpenVINO, a backbone whose maps leave it as conv outputs returns each map with
    16-64 channels through the channels-last view and a Transpose; the plain file returns it
    straight from the layer that wrote it (which OpenVINO reorders with its scalar loop)."""
    import onnx
    from effbackbones.deploy import build_backbone, export
    model = build_backbone(cls_name, arch, **kw)
    narrow = [f'out_{i}' for i, c in zip(model.out_indices, model.out_channels) if 16 <= c <= 64]
    assert narrow

    def through_transpose(path):
        graph = onnx.load(path).graph
        producer = {o: n for n in graph.node for o in n.output}
        return [producer[name].op_type == 'Reshape'
                and producer[producer[name].input[0]].op_type == 'Transpose' for name in narrow]

    for runtime in ('onnxruntime', 'openvino'):
        out = str(tmp_path / f'{runtime}.onnx')
        export(model, (128, 128), out, runtime=runtime, log=lambda *_: None)
        assert through_transpose(out) == [runtime == 'openvino'] * len(narrow), runtime


def test_tuned_for_names_a_runtime_only_where_its_stand_ins_changed_the_graph(tmp_path):
    """LeViT-128S returning its stride-16/32/64 maps (128-384 channels) has nothing OpenVINO
    runs another way: exported for OpenVINO it is the plain graph, tagged ``none``; with the
    stride-4 map (a conv output of 16-64 channels) it is tuned and tagged ``openvino``. The
    model keeps its own modules either way."""
    import onnx
    from effbackbones.deploy import RuntimeSession, build_backbone, export
    from effbackbones.deploy.substitution import RuntimeForm
    tags, ops = {}, {}
    for name, out_indices in (('wide', (2, 3, 4)), ('narrow', (0, 2))):
        model = build_backbone('LeViT', '128s', out_indices=out_indices)
        for runtime in ('onnxruntime', 'openvino'):
            path = str(tmp_path / f'{name}_{runtime}.onnx')
            export(model, (128, 128), path, check=False, runtime=runtime, log=lambda *_: None)
            tags[name, runtime] = \
                RuntimeSession(path, 'onnxruntime').metadata['effbackbones.tuned_for']
            ops[name, runtime] = [n.op_type for n in onnx.load(path).graph.node]
        assert not any(isinstance(m, RuntimeForm) for m in model.modules())
    assert tags == {('wide', 'onnxruntime'): 'none', ('wide', 'openvino'): 'none',
                    ('narrow', 'onnxruntime'): 'none', ('narrow', 'openvino'): 'openvino'}
    assert ops['wide', 'openvino'] == ops['wide', 'onnxruntime']
    assert ops['narrow', 'openvino'] != ops['narrow', 'onnxruntime']


def test_substitute_replaces_exact_types_and_keeps_the_weights():
    """A stand-in table entry applies to modules of exactly that type (not subclasses), the
    root included, and the stand-in holds the very tensors of the module it replaces."""
    from effbackbones.deploy.substitution import RuntimeForm, adopt, substitute

    class Doubled(RuntimeForm, torch.nn.Linear):
        def forward(self, x):
            self.mark_applied()
            return 2 * super().forward(x)

    class OwnLinear(torch.nn.Linear):
        pass

    root = torch.nn.Sequential(torch.nn.Linear(3, 3), OwnLinear(3, 3))
    first = root[0]
    new_root, made = substitute(root, {torch.nn.Linear: lambda m: adopt(Doubled, m)})
    assert new_root is root and made == [new_root[0]] and type(new_root[1]) is OwnLinear
    assert new_root[0].weight is first.weight and not made[0].applied
    x = torch.randn(2, 3)
    torch.testing.assert_close(new_root[0](x), 2 * first(x))
    assert made[0].applied
    lone = torch.nn.Linear(3, 3)
    replaced, made = substitute(lone, {torch.nn.Linear: lambda m: adopt(Doubled, m)})
    assert type(replaced) is Doubled and made == [replaced]
    with pytest.raises(TypeError, match='no stand-in'):
        adopt(Doubled, torch.nn.Conv2d(1, 1, 1))


def test_openvino_pixel_block_rule(tmp_path):
    """Which maps get blocks, and the blocks' ops: ONNX's channel order (checked against
    onnxruntime's SpaceToDepth), each the inverse and the gradient of the other."""
    import onnxruntime as ort
    from effbackbones.deploy.runtimes.openvino import (depth_to_space, pixel_block,
                                                       space_to_depth)
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64, requires_grad=True)
    path = str(tmp_path / 'blocks.onnx')

    class Blocks(torch.nn.Module):
        def forward(self, t):
            return space_to_depth(t, 4)

    torch.onnx.export(Blocks(), (x.float().detach(),), path, input_names=['t'], dynamo=False,
                      opset_version=17)
    (onnx_out,) = ort.InferenceSession(path).run(None, {'t': x.float().detach().numpy()})
    assert torch.equal(torch.from_numpy(onnx_out), space_to_depth(x, 4).float())
    assert torch.equal(depth_to_space(space_to_depth(x, 4), 4), x)
    y = torch.randn(2, 12, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: depth_to_space(t * t, 2), (y,))
    assert torch.autograd.gradcheck(lambda t: space_to_depth(t * t, 4), (x,))
    assert [pixel_block(c, 64, 64) for c in (12, 16, 19, 20, 24, 64, 65, 96)] == \
        [1, 4, 4, 2, 2, 2, 1, 1]
    assert pixel_block(16, 64, 66) == 1 and pixel_block(24, 26, 28) == 2
    assert pixel_block(24, 13, 14) == 1


def test_bias_tables_are_graph_constants(tmp_path):
    """A static export holds the attention biases as computed by PyTorch: no gather / Resize
    of the tables is left in the graph (the op behind EfficientFormer's 2e-4 in a naive
    export is the bicubic Resize of the dense bias matrix, see docs/deploy.md)."""
    import onnx
    from effbackbones.deploy import build_backbone, export
    model = build_backbone('EfficientFormer', 'l1')
    out = str(tmp_path / 'l1.onnx')
    export(model, (224, 224), out, check=False, log=lambda *_: None)
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert 'Resize' not in ops and 'GatherND' not in ops, sorted(ops)
    assert 'Gather' not in ops, sorted(ops)


def test_dynamic_export_two_sizes_both_runtimes(tmp_path):
    from effbackbones.deploy import RuntimeSession, build_backbone, compare, export
    model = build_backbone('SwiftFormer', 'xs', out_indices=(1, 3))
    out = str(tmp_path / 'dyn.onnx')
    reports = export(model, (224, 224), out, dynamic=True, log=lambda *_: None)
    assert len(reports) == 2            # the export checked a second size itself
    for backend in ('onnxruntime', 'openvino'):
        sess = RuntimeSession(out, backend, threads=1)
        assert sess.output_names == ['out_1', 'out_3']
        for shape in [(1, 3, 160, 224), (2, 3, 288, 192)]:
            x = torch.randn(shape)
            with torch.no_grad():
                ref = model(x)
            outs = sess(x)
            assert outs[1].shape[2:] == (shape[2] // 32, shape[3] // 32)
            ok, report = compare(outs, ref)
            assert ok, f'{backend} {shape}:\n{report}'


def _random_bias_tables(model):
    """Random bias tables and layer scales near 1 (their inits are 0 and 1e-5, which would hide
    any bias in the outputs)."""
    from effbackbones.models.attention_bias import RelPosBiasAttention
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RelPosBiasAttention):
                m.bias_table().normal_()
            if isinstance(getattr(m, 'gamma', None), torch.nn.Parameter):
                m.gamma.uniform_(0.5, 1.5)
    return model


# class, arch, model arguments, export size, more sizes run in both runtimes. Token grids vs the
# tables: LeViT pretrain_img_size=64 -> 4x4 / 2x2 / 1x1 tables at strides 16 / 32 / 64; the
# pretrained tables of v1 / V2 are 7x7 at stride 32 (V2: 14x14 keys in the downsample);
# official bias_grid=2 -> 2x2 dense grids (4 tokens, V2's downsample 16 keys), resized by token
# count. Each list has a grid smaller than the table, one larger, and one mixed / non-square.
DYNAMIC_BIAS_CASES = [
    ('LeViT', '128s', dict(pretrain_img_size=64, out_indices=(2, 3, 4)), (64, 64),
     [(32, 96), (128, 96), (32, 32)]),
    ('EfficientFormer', 'l1', dict(bias_mode='pretrained', out_indices=(3,)), (224, 224),
     [(64, 96), (288, 160), (256, 320)]),
    ('EfficientFormer', 'l1', dict(bias_grid=2, out_indices=(3,)), (64, 64),
     [(32, 32), (32, 96), (96, 128)]),
    ('EfficientFormerV2', 's0', dict(bias_mode='pretrained', out_indices=(2, 3)), (224, 224),
     [(64, 96), (288, 160), (256, 320)]),
    ('EfficientFormerV2', 's0', dict(bias_grid=2, out_indices=(2, 3)), (64, 64),
     [(32, 32), (32, 96), (96, 128)]),
]


@pytest.mark.parametrize('cls_name,arch,kw,shape,sizes', DYNAMIC_BIAS_CASES,
                         ids=['levit', 'v1-pretrained', 'v1-official', 'v2-pretrained',
                              'v2-official'])
def test_dynamic_bias_tables_in_both_runtimes(cls_name, arch, kw, shape, sizes, tmp_path):
    """A dynamic file of a family with attention-bias tables computes the bias of each input
    size in the graph: equal to PyTorch (within the export tolerance) in both runtimes at token
    grids smaller than, equal to and larger than the tables."""
    from effbackbones.deploy import RuntimeSession, build_backbone, compare, export
    model = _random_bias_tables(build_backbone(cls_name, arch, **kw))
    out = str(tmp_path / 'dyn.onnx')
    reports = export(model, shape, out, dynamic=True, log=lambda *_: None)
    assert len(reports) == 2            # the export checked a second size and batch itself
    g = torch.Generator().manual_seed(1)
    for backend in ('onnxruntime', 'openvino'):
        sess = RuntimeSession(out, backend, threads=1)
        for i, (h, w) in enumerate(sizes):
            x = torch.randn(1 + i % 2, 3, h, w, generator=g)
            with torch.no_grad():
                ref = model(x)
            ok, report = compare(sess(x), ref)
            assert ok, f'{cls_name} {kw} {backend} {tuple(x.shape)}:\n{report}'


class _BiasOfInput(torch.nn.Module):
    """Input ``(1, 1, H, W)`` -> the ``(1, heads, Nq, Nk)`` bias of an ``H x W`` key grid."""

    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, x):
        h, w = x.shape[2:]
        s = self.attn.q_stride
        return self.attn.attention_bias(((h - 1) // s + 1, (w - 1) // s + 1), (h, w))[None]


def test_dynamic_bias_rules_against_pytorch(tmp_path):
    """The bias rules as graph ops, alone: the pretrained rule is PyTorch's bias bit for bit
    where the grid fits in the table (a crop) and within float rounding where the table is
    resized (borders included; measured <= 1.2e-6 of max|bias|); the official rule's resize of
    the dense matrix is exact at the dense grid, and on this 25-token one within 2e-5 (measured
    3e-6; 625-token matrices: <= 4.5e-5, float32 source positions, see docs/deploy.md)."""
    from effbackbones.deploy import RuntimeSession
    from effbackbones.models.efficientformer import Attention
    from effbackbones.models.levit import AttentionSubsample
    torch.manual_seed(0)
    # vs the 7x7 table / 5x5 dense grid: smaller, equal, mixed, larger, much larger
    sizes = [(2, 3), (5, 5), (7, 5), (5, 9), (9, 11), (16, 12)]
    cases = [('pretrained', AttentionSubsample(16, 32, 8, 2, 2, (7, 7)), 5e-6, sizes),
             ('official', Attention(16, 8, 2, 2, 7, 'official', 5), 2e-5, sizes),
             # a 2 x 4096 x 4096 bias: OpenVINO's second, large gather went wrong with the
             # rows gathered first (gather_offset_bias_traced)
             ('pretrained', Attention(16, 8, 2, 2, 7, 'pretrained'), 5e-6, [(64, 64)])]
    for i, (mode, attn, tol_resized, grids) in enumerate(cases):
        with torch.no_grad():
            attn.bias_table().normal_()
        part = _BiasOfInput(attn.eval())
        path = str(tmp_path / f'{i}_{mode}.onnx')
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            torch.onnx.export(part, (torch.zeros(1, 1, 5, 5),), path, input_names=['input'],
                              dynamic_axes={'input': {2: 'h', 3: 'w'}}, opset_version=17,
                              dynamo=False)
        # tap gathers, not ONNX Resize: onnxruntime's cubic Resize takes seconds on the
        # 625-token matrices of the real backbones (docs/deploy.md, Shapes)
        import onnx
        assert 'Resize' not in {n.op_type for n in onnx.load(path).graph.node}
        for backend in ('onnxruntime', 'openvino'):
            # 2 threads: OpenVINO's wrong large gather showed only with more than one
            sess = RuntimeSession(path, backend, threads=2)
            for hw in grids:
                x = torch.zeros(1, 1, *hw)
                with torch.no_grad():
                    ref = part(x)
                out = sess(x)[0]
                assert out.shape == ref.shape
                fits = hw[0] <= 7 and hw[1] <= 7 if mode == 'pretrained' else hw == (5, 5)
                err = ((out - ref).abs().max() / ref.abs().max()).item()
                assert err <= (0.0 if fits else tol_resized), (mode, backend, hw, err)


def test_dynamic_file_checks_the_side_rule(tmp_path):
    from effbackbones.deploy import RuntimeSession, build_backbone, export
    model = build_backbone('EfficientFormerV2', 's0', out_indices=(3,))
    out = str(tmp_path / 'dyn.onnx')
    export(model, (64, 64), out, dynamic=True, check=False, log=lambda *_: None)
    with pytest.raises(ValueError, match=r'needs input sides that are multiples of 32.*got '
                                         r'70x64.*pad_size_divisor=32'):
        RuntimeSession(out, 'onnxruntime')(torch.zeros(1, 3, 70, 64))


def test_static_file_refuses_another_size_and_runs_batches_image_by_image(tmp_path):
    """A static batch-1 file takes a batch of N images one by one (outputs concatenated: the
    model's batch output); another size, or another batch for a file of batch > 1, is refused."""
    from effbackbones.deploy import RuntimeSession, build_backbone, export
    model = build_backbone('SwiftFormer', 'xs', out_indices=(2, 3)).eval()
    out, out2 = str(tmp_path / 'static.onnx'), str(tmp_path / 'static_b2.onnx')
    export(model, (128, 128), out, log=lambda *_: None)
    with pytest.raises(ValueError, match=r'exported for input 1x3x128x128; got 1x3x160x128.*'
                                         r'--shape 160 128'):
        RuntimeSession(out, 'onnxruntime')(torch.zeros(1, 3, 160, 128))
    x = torch.randn(3, 3, 128, 128)
    with torch.no_grad():
        refs = model(x)
    sess = RuntimeSession(out, 'onnxruntime')
    assert sess.one_image_per_run
    outs = sess(x)
    for o, r in zip(outs, refs):
        assert o.shape == r.shape
        assert ((o - r).abs().max() / r.abs().max()).item() < 1e-5
    export(model, (128, 128), out2, batch=2, log=lambda *_: None)
    with pytest.raises(ValueError, match=r'exported for input 2x3x128x128; got 3x3x128x128.*'
                                         r'--batch 3'):
        RuntimeSession(out2, 'onnxruntime')(x)


@pytest.mark.parametrize('args,message', [
    (['--model', 'EfficientFormerV3', '--arch', 'l1', '--shape', '224', '224'],
     r"unknown backbone class 'EfficientFormerV3'; choose one of \[.*'SwiftFormer'"),
    (['--model', 'SwiftFormer', '--arch', 'xxl', '--shape', '224', '224'],
     r"unknown SwiftFormer arch 'xxl'"),
    (['--model', 'EfficientFormerV2', '--arch', 's0', '--shape', '200', '224'],
     r'--shape 200 224: EfficientFormerV2 needs input sides that are multiples of 32'),
    (['--model', 'LeViT', '--arch', '128s', '--shape', '224', '240'],
     r'--shape 224 240: LeViT needs input sides that are multiples of 32'),
    (['--model', 'SwiftFormer', '--arch', 'xs', '--checkpoint', 'no/such.pth', '--shape', '224',
      '224'], r'checkpoint not found: no/such.pth'),
    (['--config', SEG, '--shape', '256', '256'], r'--config needs --checkpoint'),
])
def test_export_tool_clear_errors(args, message, tmp_path, capsys):
    sys.path.insert(0, osp.join(REPO, 'tools'))
    import export_onnx
    assert export_onnx.main(args + ['--out', str(tmp_path / 'x.onnx')]) == 2
    assert re.search(message, capsys.readouterr().err, re.S)
    assert not (tmp_path / 'x.onnx').exists()


def test_wrong_checkpoint_is_refused_loudly(tmp_path):
    """A checkpoint of another variant fails in the init_cfg loader (no random weights)."""
    from effbackbones.checkpoint import CheckpointError
    from effbackbones.deploy import build_backbone
    _, ckpt = _pack_checkpoint('swiftformer', 's', 'model', tmp_path)
    with pytest.raises(CheckpointError, match='shape'):
        build_backbone('SwiftFormer', 'xs', ckpt)


def _native_bf16():
    import openvino as ov
    return 'BF16' in ov.Core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES')


def test_openvino_bfloat16_near_float32(tmp_path):
    """precision='bfloat16' in OpenVINO: float32 maps out, each within 3e-2 of max|float32 map|
    (measured on a Sapphire Rapids Xeon: 3e-3 to 5.5e-3 for SwiftFormer-XS at 64x96) and
    further than 5e-4 from it (float32 runs agree to 1e-6: bfloat16 really ran). On a CPU
    without native bf16 the session is refused instead of quietly running float32."""
    from effbackbones.deploy import RuntimeSession, build_backbone, export
    torch.manual_seed(0)
    model = build_backbone('SwiftFormer', 'xs')
    path = str(tmp_path / 'xs.onnx')
    export(model, (64, 96), path, log=lambda *_: None)
    if not _native_bf16():
        with pytest.raises(ValueError, match=r"precision='bfloat16' needs a CPU with native "
                                             r"bf16.*precision='float32'"):
            RuntimeSession(path, 'openvino', threads=1, precision='bfloat16')
        return
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    ref = RuntimeSession(path, 'openvino', threads=1)(x)
    sess = RuntimeSession(path, 'openvino', threads=1, precision='bfloat16')
    assert sess.precision == 'bfloat16'
    outs = sess(x)
    for i, (o, r) in enumerate(zip(outs, ref)):
        assert o.dtype == torch.float32 and o.shape == r.shape
        err = ((o - r).abs().max() / r.abs().max()).item()
        assert 5e-4 < err < 3e-2, (i, err)


def test_bfloat16_refused_where_it_cannot_run(tmp_path):
    from effbackbones.deploy import RuntimeSession
    from effbackbones.deploy.runtime import check_native_bf16
    with pytest.raises(ValueError, match=r"runs in OpenVINO only \(onnxruntime's CPU provider "
                                         r"has no bfloat16 execution\)"):
        RuntimeSession(str(tmp_path / 'x.onnx'), 'onnxruntime', precision='bfloat16')
    with pytest.raises(ValueError, match=r"precision must be one of \('float32', 'bfloat16'\), "
                                         r"got 'float16'"):
        RuntimeSession(str(tmp_path / 'x.onnx'), 'openvino', precision='float16')

    class CoreWithoutBF16:
        """What OpenVINO reports on an AVX-512 CPU without AVX512-BF16 / AMX."""
        def get_property(self, device, name):
            return {'OPTIMIZATION_CAPABILITIES': ['WINOGRAD', 'FP32', 'INT8', 'BIN'],
                    'FULL_DEVICE_NAME': 'Intel Xeon (no bf16)'}[name]
    with pytest.raises(ValueError, match=r"needs a CPU with native bf16.*Intel Xeon \(no bf16\)"):
        check_native_bf16(CoreWithoutBF16())

    class CoreWithBF16:
        """What OpenVINO reports on an AMX CPU (from its flags, whatever the oneDNN cap)."""
        def get_property(self, device, name):
            return {'OPTIMIZATION_CAPABILITIES': ['BF16', 'FP32', 'INT8'],
                    'FULL_DEVICE_NAME': 'Intel Xeon (AMX)'}[name]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('ONEDNN_MAX_CPU_ISA', 'AVX512_CORE_AMX')
        check_native_bf16(CoreWithBF16())
        # capped to an AVX2 CPU's kernels: OpenVINO would fail compiling its Softmax in bf16
        mp.setenv('ONEDNN_MAX_CPU_ISA', 'AVX2')
        with pytest.raises(ValueError, match=r'ONEDNN_MAX_CPU_ISA=AVX2 caps OpenVINO below bf16'):
            check_native_bf16(CoreWithBF16())


def test_tools_test_precision_needs_an_onnx_backend(monkeypatch):
    monkeypatch.setenv('LOCAL_RANK', '0')     # parse_args sets it: restored afterwards
    tools_test = load_script(osp.join(REPO, 'tools/test.py'), 'tools_test')
    with pytest.raises(SystemExit, match=r'--precision bfloat16 applies to an ONNX file run with '
                                         r'--backend openvino'):
        tools_test.main([SEG, 'model.pth', '--precision', 'bfloat16'])


# --------------------------------------------------------------------------------------------
# whole models: Semantic FPN (image -> logits), tools/test.py --backend
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def semfpn(tmp_path_factory):
    """The demo Semantic FPN config with random weights saved as a trained checkpoint, and a
    tiny synthetic dataset."""
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmengine.registry import MODELS as ROOT
    from effbackbones.datasets.synthetic import make_shapes_dataset
    from effbackbones.utils.launch import register_toolbox
    tmp = tmp_path_factory.mktemp('semfpn')
    root = str(tmp / 'shapes')
    make_shapes_dataset(root, num_train=1, num_val=3, size=(128, 160), max_objects=3)
    cfg = Config.fromfile(osp.join(REPO, SEG))
    register_toolbox('mmseg')
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = ROOT.build(cfg.model)
    model.init_weights()
    ckpt = str(tmp / 'semfpn.pth')
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, ckpt)
    return dict(root=root + '/seg/', ckpt=ckpt, tmp=tmp)


def test_semfpn_whole_model_logits(semfpn):
    from effbackbones.deploy import RuntimeSession, build_from_config, compare, export
    model, _ = build_from_config(osp.join(REPO, SEG), semfpn['ckpt'])
    out = str(semfpn['tmp'] / 'semfpn_static.onnx')
    export(model, (192, 256), out, log=lambda *_: None)
    x = torch.randn(1, 3, 192, 256)
    with torch.no_grad():
        ref = model.decode_head.forward(model.extract_feat(x))       # the deploy model
    sess = RuntimeSession(out, 'openvino', threads=1)
    assert sess.part == 'segmentor' and sess.output_names == ['seg_logits']
    outs = sess(x)
    assert outs[0].shape == (1, 4, 48, 64)
    ok, report = compare(outs, [ref])
    assert ok, report


def _metrics(stdout):
    m = re.findall(r'aAcc: ([\d.]+)\s+mIoU: ([\d.]+)\s+mAcc: ([\d.]+)', stdout)
    assert m, stdout[-3000:]
    return m[-1]


@pytest.mark.slow
def test_tools_test_backend_metrics_equal_pytorch(semfpn):
    """tools/test.py with the whole Semantic FPN in onnxruntime (dynamic export) gives the
    PyTorch checkpoint's metrics (OpenVINO's logits are checked in the test above); with
    OpenVINO's bfloat16 inference (where the CPU has it) metrics near them."""
    from effbackbones.deploy import build_from_config, export
    env = dict(__import__('os').environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    opts = ['--cfg-options', f'test_dataloader.dataset.data_root={semfpn["root"]}']
    onnx_file = str(semfpn['tmp'] / 'semfpn_dynamic.onnx')
    model, _ = build_from_config(osp.join(REPO, SEG), semfpn['ckpt'])
    export(model, (192, 256), onnx_file, dynamic=True, log=lambda *_: None)

    def run(args):
        proc = subprocess.run([PY, 'tools/test.py', SEG] + args + opts, cwd=REPO,
                              capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return proc.stdout + proc.stderr

    wd = str(semfpn['tmp'] / 'wd')
    torch_metrics = _metrics(run([semfpn['ckpt'], '--work-dir', wd]))
    assert float(torch_metrics[1]) > 0
    log = run([onnx_file, '--backend', 'onnxruntime', '--work-dir', wd])
    assert _metrics(log) == torch_metrics
    if _native_bf16():
        # the same file in OpenVINO with bfloat16 inference, said so in the log: its metrics
        # near float32's (measured: within 0.2 points; random weights, 3 images)
        log = run([onnx_file, '--backend', 'openvino', '--precision', 'bfloat16',
                   '--work-dir', wd])
        assert 'runs in openvino, bfloat16 inference' in log
        for bf16, f32 in zip(_metrics(log), torch_metrics):
            assert abs(float(bf16) - float(f32)) < 1.0, (_metrics(log), torch_metrics)


def test_group_norm_exported_with_short_reductions(tmp_path):
    """A plain nn.GroupNorm(1, C) on a large map (EfficientFormer's stride-4 output norm at
    512x512; the eager export and mm necks / heads keep plain GroupNorms) is exported as
    ExportableGroupNorm: both runtimes stay at float32 rounding of the float64 value (the
    InstanceNormalization graph drifted by ~1e-4 of max|out|)."""
    from effbackbones.deploy.export import export_form
    from effbackbones.deploy.runtime import RuntimeSession
    gn = torch.nn.GroupNorm(1, 48).eval()
    torch.nn.init.normal_(gn.weight)
    torch.nn.init.normal_(gn.bias)
    x = torch.randn(1, 48, 128, 128) * 0.2 + 0.13
    with torch.no_grad():
        ref = torch.nn.functional.group_norm(x.double(), 1, gn.weight.double(),
                                             gn.bias.double())
    part = torch.nn.Sequential(gn)
    path = str(tmp_path / 'gn.onnx')
    traced, _ = export_form(part)
    assert type(traced[0]).__name__ == 'ExportableGroupNorm'
    with torch.no_grad():
        torch.onnx.export(traced, (x,), path, opset_version=17, dynamo=False)
    assert type(part[0]) is torch.nn.GroupNorm          # the model keeps its own
    for backend in ('onnxruntime', 'openvino'):
        out = RuntimeSession(path, backend)(x)[0].double()
        err = (out - ref).abs().max() / ref.abs().max()
        assert err < 2e-6, (backend, err.item())


def test_export_fails_loudly_above_the_tolerance(tmp_path, monkeypatch):
    """The post-export check raises and moves the file aside when the runtime is off (here a
    PyTorch reference perturbed by 1e-3 of its max after the export)."""
    import importlib
    from effbackbones.deploy import ParityError, build_backbone, export
    export_mod = importlib.import_module('effbackbones.deploy.export')
    model = build_backbone('SwiftFormer', 'xs', out_indices=(3,))
    real = export_mod.check_onnx_parity

    def perturbed(path, part, inputs, **kw):
        class Off(torch.nn.Module):
            def forward(self, x):
                out = part(x)
                return tuple(o + 1e-3 * o.abs().max() for o in out)
        return real(path, Off(), inputs, **kw)
    monkeypatch.setattr(export_mod, 'check_onnx_parity', perturbed)
    out = tmp_path / 'x.onnx'
    with pytest.raises(ParityError, match=r'out_3: BAD .*worst err/allowed'):
        export(model, (128, 128), str(out), log=lambda *_: None)
    assert not out.exists() and (tmp_path / 'x.parity-failed.onnx').exists()
