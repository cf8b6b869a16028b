"""Checked whole-model loading for mmengine runners (``load_from``, ``tools/test.py``)."""
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

from ..checkpoint import convert_model_checkpoint
from ..registry import HOOKS


@HOOKS.register_module()
class StrictLoadHook(Hook):
    """Convert a loaded checkpoint to the model's layout and refuse partial loads.

    mmengine's ``Runner.load_checkpoint`` (``load_from``, ``tools/test.py CONFIG FILE``, and
    ``--resume``) reads the file, calls ``after_load_checkpoint(runner, checkpoint)`` on every
    hook, then loads ``checkpoint['state_dict']`` with ``strict=False``: tensors that do not fit
    only give the warning "The model and loaded state dict do not match exactly" and stay random.
    This hook runs first (priority ``VERY_HIGH``) and replaces the checkpoint's content, in
    place, with :func:`effbackbones.checkpoint.convert_model_checkpoint`'s result: the
    backbone part of an official released dense file (mmdet 2.x Mask R-CNN / mmseg 0.x Semantic
    FPN, ``meta.CLASSES``) is converted to our layout, the load report is logged, and missing,
    unexpected or shape-mismatched tensors are a ``CheckpointError`` naming them. Our own
    mmengine checkpoints pass through unchanged (resume keeps its optimizer and message hub).

    Our configs add it (``configs/_base_`` task files); ``tools/train.py`` / ``tools/test.py``
    add it to any config that lacks it. ``strict=False`` (``--load-not-strict``) turns the
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
