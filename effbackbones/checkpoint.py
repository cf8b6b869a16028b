"""Loading foreign checkpoints into effbackbones backbones, loudly.

The path a user takes is ``init_cfg=dict(type='Pretrained', checkpoint=PATH)`` ->
``backbone.init_weights()`` -> :func:`load_pretrained`. It

1. reads the file safely (:func:`load_checkpoint_file`: ``weights_only=True`` with a small
   allow-list; anything else needs an explicit ``allow_unsafe=True``),
2. unwraps it (``model`` / ``state_dict`` / ``state_dict_ema`` / raw) and strips ``module.`` /
   ``backbone.`` prefixes (or keeps only the keys under an explicit ``prefix``),
3. converts the layout with the family's ``checkpoint_filter_fn`` (official, timm, ours),
4. compares with the model and logs a one-screen report (matched / new / ignored / missing /
   unexpected), and
5. refuses to leave random weights behind silently: shape mismatches, an empty match, backbone
   tensors missing from the file or tensors the backbone does not know are errors
   (``strict=False`` turns the last two into warnings).

Whole models (a detector / segmentor checkpoint: ``load_from``, ``tools/test.py``,
``tools/convert_checkpoint.py --config``) go through :func:`convert_model_checkpoint`: the part
under each effbackbones backbone is converted by that backbone's ``checkpoint_filter_fn``, the
rest is kept, and anything that does not fit the model is an error naming the tensors
(``effbackbones.StrictLoadHook`` applies it inside mmengine runners).

Every family's ``checkpoint_filter_fn`` is an ordered list of renaming rules applied by
:func:`rename_keys`; :func:`reject_dense_tables` is the one policy for dense bias tables under
``bias_mode='pretrained'``.
"""
import argparse
import fnmatch
import os
import os.path as osp
import pickle
import re
import zipfile
from collections import OrderedDict

import torch

from mmengine.logging import print_log

