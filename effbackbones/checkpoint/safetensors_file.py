"""Reading ``.safetensors`` checkpoints (the timm weights on the Hugging Face Hub come as
``model.safetensors``).

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the raw bytes: no pickle, so nothing in it can run code. What
can be wrong is the bytes: :func:`read_safetensors` checks the header and the data ranges against
the file size itself, so an empty, truncated or foreign file is a :class:`CheckpointError` that
says which, before the ``safetensors`` package reads the tensors.
"""
import json
import os.path as osp
import struct
from collections import OrderedDict

from .errors import CheckpointError

SAFETENSORS_SUFFIX = '.safetensors'
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit on the JSON header


def url_cache_name(url):
    """The file name a downloaded checkpoint URL is cached under. Hugging Face Hub files are all
    called ``model.safetensors``: their cache name keeps the repository
    (``.../timm/levit_128s.fb_dist_in1k/resolve/main/model.safetensors`` ->
    ``timm--levit_128s.fb_dist_in1k--model.safetensors``), or every model would share one file."""
    parts = url.split('?')[0].split('#')[0].rstrip('/').split('/')
    if 'resolve' in parts:
        at = parts.index('resolve')
        if at >= 2:
            return '--'.join(parts[at - 2:at] + parts[-1:])
    return parts[-1]


class _NotSafetensors(Exception):
    pass


def _read_header(path):
    """(header dict, header length) or :class:`_NotSafetensors` with the reason."""
    size = osp.getsize(path)
    if size == 0:
        raise _NotSafetensors('the file is empty (0 bytes)')
    with open(path, 'rb') as f:
        head = f.read(8)
        if len(head) < 8:
            raise _NotSafetensors(f'the file is truncated ({size} bytes: shorter than the 8-byte '
                                  'header length a safetensors file starts with)')
        (length,) = struct.unpack('<Q', head)
        if length == 0 or length > _MAX_HEADER:
            raise _NotSafetensors(f'it is not a safetensors file (its first 8 bytes {head!r} are '
                                  'not a header length)')
        if 8 + length > size:
            raise _NotSafetensors(f'the file is truncated: its header announces {length} bytes '
                                  f'of JSON but the file holds {size} bytes in all')
        raw = f.read(length)
    try:
        header = json.loads(raw.decode('utf-8'))
    except (UnicodeDecodeError, ValueError):
        raise _NotSafetensors(f'it is not a safetensors file (its header is not JSON: starts '
                              f'with {raw[:16]!r})') from None
    if not isinstance(header, dict):
        raise _NotSafetensors('it is not a safetensors file (its header is not a JSON object)')
    return header, length, size


def looks_like_safetensors(path):
    """True for a ``.safetensors`` name, or a file whose first bytes are a safetensors header
    (a length, then ``{``): renamed downloads (``model.bin``) are recognised too."""
    if str(path).endswith(SAFETENSORS_SUFFIX):
        return True
    try:
        with open(path, 'rb') as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b'{':
        return False
    (length,) = struct.unpack('<Q', head[:8])
    return 0 < length <= min(_MAX_HEADER, osp.getsize(path) - 8)


def read_safetensors(path):
    """The tensors of a safetensors file, as an ``OrderedDict`` name -> CPU tensor.

    Raises :class:`~effbackbones.checkpoint.CheckpointError` ('corrupt checkpoint ...') for an
    empty or truncated file and for one that is not a safetensors file, naming which. Non-finite
    values are the caller's check (as for ``.pth`` files).
    """
    try:
        header, length, size = _read_header(path)
        data_size = size - 8 - length
        for name, entry in header.items():
            if name == '__metadata__':
                continue
            offsets = entry.get('data_offsets') if isinstance(entry, dict) else None
            if not (isinstance(offsets, list) and len(offsets) == 2):
                raise _NotSafetensors(f'it is not a safetensors file (tensor {name!r} has no '
                                      'data_offsets)')
            if offsets[1] > data_size:
                raise _NotSafetensors(
                    f'the file is truncated: tensor {name!r} ends at byte {offsets[1]} of the '
                    f'data, which holds {data_size} bytes ({size} bytes in the file)')
    except _NotSafetensors as err:
        raise CheckpointError(f'corrupt checkpoint {path}: {err}.') from None
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f'{path} is a safetensors file; reading it needs the safetensors '
                              'package: pip install safetensors (tools/setup_env.sh installs '
                              'it)') from None
    try:
        tensors = load_file(path, device='cpu')
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise CheckpointError(f'corrupt checkpoint {path}: the safetensors reader refused it '
                              f'({type(err).__name__}: {err}).') from None
    order = sorted((k for k in header if k != '__metadata__'),
                   key=lambda k: header[k]['data_offsets'][0])
    return OrderedDict((k, tensors[k]) for k in order)
