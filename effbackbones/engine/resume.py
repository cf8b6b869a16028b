"""Exact resume: a run killed at any moment and resumed from its last checkpoint ends with the
same weights, bit for bit, as the run that was never interrupted.

mmengine restores the weights, optimizer, schedulers and message hub, but the random streams and
the data position were lost: the worker processes restart with their initial seeds, persistent
workers had advanced theirs, an epoch-based loop restarts a half-done epoch from its first batch,
and the iteration-based loop re-loads (and re-augments) every batch it skips. This hook makes every
random draw a function of *where* training is, not of what happened before:

* **Model side** (dropout, drop path, RoI / pixel samplers...): at the start of training
  iteration ``i`` the Python, NumPy and torch (CPU and CUDA) generators are seeded from
  ``(seed, i)``. Whatever draws random numbers between two steps (validation, an iterator being
  created, hooks) cannot shift the stream, and nothing per rank has to be gathered into rank 0's
  checkpoint: the state is determined by the seed and iteration that mmengine already saves.
* **Data side** (random flip, resize, crop... in worker processes or in the main process): each
  sample is loaded with the generators seeded from ``(seed, rank, pass, batch, slot)``, so its
  augmentation does not depend on which worker loads it, on how many samples that worker loaded
  before (persistent or not), or on ``num_workers``.
* **Data position**: the batch sampler starts the resumed pass at the first batch not yet trained,
  without loading the skipped ones (epoch-based loops resumed mid-epoch, and iteration-based loops
  which otherwise load every already-trained batch again); ``batch_idx`` stays that of the
  uninterrupted run.

Checkpoints record what the data position depends on (seed, world size, batches per pass, sampler
seed) and a resume warns when one of them changed, since the continuation then cannot be exact.
"""
import functools
import random
import types

import numpy as np
import torch
from mmengine.dataset import InfiniteSampler
from mmengine.dist import get_rank, get_world_size
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.runner.loops import (EpochBasedTrainLoop, IterBasedTrainLoop,
                                   _InfiniteDataloaderIterator)

from ..registry import HOOKS
from .run_patches import RunPatchesMixin

# Domain tags keep the step streams and the sample streams apart.
_STEP_STREAM = 0x5EED
_SAMPLE_STREAM = 0xDA7A
_META_KEY = 'exact_resume'
_FORMAT_VERSION = 1
_NOT_RECORDED = 'not recorded'


def _seed_words(*key):
    """128 well-mixed bits from integer ``key`` (NumPy's SeedSequence hashing)."""
    return np.random.SeedSequence([int(k) % 2**64 for k in key]).generate_state(4)


def seed_generators(*key):
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and CUDA) from ``key``."""
    words = _seed_words(*key)
    random.seed(int.from_bytes(words.tobytes(), 'little'))
    np.random.seed(words)
    torch_seed = int(words[0]) | int(words[1]) << 32
    # torch.manual_seed would do both, but probes every device type: ~0.25 ms a call on CPU
    torch.default_generator.manual_seed(torch_seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(torch_seed)


class SeededBatch(list):
    """The dataset indices of one batch plus the key its samples' random streams come from."""

    def __init__(self, indices, seed_key):
        super().__init__(indices)
        self.seed_key = seed_key


def _load_seeded(dataset, indices):
    """``dataset.__getitems__`` while exact resume is on: one seeded stream per sample."""
    key = getattr(indices, 'seed_key', None)
    if key is None:
        return [dataset[i] for i in indices]
    samples = []
    for slot, index in enumerate(indices):
        seed_generators(_SAMPLE_STREAM, *key, slot)
        samples.append(dataset[index])
    return samples


class _DataPosition:
    """Where the next pass over the batch sampler starts: its number and the batches to skip."""

    def __init__(self, seed, rank):
        self.seed = seed
        self.rank = rank
        self.next_pass = 0
        self.skip = 0

    def start_pass(self):
        number, skip = self.next_pass, self.skip
        self.next_pass += 1
        self.skip = 0
        return number, skip