from .checkpoint_safetensors import looks_like_safetensors, read_safetensors, url_cache_name


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for the requested backbone."""


# Objects that official releases carry next to their tensors (``args`` of the training script).
SAFE_CHECKPOINT_GLOBALS = [argparse.Namespace]

_WRAPPER_KEYS = ('state_dict', 'model', 'state_dict_ema', 'model_ema', 'module')
_STRIP_PREFIXES = ('module.', 'backbone.', 'model.')


def _resolve_path(path):
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


def holds_foreign_objects(path, exc):
    """True when a weights-only load failed on a well-formed file because it pickles types
    outside the allow-list (not because the bytes are damaged)."""
    return (isinstance(exc, pickle.UnpicklingError) and 'Unsupported global' in str(exc) and
            (zipfile.is_zipfile(path) or diagnose_unreadable(path, exc).startswith(
                'it is a legacy-format')))


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
_PRETRAINED_UNSAFE_HINT = (
    "pass allow_unsafe=True (init_cfg=dict(type='Pretrained', checkpoint=..., "
    "allow_unsafe=True)), or re-save it with tools/convert_checkpoint.py")


def _refused_globals(exc):
    """The pickled globals a weights-only load refused (torch's message is a page long)."""
    names = re.findall(r'Unsupported global: GLOBAL (\S+)', str(exc))
    return ', '.join(dict.fromkeys(names)) or str(exc).splitlines()[0]


def load_checkpoint_file(path, map_location='cpu', allow_unsafe=False, check_nonfinite=True,
                         unsafe_hint=_PRETRAINED_UNSAFE_HINT):
    """Read a checkpoint file with ``torch.load(weights_only=True)``, or a ``.safetensors``
    file (by name or first bytes) with :func:`~effbackbones.checkpoint_safetensors.read_safetensors`.

    Only tensors, containers, primitive types and :data:`SAFE_CHECKPOINT_GLOBALS` (plus what
    :mod:`effbackbones.compat` allow-lists) are accepted. A file that needs anything else
    (arbitrary pickled objects can run code) raises :class:`CheckpointError`, which tells how to
    load it if it is trusted (``unsafe_hint``), unless ``allow_unsafe=True`` is given for a
    file you trust: such a file is then loaded with ``weights_only=False`` (logged as a
    warning). So do a file that is empty, truncated or not a PyTorch checkpoint, and
    (``check_nonfinite``) one whose tensors hold NaN or Inf. The mmengine loader of local files
    (``load_from``, ``--resume``) is this function too (:mod:`effbackbones.compat`).
    """
    path = _resolve_path(path)
    if looks_like_safetensors(path):  # tensors only, no pickle: nothing unsafe to allow
        ckpt = read_safetensors(path)
        if check_nonfinite:
            check_finite(ckpt, path)
        return ckpt
    try:
        with torch.serialization.safe_globals(SAFE_CHECKPOINT_GLOBALS):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001  (torch raises many types for damaged files)
        if not holds_foreign_objects(path, exc):
            if isinstance(exc, UNREADABLE_ERRORS):
                raise CheckpointError(f'corrupt checkpoint {path}: '
                                      f'{diagnose_unreadable(path, exc)}.') from None
            raise
        if not allow_unsafe:
            raise CheckpointError(
                f'{path} holds objects outside the weights-only allow-list, so it was not '
                f'loaded (unpickling arbitrary objects can execute code). If you trust the file, '
                f'{unsafe_hint}. Refused: {_refused_globals(exc)}') from None
        print_log(f'loading {path} with weights_only=False (it holds objects outside the '
                  f'allow-list: {_refused_globals(exc)}): only do this for files you trust',
                  logger='current', level=30)
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if check_nonfinite:
        check_finite(ckpt, path)
    return ckpt


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
        for key in _WRAPPER_KEYS:
            if key in ckpt and isinstance(ckpt[key], dict):
                inner = ckpt[key]
                tensors = OrderedDict((k, v) for k, v in inner.items() if torch.is_tensor(v))
                if tensors:
                    return tensors, key
        tensors = OrderedDict((k, v) for k, v in ckpt.items()
                              if isinstance(k, str) and torch.is_tensor(v))
        if tensors:
            return tensors, 'raw'
    raise CheckpointError(
        'the checkpoint holds no tensors under any of the keys '
        f"{', '.join(_WRAPPER_KEYS)} nor at its top level (top-level keys: "
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
                any(k.startswith(('neck.', 'decode_head.', 'rpn_head.', 'roi_head.',
                                  'bbox_head.')) for k in state_dict):
            state_dict = OrderedDict((k[len('backbone.'):], v) for k, v in state_dict.items()
                                     if k.startswith('backbone.'))
            changed = True
    return state_dict


def _match_any(key, patterns):
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _summarise(keys, limit=6):
    keys = sorted(keys)
    # collapse block indices so a report stays on one screen
    groups = OrderedDict()
    for k in keys:
        g = re.sub(r'\.\d+\.', '.*.', k)
        groups.setdefault(g, 0)
        groups[g] += 1
    items = [f'{g} (x{n})' if n > 1 else g for g, n in groups.items()]
    more = '' if len(items) <= limit else f' ... (+{len(items) - limit} more)'
    return ', '.join(items[:limit]) + more


def _names(keys, limit=12):
    """Every name when there are few (an error must say exactly what is wrong), else groups."""
    keys = sorted(keys)
    return ', '.join(keys) if len(keys) <= limit else _summarise(keys, limit)


def _report_text(header, matched, rows, mismatched, mismatch_limit):
    """The load report both loaders log: a header, ``matched``, one line per ``(label, keys,
    formatter)`` row, and the shape mismatches (file vs model) when there are any."""
    lines = [header, f'  matched   : {matched}']
    lines += [f'  {label:<10}: {len(keys)}' + (f'  ({fmt(keys)})' if keys else '')
              for label, keys, fmt in rows]
    if mismatched:
        lines.append(f'  shape mismatch: {len(mismatched)}  (' + ', '.join(
            f'{k}: file {a} vs model {b}' for k, a, b in mismatched[:mismatch_limit]) +
            (' ...' if len(mismatched) > mismatch_limit else '') + ')')
    return '\n'.join(lines)


def load_pretrained(model, checkpoint, prefix=None, strict=True, allow_unsafe=False,
                    map_location='cpu', logger='current'):
    """Load ``checkpoint`` (path or dict) into ``model`` through its family's filter.

    ``model`` provides ``checkpoint_filter_fn(state_dict) -> state_dict`` (our key layout), and
    class attributes ``new_key_patterns`` (tensors a classification checkpoint cannot provide,
    e.g. output norms) and ``ignored_key_patterns`` (head / final-norm tensors of a
    classification checkpoint, applied after conversion). Returns the report as a dict.
    """
    name = '<state_dict>' if isinstance(checkpoint, dict) else os.fspath(checkpoint)
    if isinstance(checkpoint, dict):
        ckpt = checkpoint
    else:
        ckpt = load_checkpoint_file(checkpoint, map_location, allow_unsafe)
    state_dict, wrapper = unwrap_state_dict(ckpt)
    state_dict = strip_prefix(state_dict, prefix)
    filter_fn = getattr(model, 'checkpoint_filter_fn', None)
    converted = filter_fn(state_dict) if filter_fn is not None else state_dict
    layout = getattr(converted, 'layout', None) or 'native'

    own = model.state_dict()
    ignored = [k for k in converted if k not in own and
               _match_any(k, getattr(model, 'ignored_key_patterns', ()))]
    unexpected = [k for k in converted if k not in own and k not in ignored]
    mismatched = [(k, tuple(converted[k].shape), tuple(own[k].shape)) for k in converted
                  if k in own and converted[k].shape != own[k].shape]
    matched = [k for k in converted if k in own and converted[k].shape == own[k].shape]
    missing = [k for k in own if k not in converted]
    new_patterns = tuple(getattr(model, 'new_key_patterns', ()))
    # Non-persistent caches and bookkeeping buffers never need to come from a file.
    new = [k for k in missing if _match_any(k, new_patterns) or k.endswith('num_batches_tracked')]
    missing = [k for k in missing if k not in new]

    arch = getattr(model, 'arch_name', '?')
    family = type(model).__name__
    report_text = _report_text(
        f'[{family} {arch}] loading {name}: wrapper={wrapper!r}, layout={layout}, '
        f'{len(state_dict)} tensors in the file',
        f'{len(matched)}/{len(own)} backbone tensors',
        [('new', new, _summarise), ('ignored', ignored, _summarise),
         ('missing', missing, _summarise), ('unexpected', unexpected, _summarise)],
        mismatched, mismatch_limit=5)
    report = dict(matched=matched, new=new, ignored=ignored, missing=missing,
                  unexpected=unexpected, mismatched=mismatched, wrapper=wrapper, layout=layout,
                  text=report_text)

    if mismatched:
        tables = [k for k, _, _ in mismatched if k.endswith('attention_biases_seg')]
        hint = ('Is it a checkpoint of another variant? Pick the arch the file was trained with.'
                if len(tables) < len(mismatched) else
                'Only the dense attention-bias tables differ: the file was trained on another '
                'bias grid. Set bias_grid to its grid (25: COCO detection releases, 16: ADE20K '
                'segmentation releases), i.e. use the config of that task.')
        raise CheckpointError(
            f'{report_text}\nThe checkpoint does not fit {family}(arch={arch!r}): '
            f'{len(mismatched)} tensors have other shapes. {hint}')
    if not matched:
        raise CheckpointError(
            f'{report_text}\nNothing in the checkpoint matches {family}(arch={arch!r}): it is '
            f'not a checkpoint of this family (or needs prefix=... in init_cfg).')
    if (missing or unexpected) and strict:
        raise CheckpointError(
            f'{report_text}\nThe checkpoint only partly fits {family}(arch={arch!r}): '
            f'{len(missing)} backbone tensors would stay random and {len(unexpected)} tensors '
            f'of the file are unknown. Check the arch/variant; pass strict=False in init_cfg '
            f'to load the matching part anyway.')

    to_load = OrderedDict((k, converted[k]) for k in matched)
    incompatible = model.load_state_dict(to_load, strict=False)
    assert not incompatible.unexpected_keys, incompatible.unexpected_keys
    level = 30 if (missing or unexpected) else 20
    print_log(report_text, logger=logger, level=level)
    hook = getattr(model, 'after_load_pretrained', None)
    if hook is not None:
        hook()
    return report


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


# ------------------------------------------------------------------------------------------
# whole models (detector / segmentor checkpoints)
# ------------------------------------------------------------------------------------------
def is_effbackbones_backbone(module):
    """True for an effbackbones backbone (a family built on ``models.base.BaseDenseBackbone``:
    an architecture table and a layout converter). Told by those attributes because the models
    import this module."""
    return hasattr(module, 'checkpoint_filter_fn') and hasattr(module, 'arch_settings')


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


def convert_model_checkpoint(model, checkpoint, strict=True, name=None, logger='current'):
    """Convert a whole-model checkpoint for ``model`` (a detector / segmentor) and check it fits.

    ``checkpoint`` is a runner file (dict) of mmdet 2.x / mmseg 0.x (official EfficientFormer
    releases: ``meta``, ``state_dict``, ``optimizer``) or of mmengine (ours), or a raw state
    dict. The keys under each effbackbones backbone's prefix go through that backbone's
    ``checkpoint_filter_fn`` (official dense -> our layout; the file's index buffers
    ``attention_bias_idxs*`` are dropped: ours are computed); every other key is kept as it is:
    mmdet 3 / mmseg 1 kept the mmdet 2 / mmseg 0 module names of FPN, RPN, RoI and Semantic FPN
    heads, so their checkpoints load unchanged (mmdetection#9779).

    The report (logged) lists matched / ignored / missing / unexpected / shape-mismatched
    tensors. With ``strict`` (default) any missing, unexpected or shape-mismatched tensor is a
    :class:`CheckpointError` naming them: a model is never evaluated or trained from a partial
    load. ``strict=False`` (the explicit opt-out, e.g. fine-tuning on other classes) makes them
    warnings and leaves the mismatched tensors out. A file matching nothing is always an error.
    ``num_batches_tracked`` may be absent (it is bookkeeping).

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
    converted, ignored, layouts = OrderedDict(), [], []
    backbones = effbackbones_modules(model)
    parts = [OrderedDict() for _ in backbones]
    order = []          # the file's order: a key of the rest, or a backbone part (its index)
    for k, v in state_dict.items():
        owner = next((i for i, (p, _) in enumerate(backbones) if k.startswith(p)), None)
        if owner is None:
            order.append(k)             # neck / heads: mmdet 2 / mmseg 0 names are ours
        else:
            if not parts[owner]:
                order.append(owner)
            parts[owner][k[len(backbones[owner][0]):]] = v
    for item in order:
        if isinstance(item, str):
            converted[item] = state_dict[item]
            continue
        prefix, bb = backbones[item]
        part = bb.checkpoint_filter_fn(parts[item])
        layouts.append(f'{type(bb).__name__}({bb.arch_name!r}) at {prefix or "<root>"!r}, '
                       f'{getattr(part, "layout", "native")} layout')
        patterns = getattr(bb, 'ignored_key_patterns', ())
        for k, v in part.items():
            if prefix + k not in own and _match_any(k, patterns):
                ignored.append(prefix + k)
            else:
                converted[prefix + k] = v

    matched = [k for k in converted if k in own and converted[k].shape == own[k].shape]
    mismatched = [(k, tuple(converted[k].shape), tuple(own[k].shape)) for k in converted
                  if k in own and converted[k].shape != own[k].shape]
    unexpected = [k for k in converted if k not in own]
    missing = [k for k in own if k not in converted and not k.endswith('num_batches_tracked')]
    model_name = type(model).__name__
    n_bb = sum(1 for k in own if any(k.startswith(p) for p, _ in backbones))
    m_bb = sum(1 for k in matched if any(k.startswith(p) for p, _ in backbones))
    text = _report_text(
        f'[{model_name}] loading {name}: wrapper={wrapper!r}, {len(state_dict)} tensors in '
        f'the file' + (f'; backbone {", ".join(layouts)}' if layouts else ''),
        f'{len(matched)}/{len(own)} model tensors (backbone {m_bb}/{n_bb}, '
        f'rest {len(matched) - m_bb}/{len(own) - n_bb})',
        [('ignored', ignored, _summarise), ('missing', missing, _names),
         ('unexpected', unexpected, _names)],
        mismatched, mismatch_limit=8)
    report = dict(matched=matched, ignored=ignored, missing=missing, unexpected=unexpected,
                  mismatched=mismatched, wrapper=wrapper, layouts=layouts, text=text)
    problems = bool(mismatched or missing or unexpected)
    if not matched:
        raise CheckpointError(f'{text}\nNothing in {name} matches the {model_name} of this '
                              f'config: it is a checkpoint of another model.')
    if problems and strict:
        raise CheckpointError(
            f'{text}\n{name} does not fit the {model_name} of this config: '
            f'{len(missing)} missing, {len(unexpected)} unexpected and {len(mismatched)} '
            f'shape-mismatched tensors (named above). Refusing to run with partly random '
            f'weights: check the config (variant, number of classes, bias grid) matches the '
            f'file, or opt out explicitly (tools: --load-not-strict; config: '
            f"custom_hooks=[dict(type='effbackbones.StrictLoadHook', strict=False)]).")
    print_log(text, logger=logger, level=30 if problems else 20)
    if mismatched:
        for k, _, _ in mismatched:
            converted.pop(k)

    # keep what resuming an mmengine file needs; an mmcv 1.x optimizer state (no message_hub
    # next to it) cannot be resumed by mmengine and is dropped with the weights' wrapper
    keep = isinstance(checkpoint, dict) and wrapper != 'raw'
    mmcv1 = keep and 'message_hub' not in checkpoint
    new = OrderedDict((k, v) for k, v in checkpoint.items()
                      if k not in ('state_dict', 'meta', wrapper)
                      and not (mmcv1 and k == 'optimizer')) if keep else OrderedDict()
    meta = dict(checkpoint.get('meta') or {}) if isinstance(checkpoint, dict) else {}
    dataset_meta = dataset_meta_from(meta)
    if dataset_meta is not None:
        meta['dataset_meta'] = dataset_meta
    new['meta'] = meta
    new['state_dict'] = converted
    return new, report


__all__ = ['CheckpointError', 'SAFE_CHECKPOINT_GLOBALS', 'UNREADABLE_ERRORS',
           'load_checkpoint_file', 'check_finite', 'nonfinite_tensors', 'diagnose_unreadable',
           'holds_foreign_objects', 'unwrap_state_dict', 'strip_prefix', 'load_pretrained',
           'LayoutDict', 'rename_keys', 'reject_dense_tables', 'is_effbackbones_backbone',
           'effbackbones_modules', 'dataset_meta_from', 'convert_model_checkpoint']
