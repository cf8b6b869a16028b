"""The mim metafiles: every paper config is listed, every listed config exists, and the
backbone params/FLOPs recorded there are what tools/get_flops.py computes now."""
import functools
import glob
import os.path as osp

import pytest
import yaml

from conftest import REPO, load_script


def _models():
    index = yaml.safe_load(open(osp.join(REPO, 'model-index.yml')))
    out = []
    for f in index['Import']:
        data = yaml.safe_load(open(osp.join(REPO, f)))
        out += data['Models']
    return out


def test_every_paper_config_is_listed_once():
    listed = [m['Config'] for m in _models()]
    assert len(listed) == len(set(listed))
    configs = sorted(osp.relpath(p, REPO) for p in glob.glob(osp.join(REPO, 'configs', '*.py')))
    assert sorted(listed) == configs
    for m in _models():
        assert osp.splitext(osp.basename(m['Config']))[0] == m['Name']


#: backbone options that change the architecture, hence the recorded params / FLOPs: the
#: figures are measured with the config's value (e.g. the ADE20K bias grid of EfficientFormer)
ARCH_OPTIONS = ('bias_grid',)


@functools.lru_cache(maxsize=None)
def _measure(class_name, arch, options=()):
    """(params, FLOPs) at 224 with tools/get_flops.py's counter, once per backbone variant and
    architecture options (a tuple of (name, value) pairs)."""
    import torch
    import effbackbones  # noqa: F401
    from effbackbones.registry import MODELS
    gf = load_script(osp.join(REPO, 'tools/get_flops.py'), 'get_flops')
    model = MODELS.get(class_name)(arch=arch, **dict(options))
    flops, params = gf.count(model, (torch.randn(1, 3, 224, 224),))
    return params, flops


@pytest.mark.parametrize('model', _models(), ids=lambda m: m['Name'])
def test_recorded_params_and_flops_are_current(model):
    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(REPO, model['Config']))
    bb = dict(cfg.model.backbone)
    import inspect
    import effbackbones  # noqa: F401
    from effbackbones.registry import MODELS
    defaults = {k: p.default for k, p in inspect.signature(
        MODELS.get(bb['type'].split('.')[-1]).__init__).parameters.items()}
    extra = {k: v for k, v in bb.items()
             if k not in ('type', 'arch', 'init_cfg', 'drop_path_rate', 'out_indices',
                          'norm_eval', 'frozen_stages', 'with_cp') + ARCH_OPTIONS
             and defaults.get(k) != v}
    assert not extra, f'metafile figures assume default options, config sets {extra}'
    options = tuple(sorted((k, bb[k]) for k in ARCH_OPTIONS
                           if k in bb and defaults.get(k) != bb[k]))
    params, flops = _measure(bb['type'].split('.')[-1], bb['arch'], options)
    meta = model['Metadata']
    assert meta['BackboneParams(M)'] == pytest.approx(params / 1e6, abs=6e-4)
    assert meta['BackboneGFLOPs@224'] == pytest.approx(flops / 1e9, abs=6e-4)
