"""One module per runtime named in :data:`~..contract.BACKENDS`, each with

* ``SUBSTITUTIONS``: module type -> factory of its export stand-in (``module -> stand-in or
  None``), applied to a copy of the model when a static graph is tuned for that runtime
  (:mod:`..substitution`); an empty table tunes nothing;
* ``PRECISIONS``: the inference precisions its sessions run;
* ``Session(path, threads, precision)``: the file loaded on the CPU, ``run(array) -> [array]``
  (float32 numpy in and out, in the file's output order).

Adding a runtime: its module here and its name in ``BACKENDS``.
"""
import importlib

from ..contract import BACKENDS


def runtime_module(name):
    """The module of runtime ``name`` (imported on first use: each imports its runtime's
    package only when a session opens)."""
    if name not in BACKENDS:
        raise ValueError(f'backend must be one of {BACKENDS}, got {name!r}')
    return importlib.import_module(f'.{name}', __name__)


def substitutions(name):
    """The export stand-in table of runtime ``name``."""
    return runtime_module(name).SUBSTITUTIONS


__all__ = ['runtime_module', 'substitutions']
