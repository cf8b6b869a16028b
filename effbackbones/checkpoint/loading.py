"""Loading into models that hold effbackbones backbones, loudly, at every door.

Three entry points share one conversion (the family's ``checkpoint_filter_fn``) and one
compare-and-report step (:mod:`.report`):

* :func:`load_pretrained` -- ``init_cfg=dict(type='Pretrained', checkpoint=PATH)`` ->
  ``backbone.init_weights()``: reads the file (:func:`~.files.load_checkpoint_file`), unwraps it,
  strips ``module.`` / ``backbone.`` prefixes (or keeps an explicit ``prefix``), converts,
  compares, logs a one-screen report and refuses shape mismatches, an empty match and (with
  ``strict``) missing or unknown backbone tensors.
* :func:`convert_model_checkpoint` -- a whole detector / segmentor file (``load_from``,
  ``tools/test.py``, ``tools/convert_checkpoint.py --config``; ``effbackbones.StrictLoadHook``
  applies it inside mmengine runners): each backbone part converted, the rest kept, anything
  that does not fit the model named in an error.
* :func:`convert_backbone_part` -- a ``load_state_dict`` pre-hook of every backbone, so the
  ecosystem's own doors (``model.load_state_dict``, mmengine's ``load_checkpoint`` /
  ``load_state_dict``, and through them mmdet's ``init_detector`` / ``DetInferencer`` and
  mmseg's ``init_model`` / ``MMSegInferencer``) convert the backbone part of an official / timm
  file and raise :class:`CheckpointError` when it holds the backbone partly or another variant,
  even where those APIs load with ``strict=False``. The explicit opt-out is
  :func:`partial_loads`.
"""
import contextlib
import contextvars
import os
from collections import OrderedDict

from mmengine.logging import print_log

from .errors import CheckpointError
from .files import check_finite, load_checkpoint_file
from .layouts import dataset_meta_from, effbackbones_modules, strip_prefix, unwrap_state_dict
from .report import compare_state_dicts, names, report_text

_PARTIAL_LOADS = contextvars.ContextVar('effbackbones_partial_loads', default=False)


@contextlib.contextmanager
def partial_loads():
    """The explicit opt-out of the load check at the ecosystem's doors: inside this context a
    state dict that holds a backbone only partly, or another variant's tensors, loads what fits
    (with a warning naming the rest, which keeps its current values) instead of raising."""
    token = _PARTIAL_LOADS.set(True)
    try:
        yield
    finally:
        _PARTIAL_LOADS.reset(token)


def _family(backbone):
    return f'{type(backbone).__name__}(arch={backbone.arch_name!r})'


def _mismatch_hint(comparison):
    tables = [k for k, _, _ in comparison.mismatched if k.endswith('attention_biases_seg')]
    if len(tables) < len(comparison.mismatched):
        return 'Is it a checkpoint of another variant? Pick the arch the file was trained with.'
    return ('Only the dense attention-bias tables differ: the file was trained on another bias '
            'grid. Set bias_grid to its grid (25: COCO detection releases, 16: ADE20K '
            'segmentation releases), i.e. use the config of that task.')


def _compare_backbone(backbone, converted):
    own = backbone.state_dict()
    return own, compare_state_dicts(converted, own, backbone.ignored_key_patterns,
                                     backbone.new_key_patterns)


def _refuse(backbone, comparison, text, strict, opt_out):
    """The backbone loaders' one policy: what is an error (see :func:`load_pretrained`)."""
    family = _family(backbone)
    if comparison.mismatched:
        raise CheckpointError(f'{text}\nThe checkpoint does not fit {family}: '
                              f'{len(comparison.mismatched)} tensors have other shapes. '
                              f'{_mismatch_hint(comparison)}')
    if not comparison.matched:
        raise CheckpointError(f'{text}\nNothing in the checkpoint matches {family}: it is not a '
                              f'checkpoint of this family (or needs prefix=... in init_cfg).')
    if strict and (comparison.missing or comparison.unexpected):
        raise CheckpointError(
            f'{text}\nThe checkpoint only partly fits {family}: {len(comparison.missing)} '
            f'backbone tensors would stay random ({names(comparison.missing)}) and '
            f'{len(comparison.unexpected)} tensors of the file are unknown '
            f'({names(comparison.unexpected)}). Check the arch/variant; {opt_out}.')


def _complete(converted, comparison, own):
    """The matched tensors of ``converted`` plus the model's current values for every other
    tensor of ``own``: a state dict that loads whole (what is not in the file stays as it is)."""
    out = OrderedDict((k, converted[k]) for k in comparison.matched)
    for k, v in own.items():
        out.setdefault(k, v)
    return out


