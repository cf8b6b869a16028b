"""Compatibility fixes applied when effbackbones is imported.

torch >= 2.6 defaults ``torch.load`` to ``weights_only=True``; mmengine 0.10.7 still loads its
own training checkpoints with a plain ``torch.load``, so ``--resume`` broke in two ways:

1. the checkpoints carry mmengine / numpy objects (``HistoryBuffer``, ``MessageHub``, numpy
   arrays and scalars, ``collections.Counter`` of the lr milestones) that are not on torch's
   allow-list: we allow-list exactly those types;
2. ``HistoryBuffer.__getstate__`` stores its class-level table of *methods*, which pickle as
   ``getattr(HistoryBuffer, 'min')``. Allow-listing ``builtins.getattr`` would make weights-only
   loading unsafe, so instead buffers now pickle only their data (the method table is class
   level and rebuilt on import anyway).

A checkpoint written by an unpatched mmengine still holds those ``getattr`` calls: loading it
raises a clear error, and ``EFFB_TRUST_CHECKPOINTS=1`` loads it with ``weights_only=False``
(only for files you trust).
"""
import argparse
import collections
import os
import pickle

import numpy as np
import torch


def _safe_globals():
    safe = [argparse.Namespace, collections.OrderedDict, collections.defaultdict,
            collections.Counter, set, frozenset, slice, range, complex]
    try:
        from mmengine.config import ConfigDict
        from mmengine.logging import HistoryBuffer, MessageHub
        safe += [HistoryBuffer, MessageHub, ConfigDict]
    except Exception:  # pragma: no cover - mmengine missing: nothing to allow-list
        pass
    safe += [np.dtype, np.ndarray]
    safe += [type(np.dtype(t)) for t in ('float64', 'float32', 'float16', 'int64', 'int32',
                                         'int16', 'int8', 'uint8', 'bool')]
    for modname, name in (('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
                          ('numpy.core.multiarray', '_reconstruct'),
                          ('numpy._core.multiarray', '_reconstruct')):
        try:
            mod = __import__(modname, fromlist=[name])
            safe.append(getattr(mod, name))
        except Exception:
            pass
    return safe


def _patch_history_buffer():
    try:
        from mmengine.logging import HistoryBuffer
    except Exception:  # pragma: no cover
        return
    if getattr(HistoryBuffer, '_effb_data_only_pickle', False):
        return

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop('statistics_methods', None)
        return state

    HistoryBuffer.__getstate__ = __getstate__
    HistoryBuffer._effb_data_only_pickle = True


def _patch_local_loader():
    try:
        from mmengine.runner.checkpoint import CheckpointLoader
    except Exception:  # pragma: no cover
        return

    def load_from_local(filename, map_location):
        filename = os.path.expanduser(filename)
        if not os.path.isfile(filename):
            raise FileNotFoundError(f'{filename} can not be found.')
        try:
            return torch.load(filename, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            if os.environ.get('EFFB_TRUST_CHECKPOINTS') == '1':
                return torch.load(filename, map_location=map_location, weights_only=False)
            raise pickle.UnpicklingError(
                f'{filename} holds objects outside the weights-only allow-list (e.g. a '
                f'checkpoint written by mmengine without effbackbones imported, which pickles '
                f'bound methods). If you trust the file, set EFFB_TRUST_CHECKPOINTS=1 to load '
                f'it with weights_only=False. Details: {str(exc).splitlines()[-3:]}') from None

    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)


SAFE_GLOBALS = _safe_globals()


def install():
    """Register the allow-list with torch and patch mmengine (idempotent)."""
    if hasattr(torch.serialization, 'add_safe_globals'):
        torch.serialization.add_safe_globals(SAFE_GLOBALS)
    _patch_history_buffer()
    _patch_local_loader()


install()
