"""Checkpoint files that survive a kill at any moment.

* :func:`atomic_write_bytes`: a checkpoint is written to a temporary file in the same folder,
  flushed to disk (fsync) and renamed over the final name, so a reader sees the old file or the
  complete new one, never half of it. During our runs (:mod:`.run_patches`) mmengine's local
  file backend (``LocalBackend.put``, which ``save_checkpoint`` uses) through it.
* :func:`find_resumable_checkpoint`: what ``--resume`` (auto) resumes from. mmengine trusts the
  ``last_checkpoint`` file; this tries it first, then the work dir's ``epoch_*.pth`` /
  ``iter_*.pth`` from the newest down, and resumes from the first that loads, saying which ones
  are damaged and why. During our runs (:mod:`.run_patches`) it is mmengine's
  ``find_latest_checkpoint``.
"""
import os
import os.path as osp
import re
import secrets

from mmengine.logging import print_log

from ..checkpoint import CheckpointError, load_checkpoint_file

_CHECKPOINT_NAME = re.compile(r'^(epoch|iter)_(\d+)\.pth$')
_TEMP_NAME = re.compile(r'^\..+\.effb-partial-\d+-[0-9a-f]+$')


def atomic_write_bytes(data, path):
    """Write ``data`` to ``path`` through a temporary file + fsync + rename."""
    path = os.fspath(path)
    folder = osp.dirname(path) or '.'
    os.makedirs(folder, exist_ok=True)
    temp = osp.join(folder, f'.{osp.basename(path)}.effb-partial-{os.getpid()}-'
                            f'{secrets.token_hex(4)}')
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        if osp.exists(temp):
            os.remove(temp)
        raise
    try:   # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass    # some file systems cannot fsync a directory
    finally:
        os.close(dir_fd)


def _candidates(work_dir):
    """``last_checkpoint``'s target first, then numbered checkpoints from the newest down."""
    named = None
    record = osp.join(work_dir, 'last_checkpoint')
    if osp.isfile(record):
        with open(record, errors='replace') as f:
            named = f.read().strip() or None
    folders = [work_dir] + ([osp.dirname(named)] if named and osp.dirname(named) else [])
    numbered = {}
    for folder in folders:
        if not osp.isdir(folder):
            continue
        for name in os.listdir(folder):
            m = _CHECKPOINT_NAME.match(name)
            if m:
                numbered[osp.join(folder, name)] = (m.group(1), int(m.group(2)))
    kind_first = numbered.get(named, ('iter' if named and 'iter_' in osp.basename(named)
                                      else 'epoch', 0))[0]
    ordered = sorted(numbered, key=lambda p: (numbered[p][0] == kind_first, numbered[p][1]),
                     reverse=True)
    if named:
        ordered = [named] + [p for p in ordered if osp.abspath(p) != osp.abspath(named)]
    return ordered, record if named else None


def _remove_partial_writes(work_dir):
    for name in os.listdir(work_dir):
        if _TEMP_NAME.match(name):
            try:
                os.remove(osp.join(work_dir, name))
            except FileNotFoundError:   # another rank of a shared work dir removed it first
                continue
            print_log(f'removed {name}: the partial write of a checkpoint interrupted by the '
                      f'end of the previous run', logger='current', level=30)


_TRUST_HINT = ('set EFFB_TRUST_CHECKPOINTS=1 to load it with weights_only=False (e.g. a '
               'checkpoint written by mmengine without our hooks, which pickles bound methods)')


def load_local_checkpoint(filename, map_location):
    """mmengine's local loader during our runs (:mod:`.run_patches`): our checked, weights-only
    reader; ``EFFB_TRUST_CHECKPOINTS=1`` is its ``allow_unsafe``."""
    filename = os.path.expanduser(filename)
    if not os.path.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')   # mmengine's message
    return load_checkpoint_file(
        filename, map_location, allow_unsafe=os.environ.get('EFFB_TRUST_CHECKPOINTS') == '1',
        unsafe_hint=_TRUST_HINT)


def find_resumable_checkpoint(work_dir, load=None):
    """The newest checkpoint of ``work_dir`` that loads, or None when there is none at all.

    ``load(path)`` reads a checkpoint (default: our checked reader, as mmengine's loader is
    during our runs: the file format and the tensors' finiteness are checked). Damaged
    checkpoints are reported and passed over; when every one is damaged,
    :class:`~effbackbones.CheckpointError` lists them instead of silently training from scratch.
    """
    if load is None:
        def load(p):
            return load_local_checkpoint(p, map_location='cpu')

    if not osp.isdir(work_dir):
        return None
    _remove_partial_writes(work_dir)
    candidates, record = _candidates(work_dir)
    if not candidates:
        print_log(f'no checkpoint to resume from in {work_dir}', logger='current')
        return None
    damaged = []
    for path in candidates:
        if not osp.isfile(path):
            reason = 'the file does not exist'
        else:
            try:
                load(path)
            except Exception as exc:  # noqa: BLE001  (any failure to load disqualifies it)
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            else:
                if damaged:
                    print_log(f'resuming from {path}, the newest checkpoint that loads',
                              logger='current', level=30)
                return path
        source = f' (named by {record})' if record and path == candidates[0] else ''
        print_log(f'cannot resume from {path}{source}: {reason}. Trying the previous '
                  f'checkpoint.', logger='current', level=30)
        damaged.append(f'{path}: {reason}')
    raise CheckpointError(f'no checkpoint in {work_dir} can be resumed from:\n  ' +
                          '\n  '.join(damaged))
