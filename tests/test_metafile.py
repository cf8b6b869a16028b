"""The mim metafiles: every paper config is listed, every listed config exists, and the
backbone params/FLOPs recorded there are what tools/get_flops.py computes now."""
import functools
import glob
import importlib.util
import os.path as osp

import pytest
import yaml

from conftest import REPO


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


@functools.lru_cache(maxsize=None)
def _measure(class_name, arch):
    """(params, FLOPs) at 224 from tools/get_flops.py, once per backbone variant."""
    import effbackbones  # noqa: F401
    from effbackbones.registry import MODELS
    spec = importlib.util.spec_from_file_location('get_flops', osp.join(REPO, 'tools/get_flops.py'))
    gf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gf)
    (_, _, params, flops), = gf.backbone_rows(MODELS.get(class_name), [arch], (224, 224), False)
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
                          'norm_eval', 'frozen_stages', 'with_cp') and defaults.get(k) != v}
    assert not extra, f'metafile figures assume default options, config sets {extra}'
    params, flops = _measure(bb['type'].split('.')[-1], bb['arch'])
    meta = model['Metadata']
    assert meta['BackboneParams(M)'] == pytest.approx(params / 1e6, abs=6e-4)
    assert meta['BackboneGFLOPs@224'] == pytest.approx(flops / 1e9, abs=6e-4)
