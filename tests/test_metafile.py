"""The mim metafiles: every paper config is listed, every listed config exists, and the
backbone params/FLOPs recorded there are what tools/get_flops.py computes now."""
import glob
import os.path as osp
import re

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


@pytest.mark.parametrize('model', _models(), ids=lambda m: m['Name'])
def test_recorded_params_and_flops_are_current(model):
    from mmengine.config import Config
    import effbackbones  # noqa: F401
    from effbackbones.registry import MODELS
    import importlib.util
    cfg = Config.fromfile(osp.join(REPO, model['Config']))
    bb = dict(cfg.model.backbone)
    cls = MODELS.get(bb.pop('type').split('.')[-1])
    spec = importlib.util.spec_from_file_location('get_flops', osp.join(REPO, 'tools/get_flops.py'))
    gf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gf)
    (_, _, params, flops), = gf.backbone_rows(cls, [bb['arch']], (224, 224), False)
    meta = model['Metadata']
    assert meta['BackboneParams(M)'] == pytest.approx(params / 1e6, abs=6e-4)
    assert meta['BackboneGFLOPs@224'] == pytest.approx(flops / 1e9, abs=6e-4)
