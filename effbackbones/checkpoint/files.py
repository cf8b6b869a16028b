"""Reading checkpoint files: safely, and loudly when a file is damaged, hostile or non-finite.

:func:`load_checkpoint_file` is the one reader our loaders and run hooks use. It reads with
``torch.load(weights_only=True)`` and widens torch's allow-list only inside that call
(``torch.serialization.safe_globals``), never process-wide: :data:`SAFE_CHECKPOINT_GLOBALS`
holds what official releases carry next to their tensors (``argparse.Namespace``) and what
mmengine's own training checkpoints carry (``HistoryBuffer``, ``MessageHub``, ``ConfigDict``,
numpy arrays and scalars, ``collections.Counter``).
"""
import argparse
import collections
import os
import os.path as osp
import pickle
import re
import zipfile

import numpy as np
import torch
from mmengine.logging import print_log

from .errors import CheckpointError
from .safetensors_file import looks_like_safetensors, read_safetensors, url_cache_name


def _safe_globals():
    safe = [argparse.Namespace, collections.OrderedDict, collections.defaultdict,
            collections.Counter, set, frozenset, slice, range, complex]
    from mmengine.config import ConfigDict
    from mmengine.logging import HistoryBuffer, MessageHub
    safe += [HistoryBuffer, MessageHub, ConfigDict, np.dtype, np.ndarray]
    safe += [type(np.dtype(t)) for t in ('float64', 'float32', 'float16', 'int64', 'int32',
                                         'int16', 'int8', 'uint8', 'bool')]
    # numpy moved its pickling helpers from numpy.core to numpy._core in 2.0
    for modname, name in (('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
                          ('numpy.core.multiarray', '_reconstruct'),
                          ('numpy._core.multiarray', '_reconstruct')):
        try:
            safe.append(getattr(__import__(modname, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return safe


#: What our own load calls allow beside tensors and containers (see the module docstring).
SAFE_CHECKPOINT_GLOBALS = _safe_globals()


def resolve_path(path):
    """A local path for ``path``; an ``http(s)://`` URL is downloaded to torch's hub cache."""
    path = os.fspath(path)
    if path.startswith(('http://', 'https://')):
        cache = osp.join(torch.hub.get_dir(), 'checkpoints')
        os.makedirs(cache, exist_ok=True)
        dst = osp.join(cache, url_cache_name(path))
        if not osp.exists(dst):
            torch.hub.download_url_to_file(path, dst)
        return dst
    path = osp.expanduser(path)
    if not osp.isfile(path):
        raise FileNotFoundError(
            f'checkpoint file not found: {path!r}. Download the released ImageNet weights of the '
            f'official repository (or timm) and give their local path in '
            f"init_cfg=dict(type='Pretrained', checkpoint=...).")
    return path


# The pickle that the legacy (non-zip) torch.save format starts with: protocol 2, the magic number.
_LEGACY_TORCH_HEADER = b'\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19'


def diagnose_unreadable(path, exc):
    """Why ``torch.load`` could not read ``path``, as a sentence (for corrupt-file errors)."""
    size = osp.getsize(path)
    if size == 0:
        return 'the file is empty (0 bytes)'
    with open(path, 'rb') as f:
        head = f.read(len(_LEGACY_TORCH_HEADER))
    detail = f'{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ""}'
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if not any(n.endswith('data.pkl') for n in archive.namelist()):
                return 'it is a zip archive, but not one that torch.save wrote (no data.pkl)'
        return f'its zip archive (torch.save format, {size} bytes) is damaged ({detail})'
    if head.startswith(b'PK'):
        return (f'it starts like a torch.save zip archive but its end is missing or damaged '
                f'({size} bytes): the file is truncated (an interrupted write or copy)')
    if head == _LEGACY_TORCH_HEADER:
        return f'it is a legacy-format torch file that is damaged or truncated ({detail})'
    return (f'it is not a PyTorch checkpoint: neither the zip archive that torch.save writes '
            f'nor its legacy format ({size} bytes, starting with {head[:8]!r})')


# What torch.load raises on damaged bytes (the legacy reader unpickles whatever it finds).
UNREADABLE_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, KeyError,
                     IndexError, AttributeError, TypeError)

# torch's weights-only unpickler names what it refused in one of these phrasings: a global it
# does not allow ('Unsupported global: GLOBAL x'), one of a blocked module ('Trying to load
# unsupported GLOBAL posix.system whose module posix is blocked': a __reduce__ calling
# os.system), or a callable it will not call.
_REFUSED_PATTERNS = (re.compile(r'[Uu]nsupported (?:global: )?GLOBAL (\S+)'),
                     re.compile(r'Trying to call reduce for unrecognized function (\S+)'),
                     re.compile(r'Unsupported class (\S+)'))


def refused_globals(exc):
    """The pickled globals / callables a weights-only load refused (``[]`` if none is named)."""
    names = []
    for pattern in _REFUSED_PATTERNS:
        names += [n.rstrip('.,') for n in pattern.findall(str(exc))]
    return list(dict.fromkeys(names))


def holds_foreign_objects(path, exc):
    """True when a weights-only load failed on a well-formed file because it pickles objects
    outside the allow-list (not because the bytes are damaged)."""
    if not isinstance(exc, pickle.UnpicklingError) or not refused_globals(exc):
        return False
    return zipfile.is_zipfile(path) or diagnose_unreadable(path, exc).startswith(
        'it is a legacy-format')


def nonfinite_tensors(obj, prefix=''):
    """Names (dotted paths) of the floating-point tensors in nested dicts / lists of ``obj``
    that hold NaN or Inf, with how many of their values are not finite."""
    found = []
    if torch.is_tensor(obj):
        if (obj.is_floating_point() or obj.is_complex()) and obj.numel():
            bad = int((~torch.isfinite(obj)).sum())
            if bad:
                found.append(f'{prefix or "<tensor>"} ({bad}/{obj.numel()} values NaN/Inf)')
    elif isinstance(obj, dict):
        for k, v in obj.items():
            found += nonfinite_tensors(v, f'{prefix}.{k}' if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found += nonfinite_tensors(v, f'{prefix}.{i}' if prefix else str(i))
    return found


def check_finite(obj, source):
    """Raise :class:`CheckpointError` naming every tensor of ``obj`` that holds NaN / Inf."""
    bad = nonfinite_tensors(obj)
    if bad:
        more = f' ... (+{len(bad) - 10} more)' if len(bad) > 10 else ''
        raise CheckpointError(
            f'{source} holds non-finite values (NaN/Inf) in {len(bad)} tensors: '
            f'{", ".join(bad[:10])}{more}. It was written by a diverged run or is damaged; use '
            f'an earlier checkpoint.')


#: How to load a file with objects outside the allow-list, said by :func:`load_checkpoint_file`.
PRETRAINED_UNSAFE_HINT = (
    "pass allow_unsafe=True (init_cfg=dict(type='Pretrained', checkpoint=..., "
    "allow_unsafe=True)), or re-save it with tools/convert_checkpoint.py")


def _torch_load_weights_only(path, map_location):
    with torch.serialization.safe_globals(SAFE_CHECKPOINT_GLOBALS):
        return torch.load(path, map_location=map_location, weights_only=True)


def load_checkpoint_file(path, map_location='cpu', allow_unsafe=False, check_nonfinite=True,
                         unsafe_hint=PRETRAINED_UNSAFE_HINT):
    """Read a checkpoint file with ``torch.load(weights_only=True)``, or a ``.safetensors``
    file (by name or first bytes) with :func:`~.safetensors_file.read_safetensors`.

    Only tensors, containers, primitive types and :data:`SAFE_CHECKPOINT_GLOBALS` are accepted,
    the allow-list widened for this call only. A file that pickles anything else (arbitrary
    pickled objects can run code when loaded) raises :class:`CheckpointError` naming the
    refused objects and saying that nothing of the file was run, and how to load it if it is
    trusted (``unsafe_hint``), unless ``allow_unsafe=True`` is given for a file you trust: it is
    then loaded with ``weights_only=False`` (logged as a warning). A file that is empty,
    truncated or not a PyTorch checkpoint is a :class:`CheckpointError` saying so, and
    (``check_nonfinite``) so is one whose tensors hold NaN or Inf.
    """
    path = resolve_path(path)
    if looks_like_safetensors(path):  # tensors only, no pickle: nothing unsafe to allow
        ckpt = read_safetensors(path)
        if check_nonfinite:
            check_finite(ckpt, path)
        return ckpt
    try:
        ckpt = _torch_load_weights_only(path, map_location)
    except Exception as exc:  # noqa: BLE001  (torch raises many types for damaged files)
        if not holds_foreign_objects(path, exc):
            if isinstance(exc, UNREADABLE_ERRORS):
                raise CheckpointError(f'corrupt checkpoint {path}: '
                                      f'{diagnose_unreadable(path, exc)}.') from None
            raise
        refused = ', '.join(refused_globals(exc))
        if not allow_unsafe:
            raise CheckpointError(
                f'{path} holds pickled objects outside the weights-only allow-list, so it was '
                f'not loaded: {refused}. Nothing of the file was run: the weights-only reader '
                f'stops at such objects (unpickling them can execute code). If you trust the '
                f'file, {unsafe_hint}.') from None
        print_log(f'loading {path} with weights_only=False (it holds objects outside the '
                  f'allow-list: {refused}): only do this for files you trust',
                  logger='current', level=30)
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if check_nonfinite:
        check_finite(ckpt, path)
    return ckpt
