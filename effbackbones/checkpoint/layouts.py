"""Checkpoint layouts: unwrapping, prefixes, the renaming rules every family's
``checkpoint_filter_fn`` is built on, and which modules are effbackbones backbones."""
import re
from collections import OrderedDict

import torch

from .errors import CheckpointError

WRAPPER_KEYS = ('state_dict', 'model', 'state_dict_ema', 'model_ema', 'module')
_STRIP_PREFIXES = ('module.', 'backbone.', 'model.')
#: first components of the neck / head keys of mmdet / mmseg models
_TASK_PREFIXES = ('neck.', 'decode_head.', 'auxiliary_head.', 'rpn_head.', 'roi_head.',
                  'bbox_head.')


def _is_state_dict(obj):
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())


def unwrap_state_dict(ckpt):
    """Return ``(state_dict, wrapper)`` for a raw or wrapped checkpoint.

    Accepts ``{'model': sd}`` (EfficientFormer, SwiftFormer, LeViT releases), ``{'state_dict': sd}``
    (timm checkpoint saver, mmengine), ``{'state_dict_ema': sd}`` and a raw ``sd``.
    """
    if _is_state_dict(ckpt):
        return OrderedDict(ckpt), 'raw'
    if isinstance(ckpt, dict):
        for key in WRAPPER_KEYS:
            if key in ckpt and isinstance(ckpt[key], dict):
                tensors = OrderedDict((k, v) for k, v in ckpt[key].items() if torch.is_tensor(v))
                if tensors:
                    return tensors, key
        tensors = OrderedDict((k, v) for k, v in ckpt.items()
                              if isinstance(k, str) and torch.is_tensor(v))
        if tensors:
            return tensors, 'raw'
    raise CheckpointError(
        'the checkpoint holds no tensors under any of the keys '
        f"{', '.join(WRAPPER_KEYS)} nor at its top level (top-level keys: "
        f"{sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__}).")


def strip_prefix(state_dict, prefix=None):
    """Keep the keys under ``prefix`` (given), or strip the usual wrapper prefixes (auto)."""
    if prefix:
        if not prefix.endswith('.'):
            prefix += '.'
        out = OrderedDict((k[len(prefix):], v) for k, v in state_dict.items()
                          if k.startswith(prefix))
        if not out:
            raise CheckpointError(f'no key of the checkpoint starts with prefix {prefix!r}')
        return out
    changed = True
    while changed:
        changed = False
        for p in _STRIP_PREFIXES:
            if state_dict and all(k.startswith(p) for k in state_dict):
                state_dict = OrderedDict((k[len(p):], v) for k, v in state_dict.items())
                changed = True
        # mmdet/mmseg detector checkpoints: keep the backbone part
        if any(k.startswith('backbone.') for k in state_dict) and \
                any(k.startswith(_TASK_PREFIXES) for k in state_dict):
            state_dict = OrderedDict((k[len('backbone.'):], v) for k, v in state_dict.items()
                                     if k.startswith('backbone.'))
            changed = True
    return state_dict


class LayoutDict(OrderedDict):
    """An OrderedDict that remembers which source layout a converter recognised."""

    def __init__(self, *args, layout='native', **kwargs):
        super().__init__(*args, **kwargs)
        self.layout = layout


def rename_keys(state_dict, rules, layout, value_rules=()):
    """The one layout converter every family's ``checkpoint_filter_fn`` is built on (timm style).

    Every ``(regex, replacement)`` of ``rules`` is applied, in order, to every key
    (``re.sub``; a replacement may be a string with groups or a callable), so a family states
    its layout as an ordered list of renames: prefix moves first, then the names inside blocks.
    Then each ``(regex, fn)`` of ``value_rules`` whose regex matches the *new* key maps the
    tensor (``fn(tensor) -> tensor``; e.g. an official ``(C, 1, 1)`` layer scale -> ``(C,)``).
    Returns a :class:`LayoutDict` tagged with ``layout``.
    """
    compiled = [(re.compile(p), r) for p, r in rules]
    value_compiled = [(re.compile(p), fn) for p, fn in value_rules]
    out = LayoutDict(layout=layout)
    for k, v in state_dict.items():
        for pat, rep in compiled:
            k = pat.sub(rep, k)
        for pat, fn in value_compiled:
            if pat.search(k):
                v = fn(v)
        out[k] = v
    return out


def reject_dense_tables(state_dict, model):
    """The policy for dense bias tables under ``bias_mode='pretrained'`` (v1 and V2 alike).

    A file with ``attention_biases_seg`` tables comes from the official dense code, where those
    tables are the biases the rest of the network was trained with and the ImageNet tables
    ``attention_biases`` are unused placeholders (zeros, or the ImageNet values never updated).
    Loading such a file in ``'pretrained'`` mode would pair the dense-trained weights with
    biases they never saw and give quietly worse features, so it is an error that names the
    mode to use, rather than a silent drop of the tables.
    """
    if getattr(model, 'bias_mode', None) != 'pretrained':
        return
    seg = [k for k in state_dict if k.endswith('attention_biases_seg')]
    if seg:
        raise CheckpointError(
            f'this checkpoint holds the dense bias tables of the official dense backbone '
            f'({len(seg)} x attention_biases_seg, e.g. {seg[0]}), which its other weights were '
            f"trained with; bias_mode='pretrained' would use the unused ImageNet tables "
            f"attention_biases instead. Load it with {type(model).__name__}(bias_mode="
            f"'official').")


def is_effbackbones_backbone(obj):
    """True for an effbackbones backbone class or instance: a family built on
    ``models.base.BaseDenseBackbone``, which has an architecture table (``arch_zoo``) and a
    layout converter (``checkpoint_filter_fn``). Told by those class attributes, the same for a
    class and an instance, because the models import this package."""
    cls = obj if isinstance(obj, type) else type(obj)
    return bool(getattr(cls, 'arch_zoo', None)) and callable(
        getattr(cls, 'checkpoint_filter_fn', None))


def effbackbones_modules(model):
    """``[(prefix, module)]`` of every effbackbones backbone inside ``model`` (e.g.
    ``('backbone.', EfficientFormer)`` in a Mask R-CNN; ``('', model)`` for a bare backbone)."""
    return [(name + '.' if name else '', m) for name, m in model.named_modules()
            if is_effbackbones_backbone(m)]


def dataset_meta_from(meta):
    """``meta['dataset_meta']`` (mmengine) or one built from mmdet 2.x / mmseg 0.x's
    ``meta['CLASSES']`` / ``meta['PALETTE']``; ``None`` when the file names no classes."""
    meta = meta or {}
    if isinstance(meta.get('dataset_meta'), dict):
        return dict(meta['dataset_meta'])
    if meta.get('CLASSES') is None:
        return None
    out = dict(classes=tuple(meta['CLASSES']))
    if meta.get('PALETTE') is not None:
        out['palette'] = [tuple(c) for c in meta['PALETTE']]
    return out