def _positioned_class(cls):
    """A subclass of the train loader's batch sampler class (the loader does not let its
    sampler be replaced, so the instance changes class): numbers the batches, skips the trained
    ones, tags the rest with their seed key."""

    def __iter__(self):
        position = self._effb_position
        number, skip = position.start_pass()
        # mmdet's AspectRatioBatchSampler keeps half-filled buckets between passes; a pass that
        # an earlier iterator started and abandoned must not leak into this one.
        buckets = getattr(self, '_aspect_ratio_buckets', None)
        if buckets is not None:
            self._aspect_ratio_buckets = [[] for _ in buckets]
        for batch_index, batch in enumerate(cls.__iter__(self)):
            if batch_index >= skip:
                yield SeededBatch(batch, (position.seed, position.rank, number, batch_index))

    return type(cls.__name__, (cls,), {'__iter__': __iter__, '__module__': cls.__module__,
                                       '_effb_positioned': True})


def _position_batches(batch_sampler, position):
    if not getattr(batch_sampler, '_effb_positioned', False):
        batch_sampler.__class__ = _positioned_class(type(batch_sampler))
    batch_sampler._effb_position = position


def _index_sampler(loader):
    return getattr(loader.batch_sampler, 'sampler', None)


class _TrainedBatchesSkipped:
    """Stands in for mmengine's loader iterator while ``IterBasedTrainLoop.run`` advances past the
    batches trained before the resume: those calls return nothing and load nothing, because the
    batch sampler already starts after them."""

    def __init__(self, iterator, trained):
        self._iterator = iterator
        self._trained = trained

    def __iter__(self):
        return self

    def __next__(self):
        if self._trained:
            self._trained -= 1
            return None
        return next(self._iterator)


def _run_epoch_from(loop, first_batch):
    """``EpochBasedTrainLoop.run_epoch`` for the epoch a resume lands in: its batches keep their
    indices (``batch_idx`` of hooks and logs); later epochs use the class's method again."""

    def run_epoch(self):
        del self.run_epoch          # back to EpochBasedTrainLoop.run_epoch for the next epochs
        self.runner.call_hook('before_train_epoch')
        self.runner.model.train()
        for idx, data_batch in enumerate(self.dataloader, start=first_batch):
            self.run_iter(idx, data_batch)
        self.runner.call_hook('after_train_epoch')
        self._epoch += 1

    loop.run_epoch = types.MethodType(run_epoch, loop)


def _shut_down(iterator):
    stop = getattr(iterator, '_shutdown_workers', None)
    if stop is not None:
        stop()


