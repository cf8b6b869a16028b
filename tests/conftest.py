"""Shared test fixtures: the official reference packs (see ../shared/reference/README.md).

The packs are looked up in ``$EFFB_REFERENCE_DIR``, else ``<repo>/../shared/reference`` (where CI
and the developers have them), else ``<repo>/tests/data/reference``. A missing pack is an error,
never a skip: parity is the heart of this project.
"""
import importlib.util
import os
import os.path as osp

import pytest
import torch

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
_CANDIDATES = [os.environ.get('EFFB_REFERENCE_DIR', ''),
               osp.join(REPO, '..', 'shared', 'reference'),
               osp.join(REPO, 'tests', 'data', 'reference')]


def reference_dir():
    for c in _CANDIDATES:
        if c and osp.isfile(osp.join(c, 'make_weights.py')):
            return osp.abspath(c)
    raise FileNotFoundError(
        'reference packs not found: set EFFB_REFERENCE_DIR to the folder holding make_weights.py '
        f'and the family folders (looked in {[c for c in _CANDIDATES if c]})')


def load_script(path, name):
    """The Python file ``path`` (not on ``sys.path``) imported as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_weights():
    """The pack helper module (``load_pack``, ``state_dict_from_pack``, ``compare_outputs``...)."""
    return load_script(osp.join(reference_dir(), 'make_weights.py'), 'effb_make_weights')


def official_bias_idxs(resolution, q_resolution=None, q_step=1):
    """An attention-bias index table built the way the official LeViT / EfficientFormer code
    builds it (``itertools.product`` over grid points, offsets numbered in order of first
    appearance): kept independent of ``effbackbones.models.attention_bias`` on purpose.

    ``q_resolution``/``q_step``: queries on a coarser grid, each at ``q_step`` key positions
    (subsampled attention, e.g. EfficientFormerV2's ``Attention4DDownsample``).
    """
    import itertools
    q_resolution = q_resolution or resolution
    keys = list(itertools.product(range(resolution), range(resolution)))
    queries = list(itertools.product(range(q_resolution), range(q_resolution)))
    offsets, idxs = {}, []
    for qy, qx in queries:
        for ky, kx in keys:
            off = (abs(qy * q_step - ky), abs(qx * q_step - kx))
            if off not in offsets:
                offsets[off] = len(offsets)
            idxs.append(offsets[off])
    return torch.tensor(idxs).view(len(queries), len(keys))


_PACKS = {}


def load_pack(family, variant):
    key = (family, variant)
    if key not in _PACKS:
        _PACKS[key] = make_weights().load_pack(osp.join(reference_dir(), family, f'{variant}.pt'))
    return _PACKS[key]


def zero_state_dict(manifest):
    """A state dict of zeros in a pack manifest's layout (for key-conversion tests)."""
    from collections import OrderedDict
    return OrderedDict((k, torch.zeros(s, dtype=getattr(torch, dt))) for k, s, dt in manifest)


@pytest.fixture(scope='session')
def mw():
    return make_weights()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def random_cls_state_dict(pack, seed=3):
    """Random floats in a pack's released classification layout (``cls_manifest``); integer
    entries (index buffers) take the pack's stored value where it has one, else zeros."""
    g = torch.Generator().manual_seed(seed)
    sd = zero_state_dict(pack['cls_manifest'])
    for k, v in sd.items():
        if v.is_floating_point():
            sd[k] = torch.randn(v.shape, generator=g)
        elif k in pack.get('int_buffers', {}):
            sd[k] = pack['int_buffers'][k].reshape(v.shape).to(v.dtype).clone()
    return sd


def check_pack_parity(model_cls, family, variant, tmp_path, wrapper='model', deploy=True,
                      on_loaded=None, on_deploy=None, state_dict=None, **model_kw):
    """The parity skeleton shared by every family: the pack's official dense weights are saved
    as the official release does (``{wrapper: state_dict}``), the model is built with an
    ``init_cfg`` of type Pretrained, ``init_weights`` loads them, and in eval mode its outputs on
    the pack input match the official ones; with ``deploy`` the same holds after
    ``switch_to_deploy``. ``on_loaded(model, pack)`` runs after loading (before the eager
    forward), ``on_deploy(model, pack)`` after ``switch_to_deploy`` (before its forward), for a
    family's own assertions. ``wrapper='safetensors'`` writes a ``.safetensors`` file instead;
    ``state_dict(pack)`` gives the tensors to save (another layout of the pack's weights).
    Returns the model."""
    mw = make_weights()
    pack = load_pack(family, variant)
    sd = state_dict(pack) if state_dict else mw.state_dict_from_pack(pack)
    if wrapper == 'safetensors':
        from safetensors.torch import save_file
        ckpt = tmp_path / f'{family}_{variant}.safetensors'
        save_file({k: v.contiguous() for k, v in sd.items()}, str(ckpt))
    else:
        ckpt = tmp_path / f'{family}_{variant}_official.pth'
        torch.save({wrapper: sd}, ckpt)
    model = model_cls(variant, init_cfg=dict(type='Pretrained', checkpoint=str(ckpt)),
                      **model_kw)
    model.init_weights()
    model.eval()
    if on_loaded is not None:
        on_loaded(model, pack)
    x = mw.input_from_pack(pack)
    stages = [('eager', None)] + ([('deploy', on_deploy)] if deploy else [])
    for name, hook in stages:
        if name == 'deploy':
            model.switch_to_deploy()
            if hook is not None:
                hook(model, pack)
        with torch.no_grad():
            outs = model(x)
        ok, report = mw.compare_outputs(list(outs), pack)
        assert ok, f'{family} {variant} ({name}): {report}'
    return model
