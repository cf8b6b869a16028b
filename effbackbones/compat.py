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

Reliability (see docs/reliability.md): the local loader also reports an empty, truncated or
non-PyTorch file as corrupt (the allow-list message is kept for files that really pickle other
types) and refuses tensors holding NaN / Inf; checkpoints are written atomically (temporary file,
fsync, rename); and auto-resume passes over a damaged latest checkpoint to the previous good one.
"""
import argparse
import collections
import os

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
    """mmengine's local loader (``load_from``, ``--resume``) becomes
    :func:`~effbackbones.checkpoint.load_checkpoint_file`; ``EFFB_TRUST_CHECKPOINTS=1`` is its
    ``allow_unsafe`` (mmengine passes no such argument)."""
    try:
        from mmengine.runner.checkpoint import CheckpointLoader
    except Exception:  # pragma: no cover
        return
    from .checkpoint import load_checkpoint_file

    def load_from_local(filename, map_location):
        filename = os.path.expanduser(filename)
        if not os.path.isfile(filename):
            raise FileNotFoundError(f'{filename} can not be found.')   # mmengine's message
        return load_checkpoint_file(
            filename, map_location, allow_unsafe=os.environ.get('EFFB_TRUST_CHECKPOINTS') == '1',
            unsafe_hint='set EFFB_TRUST_CHECKPOINTS=1 to load it with weights_only=False (e.g. '
                        'a checkpoint written by mmengine without effbackbones imported, which '
                        'pickles bound methods)')

    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)


def _patch_atomic_checkpoint_writes():
    """mmengine writes checkpoints with ``LocalBackend.put`` (open + write in place): a kill
    during the write left a truncated file under the final name."""
    try:
        from mmengine.fileio.backends.local_backend import LocalBackend
    except Exception:  # pragma: no cover
        return
    if getattr(LocalBackend.put, '_effb_atomic', False):
        return
    from .engine.checkpoint_files import atomic_write_bytes

    def put(self, obj, filepath):
        atomic_write_bytes(obj, filepath)

    put._effb_atomic = True
    put.__doc__ = 'Write bytes to ``filepath`` atomically (temporary file, fsync, rename).'
    LocalBackend.put = put


def _patch_auto_resume():
    """``--resume`` without a path: skip a damaged latest checkpoint for the previous good one."""
    import importlib
    from .engine.checkpoint_files import find_resumable_checkpoint
    for name in ('mmengine.runner', 'mmengine.runner.checkpoint', 'mmengine.runner.runner',
                 'mmengine.runner._flexible_runner'):
        try:
            module = importlib.import_module(name)
        except Exception:  # pragma: no cover - optional parts of mmengine
            continue
        if hasattr(module, 'find_latest_checkpoint'):
            module.find_latest_checkpoint = find_resumable_checkpoint


SAFE_GLOBALS = _safe_globals()


def install():
    """Register the allow-list with torch and patch mmengine (idempotent)."""
    if hasattr(torch.serialization, 'add_safe_globals'):
        torch.serialization.add_safe_globals(SAFE_GLOBALS)
    _patch_history_buffer()
    _patch_local_loader()
    _patch_atomic_checkpoint_writes()
    _patch_auto_resume()


install()
