"""Checked whole-model loading for mmengine runners (``load_from``, ``tools/test.py``)."""
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

from ..checkpoint import CheckpointError, convert_model_checkpoint
from ..registry import HOOKS
from .run_patches import RunPatchesMixin


@HOOKS.register_module()
class StrictLoadHook(RunPatchesMixin, Hook):
    """Convert a loaded checkpoint to the model's layout and refuse partial loads.

    mmengine's ``Runner.load_checkpoint`` (``load_from``, ``tools/test.py CONFIG FILE``, and
    ``--resume``) reads the file, calls ``after_load_checkpoint(runner, checkpoint)`` on every
    hook, then loads ``checkpoint['state_dict']`` with ``strict=False``: tensors that do not fit
    only give the warning "The model and loaded state dict do not match exactly" and stay random.
    This hook (priority ``VERY_HIGH``: before e.g. ``EMAHook`` reads the weights) replaces the checkpoint's content, in
    place, with :func:`effbackbones.checkpoint.convert_model_checkpoint`'s result: the
    backbone part of an official released dense file (mmdet 2.x Mask R-CNN / mmseg 0.x Semantic
    FPN, ``meta.CLASSES``) is converted to our layout, the load report is logged, and missing,
    unexpected or shape-mismatched tensors are a ``CheckpointError`` naming them. Our own
    mmengine checkpoints pass through unchanged (resume keeps its optimizer and message hub).

    The class names the file was trained with (``meta.dataset_meta`` / mmdet 2's
    ``meta.CLASSES``) are compared with those of the runner's dataset: the same names in another
    order is an error with ``strict`` (every class would be scored as another one); other
    differences (renamed or other classes, e.g. fine-tuning on a new dataset) are a warning.

    From ``before_run`` to ``after_run`` it holds the run patches
    (:mod:`~effbackbones.engine.run_patches`: mmengine's local loader reads through our checked,
    weights-only reader). Our configs add it (``configs/_base_`` task files);
    ``tools/train.py`` / ``tools/test.py`` add it to any config that lacks it. ``strict=False`` (``--load-not-strict``) turns the
    errors into warnings and leaves mismatched tensors out.
    """
    priority = 'VERY_HIGH'

    def __init__(self, strict=True):
        self.strict = strict

    def after_load_checkpoint(self, runner, checkpoint):
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        new, _ = convert_model_checkpoint(model, checkpoint, strict=self.strict,
                                          name=str(getattr(runner, '_load_from', None)
                                                   or '<checkpoint>'))
        checkpoint.clear()
        checkpoint.update(new)
        self._check_classes(runner, (new['meta'].get('dataset_meta') or {}).get('classes'))

    def _check_classes(self, runner, file_classes):
        ours = _dataset_classes(runner)
        if not file_classes or not ours or tuple(file_classes) == ours:
            return
        file_classes = tuple(file_classes)
        first = next((i for i, (a, b) in enumerate(zip(file_classes, ours)) if a != b),
                     min(len(file_classes), len(ours)))
        msg = (f'the checkpoint was trained with {len(file_classes)} classes and the dataset '
               f'has {len(ours)}; they first differ at index {first}: '
               f'{file_classes[first:first + 3]} (file) vs {ours[first:first + 3]} (dataset)')
        if sorted(file_classes) == sorted(ours) and self.strict:
            raise CheckpointError(f'{msg}. Same classes in another order: every prediction '
                                  f'would be scored as another class. Set the dataset '
                                  f"metainfo=dict(classes=...) in the file's order.")
        runner.logger.warning(msg)


def _dataset_classes(runner):
    """Class names of the dataset the runner is about to use (built loops only)."""
    for attr in ('_test_loop', '_val_loop', '_train_loop'):
        loop = getattr(runner, attr, None)
        dataset = getattr(getattr(loop, 'dataloader', None), 'dataset', None)
        classes = (getattr(dataset, 'metainfo', None) or {}).get('classes')
        if classes:
            return tuple(classes)
    return None
