"""tools/profile_stages.py: the per-stage split of the MACs and of the time of eager PyTorch
and the float32 files in OpenVINO / onnxruntime (no timing is asserted: small inputs, the rows
and the bookkeeping)."""
import os.path as osp

import pytest
import torch

from conftest import REPO, load_script

#: the op types that do a model's multiply-adds, as each runtime's profile names them
COMPUTE_OPS = {'Convolution', 'GroupConvolution', 'FullyConnected', 'MatMul',      # OpenVINO
               'Conv', 'FusedConv', 'NchwcConv', 'FusedMatMul', 'Gemm'}           # onnxruntime
RUNTIMES = ['eager', 'openvino', 'onnxruntime']


def _tool():
    return load_script(osp.join(REPO, 'tools', 'profile_stages.py'), 'effb_profile_stages')


def _args(tool, model, arch, *extra):
    return tool.parse_args(['--model', model, '--arch', arch, '--shape', '64', '64',
                            '--threads', '1', '--repeats', '2', '--warmup', '1',
                            '--gemm-size', '256', '--runtimes', *RUNTIMES, *extra])


@pytest.fixture(scope='module', params=[('EfficientFormer', 'l1'), ('MobileFormer', '26m')],
                ids=lambda p: f'{p[0]}-{p[1]}')
def profiled(request):
    tool = _tool()
    args = _args(tool, *request.param)
    result = tool.profile(args)
    return tool, args, result, tool.render(args, result)


def _rows(lines):
    """The per-stage table: ``{first cell: [cells]}``."""
    start = next(i for i, line in enumerate(lines) if line.startswith('| stage |'))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith('|'):
            break
        cells = [c.strip() for c in line.strip('|').split('|')]
        rows[cells[0]] = cells
    return lines[start], rows


def test_every_stage_has_a_row_and_the_macs_add_up(profiled):
    tool, args, result, lines = profiled
    from effbackbones.models import backbone_class
    model = backbone_class(args.model)(arch=args.arch).eval()
    _, rows = _rows(lines)
    labels = [label for label, _ in result['stages']]
    # these families run all their stage_groups() for out_indices 0..3: stem + 4 stages
    assert labels == ['stem', 'stage 0', 'stage 1', 'stage 2', 'stage 3']
    assert list(rows) == labels + [tool.OTHER, 'total', 'whole call (wall)']
    get_flops = load_script(osp.join(REPO, 'tools', 'get_flops.py'), 'effb_get_flops')
    total = get_flops.count(model, (torch.randn(1, 3, *args.shape),))[0]
    assert result['total_macs'] == total
    assert sum(result['macs']) == pytest.approx(total, rel=0.01)
    assert all(m > 0 for m in result['macs'])
    assert float(rows['total'][2]) == pytest.approx(total / 1e9, rel=1e-3)


def test_stage_rows_add_up_to_the_total_and_shares_to_100(profiled):
    tool, _, result, lines = profiled
    header, rows = _rows(lines)
    cols = [c.strip() for c in header.strip('|').split('|')]
    stage_rows = [r for k, r in rows.items() if k not in ('total', 'whole call (wall)')]
    for rt in RUNTIMES:
        ms, share = cols.index(f'{rt} ms'), cols.index(f'{rt} share')
        total = float(rows['total'][ms])
        assert total > 0
        assert sum(float(r[ms]) for r in stage_rows) == pytest.approx(
            total, abs=0.006 * len(stage_rows))
        assert sum(float(r[share].rstrip('%')) for r in stage_rows) == pytest.approx(
            100, abs=0.06 * len(stage_rows))
        # the whole call: same order of magnitude as the profiled nodes (no timing claims)
        wall = float(rows['whole call (wall)'][ms])
        assert total / 20 < wall < total * 20
        peak = rows['total'][cols.index(f'{rt} % peak')]
        assert peak.endswith('%') and float(peak.rstrip('%')) > 0
    # the stage times are what the runtimes' profiles hold, none lost: eager's rows cover the
    # whole forward, wall time to wall time
    stage_runs, walls, _ = result['profiles']['eager']
    assert [sum(r.values()) for r in stage_runs] == pytest.approx(walls)


