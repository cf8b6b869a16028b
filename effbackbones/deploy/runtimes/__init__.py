"""One module per runtime named in :data:`~..contract.BACKENDS`, each with

* ``SUBSTITUTIONS``: module type -> factory of its export stand-in (``module -> stand-in or
  None``), applied to a copy of the model when a static graph is tuned for that runtime
  (:mod:`..substitution`); an empty table tunes nothing;
* ``INT8_SUBSTITUTIONS`` (optional, default ``SUBSTITUTIONS``): the table of a static graph
  that will be quantized (:mod:`..quantize`), where the int8 kernels make other forms faster;
* ``PRECISIONS``: the inference precisions its sessions run;
* ``Session(path, threads, precision)``: the file loaded on the CPU, ``run(array) -> [array]``
  (float32 numpy in and out, in the file's output order).

Adding a runtime: its module here and its name in ``BACKENDS``.
"""
import importlib

from ..contract import BACKENDS

#: the graphs a static export can be tuned as: run in float32 / bfloat16, or quantized to int8
GRAPH_FORMS = ('float32', 'int8')


def runtime_module(name):
    """The module of runtime ``name`` (imported on first use: each imports its runtime's
    package only when a session opens)."""
    if name not in BACKENDS:
        raise ValueError(f'backend must be one of {BACKENDS}, got {name!r}')
    return importlib.import_module(f'.{name}', __name__)


def substitutions(name, form='float32'):
    """The export stand-in table of runtime ``name`` for a graph of ``form`` (``'float32'``, or
    ``'int8'``: the float32 graph that will be quantized)."""
    if form not in GRAPH_FORMS:
        raise ValueError(f'form must be one of {GRAPH_FORMS}, got {form!r}')
    module = runtime_module(name)
    if form == 'int8':
        return getattr(module, 'INT8_SUBSTITUTIONS', module.SUBSTITUTIONS)
    return module.SUBSTITUTIONS


__all__ = ['GRAPH_FORMS', 'runtime_module', 'substitutions']