@HOOKS.register_module()
class ExactResumeHook(RunPatchesMixin, Hook):
    """Make ``--resume`` continue a run exactly (see the module docstring).

    Add it to ``custom_hooks`` (our task bases do): works with mmengine's
    ``EpochBasedTrainLoop`` and ``IterBasedTrainLoop`` (and subclasses that keep their
    ``run``), any ``num_workers``, persistent workers or not, any batch sampler that yields lists
    of indices (mmdet's ``AspectRatioBatchSampler`` included). To resume mid-epoch in an
    epoch-based run, also save checkpoints every N iterations
    (``default_hooks.checkpoint=dict(by_epoch=False, interval=N)``).

    From ``before_run`` to ``after_run`` it holds the run patches
    (:mod:`~effbackbones.engine.run_patches`): atomic checkpoint writes, auto-resume past a
    damaged file, data-only ``HistoryBuffer`` pickling and the checked loader.
    """
    # Seeds the step's generators before any other hook's before_train_iter runs.
    priority = 'VERY_HIGH'

    def __init__(self):
        self._position = None
        self._resumed_from = None

    # -- checkpoints ---------------------------------------------------------------------------
    def _record(self, runner):
        loader = runner.train_loop.dataloader
        sampler = _index_sampler(loader)
        return dict(version=_FORMAT_VERSION, seed=runner.seed, world_size=get_world_size(),
                    batches_per_pass=len(loader), sampler_seed=getattr(sampler, 'seed', None))

    def before_save_checkpoint(self, runner, checkpoint):
        checkpoint.setdefault('meta', {})[_META_KEY] = self._record(runner)

    def after_load_checkpoint(self, runner, checkpoint):
        self._resumed_from = checkpoint.get('meta', {}).get(_META_KEY, _NOT_RECORDED)

    def _check_resumed_record(self, runner):
        saved, self._resumed_from = self._resumed_from, None
        if saved is None or runner.iter == 0:
            return                                        # a fresh run (or weights-only load)
        if saved == _NOT_RECORDED:
            print_log('ExactResumeHook: the resumed checkpoint was written without this hook; '
                      'training continues from it, but the random streams and data order before '
                      'it differ from what this hook gives, so the result is not the one of an '
                      'uninterrupted run with the hook.', logger='current', level=30)
            return
        now = self._record(runner)
        sampler = _index_sampler(runner.train_loop.dataloader)
        if saved.get('sampler_seed') is not None and hasattr(sampler, 'seed') and \
                sampler.seed != saved['sampler_seed']:
            # a sampler seed drawn at start-up (randomness.diff_rank_seed=True): keep the order
            sampler.seed = saved['sampler_seed']
            now['sampler_seed'] = sampler.seed
        changed = [f'{k}: {saved.get(k)} -> {now[k]}' for k in ('seed', 'world_size',
                                                                  'batches_per_pass')
                   if saved.get(k) != now[k]]
        if changed:
            print_log('ExactResumeHook: the run changed since the checkpoint (' +
                      ', '.join(changed) + '); it resumes, but cannot reproduce the '
                      'uninterrupted run.', logger='current', level=30)

    # -- training ------------------------------------------------------------------------------
    def before_train(self, runner):
        loop = runner.train_loop
        loader = loop.dataloader
        if loader.batch_sampler is None:
            raise TypeError('ExactResumeHook needs a train dataloader with a batch sampler '
                            '(batch_size set); this one yields single samples')
        self._check_resumed_record(runner)
        self._position = _DataPosition(runner.seed, get_rank())
        _position_batches(loader.batch_sampler, self._position)
        loader.dataset.__getitems__ = functools.partial(_load_seeded, loader.dataset)

        done = runner.iter
        if isinstance(loop, EpochBasedTrainLoop):
            per_epoch = len(loader)
            skip = done - runner.epoch * per_epoch
            if not 0 <= skip <= per_epoch:
                raise RuntimeError(
                    f'ExactResumeHook: the checkpoint is at iteration {done} of epoch '
                    f'{runner.epoch}, which does not fit {per_epoch} batches per epoch: the '
                    f'dataset or batch size changed since it was written')
            self._position.skip = skip
            if skip and type(loop).run_epoch is EpochBasedTrainLoop.run_epoch:
                _run_epoch_from(loop, skip)
            where = f'epoch {runner.epoch + 1}, batch {skip} of {per_epoch}'
        elif isinstance(loop, IterBasedTrainLoop):
            sampler = _index_sampler(loader)
            if isinstance(sampler, InfiniteSampler):
                number, skip = 0, done
                sampler.indices = sampler._indices_of_rank()   # restart its single stream
            else:
                number, skip = divmod(done, len(loader))
                if hasattr(sampler, 'set_epoch'):
                    sampler.set_epoch(number)
            self._position.next_pass, self._position.skip = number, skip
            self._restart_iterator(loop, loader, number, done)
            where = f'pass {number} over the data, batch {skip}'
        else:
            raise TypeError(f'ExactResumeHook supports EpochBasedTrainLoop and '
                            f'IterBasedTrainLoop (or subclasses), not {type(loop).__name__}')
        if done:
            print_log(f'ExactResumeHook: resuming at iteration {done} ({where}); the trained '
                      f'batches are skipped without loading them', logger='current')

    @staticmethod
    def _restart_iterator(loop, loader, pass_number, trained):
        """The loop made its loader iterator when it was built: its workers (persistent ones
        included) started before the dataset loaded seeded samples, and it began at batch 0."""
        old = getattr(loop.dataloader_iterator, '_iterator', None)
        loop.dataloader_iterator = None
        if getattr(loader, '_iterator', None) is not None:     # persistent workers
            _shut_down(loader._iterator)
            loader._iterator = None
        _shut_down(old)
        iterator = _InfiniteDataloaderIterator(loader)
        iterator._epoch = pass_number
        loop.dataloader_iterator = (_TrainedBatchesSkipped(iterator, trained) if trained
                                    else iterator)

    def before_train_epoch(self, runner):
        if isinstance(runner.train_loop, EpochBasedTrainLoop):
            self._position.next_pass = runner.epoch

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        seed_generators(_STEP_STREAM, runner.seed, runner.iter)