def test_every_compute_layer_belongs_to_a_stage(profiled):
    tool, _, result, lines = profiled
    for rt in ('openvino', 'onnxruntime'):
        _, _, layers = result['profiles'][rt]
        compute = {n: st for n, (kind, st, _) in layers.items()
                   if kind.split(' /')[0] in COMPUTE_OPS}
        assert len(compute) > 10, rt
        assert not [n for n, st in compute.items() if st is None], rt
        # every stage has work in every runtime
        assert {st for st in compute.values()} == set(range(len(result['stages']))), rt
    for rt in RUNTIMES:
        assert any(line.startswith(f'{rt}: the 10 slowest layers') for line in lines)


def test_node_names_to_stages():
    tool = _tool()
    scopes = [['/model/stem/'], ['/model/stages.0/', '/model/out_norms.0/'],
              ['/model/stages.1/'], ['/model/stages.1/blocks.3/']]
    nodes = [
        ('input_abcd_acdb_/model/stem/conv1/Conv/WithoutBiases', 'Reorder / jit_uni_f32'),
        ('/model/stem/conv1/Conv/WithoutBiases', 'Convolution / brgconv_avx512_f32'),
        ('MVN_811', 'MVN / jit_avx512_f32'),                   # a transformation's node
        ('/model/stages.0/blocks.0/mlp/fc1/Conv', 'Convolution / brgconv_avx512_1x1_f32'),
        ('/model/out_norms.0/Add', 'Add'),
        ('out_0', 'DepthToSpace / jit_avx512_f32'),            # the output's producer
        ('out_0_abcd_acdb_/model/stages.1/blocks.0/Conv', 'Reorder / jit_uni_f32'),
        ('/model/stages.10/blocks.0/Conv', 'Conv'),            # not stages.1: glue of stage 0
        ('/model/stages.1/blocks.0/Conv_output_0_nchwc', 'Conv'),
        ('Gelu_token_4', 'Gelu'),
        ('/model/stages.1/blocks.3/attn/MatMul', 'MatMul'),    # the longer scope wins
        ('/model/Transpose', 'Transpose / unknown_f32'),        # backbone glue: stage running
        ('out_3_bn_nchwc', 'Conv'),                             # compute named after an output
        ('/Transpose_1', 'Transpose / unknown_f32'),            # the wrapper's own
        ('out_3_acdb_abcd_out_3/sink_port_0', 'Reorder / jit_f32'),
    ]
    got = tool.assign_stages(nodes, scopes, io_names=['input', 'out_0', 'out_3'])
    assert got == [None, 0, 0, 1, 1, 1, None, 1, 2, 2, 3, 3, 3, None, None]
    # eager layers: qualified names against the stages' module names
    assert tool.assign_stages([('stem.0.', 'Conv2d'), ('stages.0.blocks.1.fc.', 'Linear')],
                              [['stem.'], ['stages.0.']]) == [0, 1]


def test_onnx_scopes_and_module_lists():
    tool = _tool()
    called = {'stem', 'stem.0', 'stages.0', 'stages.0.blocks.1', 'features', 'features.2',
              'stem.conv1'}
    assert tool.onnx_scope('stages.0.blocks.1', called) == '/model/stages.0/blocks.1/'
    assert tool.onnx_scope('features.2', called) == '/model/features/features.2/'
    assert tool.onnx_scope('stem.0', called) == '/model/stem/stem.0/'
    # LeViT: the stem is a holder its forward never calls
    assert tool.onnx_scope('stem.conv1', called - {'stem'}) == '/model/conv1/'
    assert tool.compact(['stem', 'features.0', 'features.1', 'features.2', 'features.5']) == \
        'stem, features.0-2, features.5'


def test_main_appends_the_tables(tmp_path):
    tool = _tool()
    bench = load_script(osp.join(REPO, 'tools', 'benchmark.py'), 'effb_benchmark')
    out = tmp_path / 'record.md'
    argv = ['--model', 'SwiftFormer', '--arch', 'xs', '--shape', '64', '64', '--threads', '1',
            '--repeats', '1', '--warmup', '1', '--gemm-size', '256', '--runtimes', 'openvino',
            '--top', '3', '--out', str(out)]
    assert tool.main(argv) == 0
    assert tool.main(argv) == 0
    text = out.read_text()
    assert text.count('per-stage time, SwiftFormer xs, input 1x3x64x64, float32, cpu '
                      f'({bench.cpu_description()}, 1 thread)') == 2
    assert 'openvino ms' in text and 'eager ms' not in text
    assert text.count('openvino: the 3 slowest layers') == 2
