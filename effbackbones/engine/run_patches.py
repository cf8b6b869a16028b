"""What an mmengine run with our hooks needs from mmengine, installed for that run only.

Importing effbackbones changes nothing in mmengine or torch. A run that lists
``effbackbones.StrictLoadHook`` or ``effbackbones.ExactResumeHook`` (our configs and tools do)
gets, from the hook's ``before_run`` until its ``after_run``:

* **mmengine's local checkpoint loader** (``load_from``, ``--resume``, ``tools/test.py FILE``)
  reads through :func:`~effbackbones.checkpoint.load_checkpoint_file`: torch >= 2.6 loads
  ``weights_only=True`` by default and mmengine 0.10.7 passes no allow-list, so its own
  checkpoints (``HistoryBuffer``, ``MessageHub``, numpy objects) would not load; ours widens
  the allow-list inside that call only, reports an empty / truncated / non-PyTorch / hostile
  file by what is wrong with it, and refuses NaN / Inf. ``EFFB_TRUST_CHECKPOINTS=1`` is its
  ``allow_unsafe``.
* **data-only pickling of ``HistoryBuffer``**: mmengine's ``__getstate__`` stores the class's
  table of statistics *methods*, which pickle as ``getattr(HistoryBuffer, 'min')``; allowing
  ``getattr`` would make weights-only loading unsafe, so during the run buffers pickle their
  data only (the method table is class-level and rebuilt on import anyway).
* **atomic checkpoint writes** (``LocalBackend.put``: temporary file, fsync, rename) and
  **auto-resume past a damaged file** (``find_latest_checkpoint`` in the modules that call it).

Each hook acquires the patches in ``before_run`` and releases them in ``after_run``; they are
undone when the last holder releases them. Our tools also release them when a run ends with an
error (:func:`released_after`).
"""
import contextlib
import importlib
import threading

from .checkpoint_files import (atomic_write_bytes, find_resumable_checkpoint,
                               load_local_checkpoint)

_FIND_LATEST_MODULES = ('mmengine.runner', 'mmengine.runner.checkpoint', 'mmengine.runner.runner',
                        'mmengine.runner._flexible_runner', 'mmengine._strategy.base')


def _history_buffer_state(self):
    state = dict(self.__dict__)
    state.pop('statistics_methods', None)
    return state


def _atomic_put(self, obj, filepath):
    """Write bytes to ``filepath`` atomically (temporary file, fsync, rename)."""
    atomic_write_bytes(obj, filepath)


class _RunPatches:
    """The patches of the module docstring, counted: installed by the first holder, undone by
    the last."""

    def __init__(self):
        self._lock = threading.Lock()
        self._holders = 0
        self._undo = []

    @property
    def active(self):
        return self._holders > 0

    def _set(self, owner, name, value):
        old = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        setattr(owner, name, value)
        self._undo.append(lambda: setattr(owner, name, old))

    def _install(self):
        from mmengine.fileio.backends.local_backend import LocalBackend
        from mmengine.logging import HistoryBuffer
        from mmengine.runner.checkpoint import CheckpointLoader
        old_loader = CheckpointLoader._schemes['']
        CheckpointLoader.register_scheme(prefixes='', loader=load_local_checkpoint, force=True)
        self._undo.append(lambda: CheckpointLoader.register_scheme(
            prefixes='', loader=old_loader, force=True))
        self._set(HistoryBuffer, '__getstate__', _history_buffer_state)
        self._set(LocalBackend, 'put', _atomic_put)
        for name in _FIND_LATEST_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:  # optional parts of mmengine
                continue
            if hasattr(module, 'find_latest_checkpoint'):
                self._set(module, 'find_latest_checkpoint', find_resumable_checkpoint)

    def acquire(self):
        with self._lock:
            if self._holders == 0:
                self._install()
            self._holders += 1

    def release(self):
        with self._lock:
            if self._holders == 0:
                return
            self._holders -= 1
            if self._holders == 0:
                while self._undo:
                    self._undo.pop()()

    def release_all(self):
        with self._lock:
            self._holders = min(self._holders, 1)
        self.release()


RUN_PATCHES = _RunPatches()


@contextlib.contextmanager
def run_patches():
    """The run patches for the body of a ``with`` (tests, scripts driving mmengine by hand)."""
    RUN_PATCHES.acquire()
    try:
        yield
    finally:
        RUN_PATCHES.release()


@contextlib.contextmanager
def released_after():
    """Undo every run patch when the body ends, also with an error (a failed run never calls
    its hooks' ``after_run``): what our tools wrap ``runner.train()`` / ``runner.test()`` in."""
    try:
        yield
    finally:
        RUN_PATCHES.release_all()


class RunPatchesMixin:
    """For our hooks: hold the run patches from ``before_run`` to ``after_run``."""

    def before_run(self, runner):
        RUN_PATCHES.acquire()

    def after_run(self, runner):
        RUN_PATCHES.release()
