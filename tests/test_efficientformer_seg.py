"""The official ADE20K backbones of EfficientFormer v1 / V2 (``segmentation/backbone.py``,
``segmentation/backbonev2.py``: dense attention-bias grid 16 instead of the detection 25) built
from the Semantic FPN configs: parity with the segmentation packs (input 1x3x512x512) through
``init_cfg=Pretrained``, eager and after ``switch_to_deploy()``, the official parameter counts,
the official index order on the 16-grid, loud failure of a file made for the other grid, and the
validation of ``bias_grid``."""
import copy
import math
import os.path as osp

import pytest
import torch

from effbackbones import CheckpointError
from effbackbones.models.attention_bias import offset_index
from effbackbones.models.efficientformer import EfficientFormer
from effbackbones.models.efficientformer_v2 import EfficientFormerV2
from effbackbones.registry import MODELS

from conftest import REPO, check_pack_parity, load_pack, make_weights

#: (reference family folder, config family, variant)
V1 = [('efficientformer_seg', 'efficientformer', v) for v in ('l1', 'l3', 'l7')]
V2 = [('efficientformerv2_seg', 'efficientformerv2', v) for v in ('s0', 's1', 's2', 'l')]
SEG_GRID = 16


def _config_backbone(family, variant, task='semfpn'):
    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(REPO, 'configs', f'{task}_{family}_{variant}.py'))
    return copy.deepcopy(cfg.model.backbone.to_dict())


def _build_from_config(family, task='semfpn'):
    """A ``model_cls`` for :func:`check_pack_parity`: the config's backbone dict, its init_cfg
    replaced by the test file."""
    def build(variant, init_cfg):
        bb = _config_backbone(family, variant, task)
        bb['init_cfg'] = init_cfg
        return MODELS.build(bb)
    return build


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def _seg_tables(model):
    return {n: tuple(p.shape) for n, p in model.named_parameters()
            if n.endswith('attention_biases_seg')}


# -------------------------------------------------------------------------------------------
# parity through the Semantic FPN configs
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize('pack_family,family,variant', V1 + V2,
                         ids=[f'{f}-{v}' for _, f, v in V1 + V2])
def test_seg_config_backbone_matches_official_ade20k_backbone(pack_family, family, variant,
                                                              tmp_path):
    def loaded(model, pack):
        assert pack['task'] == 'segmentation' and list(pack['input_shape']) == [1, 3, 512, 512]
        assert model.bias_mode == 'official' and model.bias_grid == SEG_GRID
        # the official parameter count: dense tables are Parameters, ImageNet tables buffers
        assert _n_params(model) == pack['params_dense']
        # one table per attention, each of the official shape (16x16 grids; the V2
        # downsample attends from the 16x16 to the 32x32 grid)
        official = sorted(tuple(s) for k, s, _ in pack['dense_manifest']
                          if k.endswith('attention_biases_seg'))
        assert sorted(_seg_tables(model).values()) == official
        assert set(official) <= {(8, 256), (8, 1024)}

    def deployed(model, pack):
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())

    # the released ADE20K files are mmseg runner files: weights under 'state_dict'
    check_pack_parity(_build_from_config(family), pack_family, variant, tmp_path,
                      wrapper='state_dict', on_loaded=loaded, on_deploy=deployed)


@pytest.mark.parametrize('pack_family,family,variant', [V1[0], V2[0]],
                         ids=lambda x: x if isinstance(x, str) else None)