def load_pretrained(model, checkpoint, prefix=None, strict=True, allow_unsafe=False,
                    map_location='cpu', logger='current'):
    """Load ``checkpoint`` (path or dict) into the backbone ``model`` through its family's filter.

    ``model`` provides ``checkpoint_filter_fn(state_dict) -> state_dict`` (our key layout), and
    class attributes ``new_key_patterns`` (tensors a classification checkpoint cannot provide,
    e.g. output norms) and ``ignored_key_patterns`` (head / final-norm tensors of a
    classification checkpoint, applied after conversion). Shape mismatches (another variant)
    and an empty match (another model) are errors; so are backbone tensors missing from the file
    and tensors the backbone does not know, unless ``strict=False`` (then warnings: missing
    tensors keep their current values). Returns the report as a dict.
    """
    name = '<state_dict>' if isinstance(checkpoint, dict) else os.fspath(checkpoint)
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint_file(
        checkpoint, map_location, allow_unsafe)
    state_dict, wrapper = unwrap_state_dict(ckpt)
    state_dict = strip_prefix(state_dict, prefix)
    converted = model.checkpoint_filter_fn(state_dict)
    layout = getattr(converted, 'layout', None) or 'native'
    own, comparison = _compare_backbone(model, converted)
    text = report_text(
        f'[{type(model).__name__} {model.arch_name}] loading {name}: wrapper={wrapper!r}, '
        f'layout={layout}, {len(state_dict)} tensors in the file',
        f'{len(comparison.matched)}/{len(own)} backbone tensors', comparison, mismatch_limit=5)
    _refuse(model, comparison, text, strict,
            'pass strict=False in init_cfg to load the matching part anyway')
    model.load_state_dict(_complete(converted, comparison, own), strict=True)
    level = 30 if comparison.problems else 20
    print_log(text, logger=logger, level=level)
    model.after_load_pretrained()
    return dict(vars(comparison), wrapper=wrapper, layout=layout, text=text)


# ------------------------------------------------------------------------------------------
# the load_state_dict door
# ------------------------------------------------------------------------------------------
def _backbone_part(state_dict, prefix):
    """``(keys of state_dict that belong to the backbone, the part under our names)``. A
    backbone loaded on its own (``prefix=''``) takes the whole dict, unwrapped (``{'model':
    sd}`` of an official ImageNet file) and with a detector's ``backbone.`` part picked out."""
    if prefix:
        keys = [k for k in state_dict if k.startswith(prefix)]
        return keys, OrderedDict((k[len(prefix):], state_dict[k]) for k in keys)
    keys = list(state_dict)
    if not keys:
        return keys, OrderedDict()
    return keys, strip_prefix(unwrap_state_dict(dict(state_dict))[0])


def _no_backbone_tensors(backbone, prefix):
    """The one ambiguous case: a state dict without a single tensor of the backbone (e.g.
    heads only). A backbone whose weights already came from a file keeps them; one that holds
    only its random initialisation would be used random: an error, unless opted out."""
    where = f'at {prefix!r}' if prefix else ''
    if getattr(backbone, 'weights_loaded', False):
        print_log(f'{_family(backbone)} {where}: the loaded state dict holds no backbone '
                  f'tensor; the backbone keeps the weights it loaded before', logger='current')
        return
    if _PARTIAL_LOADS.get():
        print_log(f'{_family(backbone)} {where}: the loaded state dict holds no backbone tensor; '
                  f'the backbone keeps its random initialisation (partial_loads)',
                  logger='current', level=30)
        return
    raise CheckpointError(
        f'the state dict loaded into a model with {_family(backbone)} {where} holds no tensor '
        f'of that backbone, which has not loaded weights before: it would run with random '
        f'weights. Load a file that holds the backbone, load the backbone first '
        f"(init_cfg=dict(type='Pretrained', checkpoint=...) and init_weights()), or opt out "
        f'explicitly: with effbackbones.checkpoint.partial_loads(): ...')


