"""Compatibility fixes applied when effbackbones is imported.

torch >= 2.6 defaults ``torch.load`` to ``weights_only=True``. mmengine 0.10.7 saves its training
checkpoints with a ``message_hub``, ``HistoryBuffer``s, numpy scalars/arrays and the config, and
loads them back with a plain ``torch.load``: ``--resume`` then fails with an UnpicklingError. We
allow-list exactly the objects mmengine's own checkpoints carry (types from mmengine and numpy, no
arbitrary callables), so resume works while foreign pickles are still refused.
"""
import argparse
import collections

import numpy as np
import torch


def _mmengine_checkpoint_globals():
    safe = [argparse.Namespace, collections.OrderedDict, collections.defaultdict, set, frozenset,
            slice, range, complex]
    try:
        from mmengine.logging import HistoryBuffer, MessageHub
        from mmengine.config import ConfigDict
        safe += [HistoryBuffer, MessageHub, ConfigDict]
    except Exception:  # pragma: no cover - mmengine missing: nothing to allow-list
        pass
    # numpy scalars and arrays as pickled by numpy 1.x and 2.x
    safe += [np.dtype, np.ndarray, np.generic]
    safe += [type(np.dtype(t)) for t in ('float64', 'float32', 'float16', 'int64', 'int32',
                                         'int16', 'int8', 'uint8', 'bool')]
    safe += [np.float64, np.float32, np.int64, np.int32, np.bool_]
    for modname, name in (('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
                          ('numpy.core.multiarray', '_reconstruct'),
                          ('numpy._core.multiarray', '_reconstruct')):
        try:
            mod = __import__(modname, fromlist=[name])
            safe.append(getattr(mod, name))
        except Exception:
            pass
    return safe


SAFE_GLOBALS = _mmengine_checkpoint_globals()


def install():
    """Register the allow-list with torch (idempotent)."""
    if hasattr(torch.serialization, 'add_safe_globals'):
        torch.serialization.add_safe_globals(SAFE_GLOBALS)


install()