def test_seg_config_loads_the_backbone_of_an_mmseg_runner_file(pack_family, family, variant,
                                                               tmp_path):
    """The backbone part of a file laid out as the released ADE20K checkpoints (mmseg 0.x
    runner file: ``meta``, ``state_dict`` with ``backbone.`` keys, ``optimizer``) loads
    completely through the config's ``init_cfg`` and gives the official outputs."""
    mw = make_weights()
    pack = load_pack(pack_family, variant)
    path = tmp_path / f'{family}_{variant}_ade20k.pth'
    torch.save({'meta': {'mmseg_version': '0.19.0', 'iter': 40000},
                'state_dict': {'backbone.' + k: v
                               for k, v in mw.state_dict_from_pack(pack).items()},
                'optimizer': {'state': {}, 'param_groups': []}}, path)
    model = _build_from_config(family)(variant, dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    with torch.no_grad():
        outs = model.eval()(mw.input_from_pack(pack))
    ok, report = mw.compare_outputs(list(outs), pack)
    assert ok, report


def test_seg_gather_equals_official_index_on_the_16_grid():
    """Our per-axis gather on the 16-grid (and the V2 downsample's 16 -> 32 grid) equals
    indexing the table with the official ``attention_bias_idxs_seg`` buffers of the seg packs."""
    v1 = EfficientFormer('l1', bias_grid=SEG_GRID)
    pack = load_pack('efficientformer_seg', 'l1')
    (idx,) = [v for k, v in pack['int_buffers'].items() if k.endswith('attention_bias_idxs_seg')]
    assert tuple(idx.shape) == (256, 256)
    assert torch.equal(offset_index((16, 16))[0], idx)

    v2 = EfficientFormerV2('s0', bias_grid=SEG_GRID)
    pack = load_pack('efficientformerv2_seg', 's0')
    official = {tuple(v.shape): v for k, v in pack['int_buffers'].items()
                if k.endswith('attention_bias_idxs_seg')}
    assert set(official) == {(256, 256), (256, 1024)}
    attns = [m for m in list(v1.modules()) + list(v2.modules()) if hasattr(m, 'dense_hw')]
    assert len(attns) == 1 + 2 * 2 + 1
    with torch.no_grad():
        for m in attns:
            m.attention_biases_seg.normal_()
            gathered = m.dense_bias_matrix()
            ref = m.attention_biases_seg[:, official.get(tuple(gathered.shape[1:]), idx)]
            assert torch.equal(gathered, ref), m


# -------------------------------------------------------------------------------------------
# a dense file of the other task's grid is an error, never a silent re-init
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize('pack_family,task,family,variant', [
    ('efficientformer', 'semfpn', 'efficientformer', 'l1'),        # detection file, seg config
    ('efficientformer_seg', 'maskrcnn', 'efficientformer', 'l1'),  # seg file, detection config
    ('efficientformerv2', 'semfpn', 'efficientformerv2', 's0'),
    ('efficientformerv2_seg', 'maskrcnn', 'efficientformerv2', 's0'),
])
def test_dense_file_of_the_other_grid_fails_loudly(pack_family, task, family, variant, tmp_path):
    pack = load_pack(pack_family, variant)
    path = tmp_path / 'dense.pth'
    torch.save({'model': make_weights().state_dict_from_pack(pack)}, path)
    model = _build_from_config(family, task)(variant, dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(CheckpointError, match=r'(?s)attention_biases_seg.*Set bias_grid'):
        model.init_weights()


# -------------------------------------------------------------------------------------------
# the argument
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize('cls', [EfficientFormer, EfficientFormerV2])
def test_bias_grid_sets_the_dense_table_sizes(cls):
    arch = 'l1' if cls is EfficientFormer else 's0'
    for grid in (25, 16, 7):
        model = cls(arch, bias_grid=grid)
        assert model.bias_grid == grid
        shapes = set(_seg_tables(model).values())
        # v1: one grid x grid table per attention; V2 also the downsample's (2 grid)^2 key grid
        assert shapes == ({(8, grid ** 2)} if cls is EfficientFormer
                          else {(8, grid ** 2), (8, 4 * grid ** 2)})
    # the default is the detection backbone's grid
    assert cls(arch).bias_grid == 25


@pytest.mark.parametrize('cls', [EfficientFormer, EfficientFormerV2])
@pytest.mark.parametrize('bad', [0, -16, 16.0, '16', True, None])
def test_bias_grid_must_be_a_positive_int(cls, bad):
    with pytest.raises(ValueError, match='bias_grid must be a positive int'):
        cls(bias_grid=bad)


@pytest.mark.parametrize('cls', [EfficientFormer, EfficientFormerV2])
def test_bias_grid_only_applies_to_the_official_bias_mode(cls):
    with pytest.raises(ValueError, match="only with bias_mode='official'"):
        cls(bias_mode='pretrained', bias_grid=SEG_GRID)
    model = cls(bias_mode='pretrained')         # the default grid is accepted (and unused)
    assert not _seg_tables(model)


def test_seg_grid_runs_other_input_sizes():
    """The 16-grid backbone takes any input whose sides are multiples of 32: the gathered
    (heads, 256, 1024) matrix of the downsample is resized to the real token counts."""
    model = EfficientFormerV2('s0', bias_grid=SEG_GRID).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 96, 160))
    assert [tuple(o.shape[-2:]) for o in outs] == [(24, 40), (12, 20), (6, 10), (3, 5)]
    attn = model.stages[3].downsample.attn
    assert tuple(attn.attention_bias((3, 5), (6, 10)).shape) == (8, 15, 60)
    assert math.prod(attn.dense_hw) == 1024