def convert_backbone_part(backbone, state_dict, prefix=''):
    """Convert, check and rewrite, in place, the part of ``state_dict`` under ``prefix`` that
    ``backbone`` is about to load (a ``load_state_dict`` pre-hook of every backbone).

    The part goes through the family's ``checkpoint_filter_fn`` (official / timm / ours), then
    :func:`~.report.compare_state_dicts`: a shape mismatch (another variant), no match at all,
    a backbone tensor missing from the file or a tensor the backbone does not know is a
    :class:`CheckpointError` with the report, whatever ``strict`` the caller passed, unless
    inside :func:`partial_loads`; NaN / Inf in the part is always one. Classification-only
    tensors (head, final norm) are dropped; tensors a classification file cannot have (output
    norms) keep their current values. A state dict without any backbone tensor: see
    :func:`_no_backbone_tensors`.
    """
    keys, part = _backbone_part(state_dict, prefix)
    if not part:
        return _no_backbone_tensors(backbone, prefix)
    converted = backbone.checkpoint_filter_fn(part)
    layout = getattr(converted, 'layout', None) or 'native'
    own, comparison = _compare_backbone(backbone, converted)
    check_finite(OrderedDict((k, converted[k]) for k in comparison.matched),
                 f'the state dict loaded into {_family(backbone)}')
    text = report_text(
        f'[{_family(backbone)}] load_state_dict at {prefix or "<root>"!r}: {layout} layout, '
        f'{len(part)} backbone tensors in the state dict',
        f'{len(comparison.matched)}/{len(own)} backbone tensors', comparison,
        exact=('missing', 'unexpected'))
    if not _PARTIAL_LOADS.get():
        _refuse(backbone, comparison, text, strict=True,
                opt_out='to load the matching part anyway, opt out explicitly: with '
                        'effbackbones.checkpoint.partial_loads(): ...')
    for k in keys:
        del state_dict[k]
    state_dict.update((prefix + k, v) for k, v in _complete(converted, comparison, own).items())
    if comparison.problems or layout != 'native' or comparison.new or comparison.ignored:
        print_log(text, logger='current', level=30 if comparison.problems else 20)
    backbone.weights_loaded = True


def load_state_dict_pre_hook(backbone, state_dict, prefix, local_metadata, strict,
                             missing_keys, unexpected_keys, error_msgs):
    """``torch.nn.Module._register_load_state_dict_pre_hook(..., with_module=True)`` form of
    :func:`convert_backbone_part`."""
    convert_backbone_part(backbone, state_dict, prefix)


# ------------------------------------------------------------------------------------------
# whole models (detector / segmentor checkpoints)
# ------------------------------------------------------------------------------------------
def _split_backbone_parts(state_dict, backbones):
    """``(order, parts)``: the file's order of keys (a key of the rest, or the index of a
    backbone part) and each backbone's part under its own names."""
    parts = [OrderedDict() for _ in backbones]
    order = []
    for k, v in state_dict.items():
        owner = next((i for i, (p, _) in enumerate(backbones) if k.startswith(p)), None)
        if owner is None:
            order.append(k)             # neck / heads: mmdet 2 / mmseg 0 names are ours
            continue
        if not parts[owner]:
            order.append(owner)
        parts[owner][k[len(backbones[owner][0]):]] = v
    return order, parts


def _convert_parts(state_dict, backbones):
    """``(converted state dict, ignored patterns, layout descriptions)`` for a whole model."""
    order, parts = _split_backbone_parts(state_dict, backbones)
    converted, ignored_patterns, layouts = OrderedDict(), [], []
    for prefix, bb in backbones:
        ignored_patterns += [prefix + p for p in bb.ignored_key_patterns]
    for item in order:
        if isinstance(item, str):
            converted[item] = state_dict[item]
            continue
        prefix, bb = backbones[item]
        part = bb.checkpoint_filter_fn(parts[item])
        layouts.append(f'{type(bb).__name__}({bb.arch_name!r}) at {prefix or "<root>"!r}, '
                       f'{getattr(part, "layout", "native")} layout')
        converted.update((prefix + k, v) for k, v in part.items())
    return converted, ignored_patterns, layouts


def _model_report(model, name, wrapper, n_file, layouts, comparison, own, backbones):
    prefixes = tuple(p for p, _ in backbones)
    n_bb = sum(1 for k in own if k.startswith(prefixes))
    m_bb = sum(1 for k in comparison.matched if k.startswith(prefixes))
    return report_text(
        f'[{type(model).__name__}] loading {name}: wrapper={wrapper!r}, {n_file} tensors in '
        f'the file' + (f'; backbone {", ".join(layouts)}' if layouts else ''),
        f'{len(comparison.matched)}/{len(own)} model tensors (backbone {m_bb}/{n_bb}, '
        f'rest {len(comparison.matched) - m_bb}/{len(own) - n_bb})',
        comparison, rows=('ignored', 'missing', 'unexpected'), exact=('missing', 'unexpected'))


def _resumable_rest(checkpoint, wrapper):
    """The top-level entries of ``checkpoint`` that resuming an mmengine file needs; an mmcv 1.x
    optimizer state (no ``message_hub`` next to it) cannot be resumed by mmengine and is
    dropped with the weights' wrapper."""
    if not isinstance(checkpoint, dict) or wrapper == 'raw':
        return OrderedDict()
    mmcv1 = 'message_hub' not in checkpoint
    return OrderedDict((k, v) for k, v in checkpoint.items()
                       if k not in ('state_dict', 'meta', wrapper)
                       and not (mmcv1 and k == 'optimizer'))


