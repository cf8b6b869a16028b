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


def make_weights():
    """The pack helper module (``load_pack``, ``state_dict_from_pack``, ``compare_outputs``...)."""
    path = osp.join(reference_dir(), 'make_weights.py')
    spec = importlib.util.spec_from_file_location('effb_make_weights', path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