def convert_model_checkpoint(model, checkpoint, strict=True, name=None, logger='current'):
    """Convert a whole-model checkpoint for ``model`` (a detector / segmentor) and check it fits.

    ``checkpoint`` is a runner file (dict) of mmdet 2.x / mmseg 0.x (official EfficientFormer
    releases: ``meta``, ``state_dict``, ``optimizer``) or of mmengine (ours), or a raw state
    dict. The keys under each effbackbones backbone's prefix go through that backbone's
    ``checkpoint_filter_fn`` (official dense -> our layout; the file's index buffers
    ``attention_bias_idxs*`` are ignored: ours are computed); every other key is kept as it is:
    mmdet 3 / mmseg 1 kept the mmdet 2 / mmseg 0 module names of FPN, RPN, RoI and Semantic FPN
    heads, so their checkpoints load unchanged (mmdetection#9779).

    The report (logged) lists matched / ignored / missing / unexpected / shape-mismatched
    tensors. With ``strict`` (default) any missing, unexpected or shape-mismatched tensor is a
    :class:`CheckpointError` naming them: a model is never evaluated or trained from a partial
    load. ``strict=False`` (the explicit opt-out, e.g. fine-tuning on other classes) makes them
    warnings: mismatched tensors are left out, and a backbone's missing / unknown tensors are
    completed with its current values / dropped, so the backbone's own load check passes. A
    file matching nothing is always an error. ``num_batches_tracked`` may be absent.

    Returns ``(new_checkpoint, report)``: ``new_checkpoint`` holds ``state_dict`` (our layout)
    and ``meta`` with ``dataset_meta`` (class names from ``meta.CLASSES`` of an mmdet 2 /
    mmseg 0 file); the other top-level entries of ``checkpoint`` (e.g. an mmengine
    ``optimizer``, ``message_hub``) are kept for resuming, an mmcv 1.x ``optimizer`` is not.
    """
    name = name or '<checkpoint>'
    state_dict, wrapper = unwrap_state_dict(checkpoint)
    if state_dict and all(k.startswith('module.') for k in state_dict):
        state_dict = OrderedDict((k[len('module.'):], v) for k, v in state_dict.items())
    own = model.state_dict()
    backbones = effbackbones_modules(model)
    converted, ignored_patterns, layouts = _convert_parts(state_dict, backbones)
    comparison = compare_state_dicts(converted, own, ignored_patterns)
    text = _model_report(model, name, wrapper, len(state_dict), layouts, comparison, own,
                         backbones)
    model_name = type(model).__name__
    if not comparison.matched:
        raise CheckpointError(f'{text}\nNothing in {name} matches the {model_name} of this '
                              f'config: it is a checkpoint of another model.')
    if comparison.problems and strict:
        raise CheckpointError(
            f'{text}\n{name} does not fit the {model_name} of this config: '
            f'{len(comparison.missing)} missing, {len(comparison.unexpected)} unexpected and '
            f'{len(comparison.mismatched)} shape-mismatched tensors (named above). Refusing to '
            f'run with partly random weights: check the config (variant, number of classes, '
            f'bias grid) matches the file, or opt out explicitly (tools: --load-not-strict; '
            f"config: custom_hooks=[dict(type='effbackbones.StrictLoadHook', strict=False)]).")
    print_log(text, logger=logger, level=30 if comparison.problems else 20)
    converted = _without_partial_backbones(converted, comparison, own, backbones)

    new = _resumable_rest(checkpoint, wrapper)
    meta = dict(checkpoint.get('meta') or {}) if isinstance(checkpoint, dict) else {}
    dataset_meta = dataset_meta_from(meta)
    if dataset_meta is not None:
        meta['dataset_meta'] = dataset_meta
    new['meta'] = meta
    new['state_dict'] = converted
    return new, dict(vars(comparison), wrapper=wrapper, layouts=layouts, text=text)


def _without_partial_backbones(converted, comparison, own, backbones):
    """``converted`` without ignored and shape-mismatched tensors, and every backbone part
    completed (its missing tensors at the model's current values, its unknown ones dropped)."""
    drop = set(comparison.ignored) | {k for k, _, _ in comparison.mismatched}
    prefixes = tuple(p for p, _ in backbones)
    drop |= {k for k in comparison.unexpected if k.startswith(prefixes)}
    out = OrderedDict((k, v) for k, v in converted.items() if k not in drop)
    for k in comparison.missing + [k for k, _, _ in comparison.mismatched]:
        if k.startswith(prefixes):
            out[k] = own[k]
    return out
