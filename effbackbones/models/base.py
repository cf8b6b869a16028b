"""The contract every effbackbones backbone keeps (mmdet/mmseg style).

``BaseDenseBackbone`` owns what is common to all families so a family file only describes its
architecture:

* ``arch``: a name from the family's ``arch_zoo`` table or a dict with the same keys;
* ``out_indices``: which of the stride-4/8/16/32 maps to return (as a tuple of NCHW tensors);
* input checks with clear ``ValueError``s (channels, rank, side divisibility where needed);
* ``frozen_stages`` (mmdet semantics: ``0`` freezes the stem, ``k`` the stem and stages
  ``0..k-1`` with their output norms), ``norm_eval`` (BatchNorms stay in eval mode);
* ``with_cp``: activation checkpointing of each block while training. Every family's stages
  are :class:`BlockStage` modules that own their forward and run each block through
  :meth:`BlockStage.run_block`, the one checkpointing helper; its recompute in the backward pass
  leaves BatchNorm running statistics alone, so they are updated once per step, exactly as
  without ``with_cp``. Setting ``backbone.with_cp`` reaches every stage;
* ``init_cfg=dict(type='Pretrained', checkpoint=..., prefix=None, strict=True,
  allow_unsafe=False)``: the loud, safe loader of :mod:`effbackbones.checkpoint` with the
  family's ``checkpoint_filter_fn``;
* ``load_state_dict`` (and every API built on it: mmengine's ``load_checkpoint``, mmdet's
  ``init_detector``, mmseg's ``init_model``...) converts the backbone part of an official /
  timm state dict and refuses a partial or other-variant one
  (:func:`~effbackbones.checkpoint.convert_backbone_part`);
* ``switch_to_deploy(input_size=None)``: every sub-module that can fold (BN into conv/linear,
  layer scales) does so, once (a second call warns and does nothing); with ``input_size`` the
  attention biases of that input size are computed once and kept (:meth:`pin_attention_biases`);
  outputs stay the same in eval mode;
* relative-position attention biases (:mod:`.attention_bias`): ``clear_bias_cache()``, called by
  the loader after loading (``after_load_pretrained``).

The forward of every family is one graph for ``torch.compile`` (no graph break, no recompile
per block): nothing in it depends on Python state that changes between calls of the same size.
"""
import contextlib
import copy
import warnings

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from mmengine.model import BaseModule
from torch.nn.modules.batchnorm import _BatchNorm

from ..checkpoint import load_pretrained, load_state_dict_pre_hook
from .attention_bias import RelPosBiasAttention
from .layers import exportable_group_norms_, replace_inference_noops_


@contextlib.contextmanager
def bn_stats_frozen(module):
    """Run ``module`` in train mode without touching BN running statistics (momentum 0,
    ``num_batches_tracked`` restored): for the activation-checkpointing recompute, which would
    otherwise update every BatchNorm a second time with the same batch. Train-mode BN normalises
    with the batch statistics, so the recomputed values are the same either way."""
    bns = [m for m in module.modules()
           if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    saved = [(m, m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


class BlockStage(nn.Module):
    """A stage that owns its forward (timm's style): subclasses run each of their blocks through
    :meth:`run_block`, the checkpointing helper every family shares.

    ``with_cp`` is set by the backbone (constructor argument, or ``backbone.with_cp = ...``).
    """

    def __init__(self, with_cp=False):
        super().__init__()
        self.with_cp = bool(with_cp)

    def run_block(self, block, *args):
        """``block(*args)``, with activation checkpointing when ``with_cp``, training and some
        input needs a gradient; the recompute leaves BN running statistics alone
        (:func:`bn_stats_frozen`)."""
        if self.with_cp and self.training and any(
                torch.is_tensor(a) and a.requires_grad for a in args):
            return cp.checkpoint(block, *args, use_reentrant=False, context_fn=lambda: (
                contextlib.nullcontext(), bn_stats_frozen(block)))
        return block(*args)


class BaseDenseBackbone(BaseModule):
    """Base class: see the module docstring for the contract."""

    #: ``{name: dict(...)}`` per family; aliases map alternative names to canonical ones.
    arch_zoo = {}
    arch_aliases = {}
    #: keys every arch dict must provide
    arch_keys = ()
    #: input sides must be multiples of this (``None``: any size works)
    size_divisor = 32
    #: strides of the maps the family can return, by out index
    strides = (4, 8, 16, 32)
    #: patterns (fnmatch on our key layout) of tensors a classification checkpoint lacks
    new_key_patterns = ()
    #: patterns of classification-only tensors (heads, final norm) dropped when loading
    ignored_key_patterns = ('head.*', 'head_dist.*', 'dist_head.*', 'norm.*')

    def __init__(self, arch, in_channels=3, out_indices=(0, 1, 2, 3), frozen_stages=-1,
                 norm_eval=False, with_cp=False, drop_path_rate=0.0, init_cfg=None):
        super().__init__(init_cfg=copy.deepcopy(init_cfg))
        self.arch_name, self.arch_settings = self._resolve_arch(arch)
        self.in_channels = int(in_channels)
        self.out_indices = self._check_out_indices(out_indices)
        num_groups = len(self.strides) + 1
        if not isinstance(frozen_stages, int) or not -1 <= frozen_stages < num_groups:
            raise ValueError(f'frozen_stages must be an int in [-1, {num_groups - 1}] '
                             f'(-1: nothing frozen, 0: stem, k: stem + stages 0..k-1), '
                             f'got {frozen_stages!r}')
        if not 0.0 <= float(drop_path_rate) < 1.0:
            raise ValueError(f'drop_path_rate must be in [0, 1), got {drop_path_rate!r}')
        self.frozen_stages = frozen_stages
        self.norm_eval = bool(norm_eval)
        self.with_cp = bool(with_cp)
        self.drop_path_rate = float(drop_path_rate)
        self.deploy = False
        #: whether the weights came from a file or state dict (not only initialisation)
        self.weights_loaded = False
        # the ecosystem's loaders (mmengine's load_checkpoint, mmdet's init_detector, ...)
        # call load_state_dict: convert and check the backbone part there too
        self._register_load_state_dict_pre_hook(load_state_dict_pre_hook, with_module=True)

    # ---------------------------------------------------------------------------------------
    # arch / argument validation
    # ---------------------------------------------------------------------------------------
    @classmethod
    def _resolve_arch(cls, arch):
        if isinstance(arch, str):
            key = arch.lower().replace('-', '').replace('_', '')
            key = cls.arch_aliases.get(key, key)
            if key not in cls.arch_zoo:
                raise ValueError(f'unknown {cls.__name__} arch {arch!r}; choose one of '
                                 f'{sorted(cls.arch_zoo)} or pass a dict with keys '
                                 f'{list(cls.arch_keys)}')
            return key, copy.deepcopy(cls.arch_zoo[key])
        if isinstance(arch, dict):
            missing = [k for k in cls.arch_keys if k not in arch]
            if missing:
                raise ValueError(f'custom {cls.__name__} arch dict lacks keys {missing} '
                                 f'(needs {list(cls.arch_keys)})')
            return 'custom', copy.deepcopy(dict(arch))
        raise TypeError(f'arch must be a str or dict, got {type(arch).__name__}')

    def _check_out_indices(self, out_indices):
        if isinstance(out_indices, int):
            out_indices = (out_indices,)
        n = len(self.strides)
        out = []
        for i in out_indices:
            if not isinstance(i, int):
                raise TypeError(f'out_indices must hold ints, got {out_indices!r}')
            j = i + n if i < 0 else i
            if not 0 <= j < n:
                raise ValueError(f'out index {i} out of range: {type(self).__name__} has {n} '
                                 f'outputs (strides {self.strides})')
            out.append(j)
        if not out or len(set(out)) != len(out):
            raise ValueError(f'out_indices must be non-empty and unique, got {out_indices!r}')
        return tuple(sorted(out))

    def check_input(self, x):
        """Raise a clear ``ValueError`` for inputs the backbone cannot process."""
        if not torch.is_tensor(x) or x.dim() != 4:
            raise ValueError(f'{type(self).__name__} expects an NCHW tensor, got '
                             f'{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}')
        if x.shape[1] != self.in_channels:
            raise ValueError(f'{type(self).__name__} expects {self.in_channels} input channels '
                             f'(in_channels={self.in_channels}), got {x.shape[1]} '
                             f'(input shape {tuple(x.shape)})')
        d = self.size_divisor
        if d and (x.shape[2] % d or x.shape[3] % d):
            raise ValueError(
                f'{type(self).__name__} needs input sides that are multiples of {d}, got '
                f'{x.shape[2]}x{x.shape[3]}. Pad the batch (mmdet/mmseg data_preprocessor: '
                f'pad_size_divisor={d} / size_divisor={d}) or resize.')

    def forward_stages(self, x, out_norms=None):
        """Run ``self.stages`` in order on the stem's output ``x``; return the maps of the stages
        in ``out_indices`` (each through ``out_norms[i]`` when given), stopping after the last
        one wanted (later stages are never computed)."""
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                outs.append(out_norms[i](x) if out_norms is not None else x)
            if i >= self.out_indices[-1]:
                break
        return tuple(outs)

    @property
    def out_channels(self):
        """Channels of each returned map (in ``out_indices`` order)."""
        return tuple(self.channels[i] for i in self.out_indices)

    # ---------------------------------------------------------------------------------------
    # blocks, freezing, train mode
    # ---------------------------------------------------------------------------------------
    @property
    def with_cp(self):
        """Activation checkpointing of every block while training (set on every stage)."""
        return self._with_cp

    @with_cp.setter
    def with_cp(self, value):
        self._with_cp = bool(value)
        for m in self.modules():
            if isinstance(m, BlockStage):
                m.with_cp = self._with_cp

    def stage_groups(self):
        """``[stem_modules, stage0_modules, ...]``: what ``frozen_stages`` freezes, in order."""
        raise NotImplementedError

    def unused_groups(self):
        """Stage groups never computed for ``out_indices`` (forward stops at the last one)."""
        return self.stage_groups()[self.out_indices[-1] + 2:]

    def _freeze_stages(self):
        # Stages after the last returned map are not run: their parameters would never get a
        # gradient, which DistributedDataParallel (find_unused_parameters=False, the mmdet /
        # mmseg default) rejects. They stay in the state dict so checkpoints load whole.
        frozen = self.stage_groups()[:self.frozen_stages + 1] if self.frozen_stages >= 0 else []
        for group in list(frozen) + list(self.unused_groups()):
            for m in group:
                if m is None:
                    continue
                m.eval()
                for p in m.parameters():
                    p.requires_grad = False

    def train(self, mode=True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    # ---------------------------------------------------------------------------------------
    # relative-position attention biases
    # ---------------------------------------------------------------------------------------
    def attention_bias_modules(self):
        """Every attention with a learned relative-position bias table, in network order."""
        return [m for m in self.modules() if isinstance(m, RelPosBiasAttention)]

    def clear_bias_cache(self):
        for m in self.attention_bias_modules():
            m.clear_bias_cache()

    def after_load_pretrained(self):
        """Called by the loader after loading: biases cached from the old tables are stale."""
        self.clear_bias_cache()

    # ---------------------------------------------------------------------------------------
    # weights
    # ---------------------------------------------------------------------------------------
    def checkpoint_filter_fn(self, state_dict):
        """Convert a foreign layout (official / timm) to ours. Families override."""
        return state_dict

    def init_weights(self):
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            if not cfg.get('checkpoint'):
                raise ValueError("init_cfg type='Pretrained' needs checkpoint=PATH")
            load_pretrained(self, cfg['checkpoint'], prefix=cfg.get('prefix'),
                            strict=cfg.get('strict', True),
                            allow_unsafe=cfg.get('allow_unsafe', False),
                            map_location=cfg.get('map_location', 'cpu'))
            self._is_init = True
            return
        self.init_default_weights()
        super().init_weights()

    def init_default_weights(self):
        """Random init used when no checkpoint is given (timm-style trunc-normal)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ---------------------------------------------------------------------------------------
    # deploy
    # ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def switch_to_deploy(self, input_size=None):
        """Fold for inference: every BatchNorm next to a conv / linear layer and every layer
        scale is folded into that layer (the ``norm`` / scale children become ``nn.Identity``),
        dropout / drop-path modules (identities in eval mode) become ``nn.Identity``, and
        GroupNorms become :class:`~.layers.ExportableGroupNorm` (same values and parameters;
        exported, ONNX Runtime / OpenVINO compute it as precisely as PyTorch).

        With ``input_size=(H, W)`` the attention biases of that input size are also computed
        once and kept as buffers (:meth:`pin_attention_biases`), so a forward at that size
        (eager, ``torch.compile``, an exported graph) reads them instead of gathering / resizing
        the tables; other sizes still compute theirs (cached per size in eval mode, as before).

        The backbone is put in eval mode; outputs stay the same (within float rounding).
        Irreversible: keep a copy to train again. Folding happens once: a second call warns and
        changes nothing (except pinning biases for a new ``input_size`` if given).
        """
        if self.deploy:
            warnings.warn(f'{type(self).__name__}.switch_to_deploy(): already in deploy form; '
                          f'nothing folded again', stacklevel=2)
        else:
            self.eval()
            for m in list(self.modules()):
                if m is not self and hasattr(m, 'switch_to_deploy'):
                    m.switch_to_deploy()
            replace_inference_noops_(self)
            exportable_group_norms_(self)
            self.deploy = True
        if input_size is not None:
            self.pin_attention_biases(input_size)
        return self

    @torch.no_grad()
    def pin_attention_biases(self, input_size):
        """Compute the bias of every attention for ``(H, W)`` inputs once and keep it as a
        non-persistent buffer of the attention (state dict keys unchanged; it follows ``.to()``).

        A forward at that input size in eval mode then uses the pinned tensors: an exported ONNX
        graph holds them as constants (no gather / bicubic resize in the graph), and
        ``torch.compile`` does not recompute them. Training ignores them (the tables get their
        gradients); loading a state dict drops them. One input size is pinned at a
        time (a new call replaces the old one). Families without bias tables have nothing to
        pin. Returns ``self``.
        """
        if (not isinstance(input_size, (tuple, list)) or len(input_size) != 2
                or not all(isinstance(v, int) and v > 0 for v in input_size)):
            raise ValueError(f'input_size must be (H, W) positive ints, got {input_size!r}')
        attns = self.attention_bias_modules()
        if not attns:
            return self
        was_training = self.training
        self.eval()
        ref = next(self.parameters())
        for m in attns:
            m.start_pinning()
        try:
            self(ref.new_zeros(1, self.in_channels, *input_size))
        finally:
            for m in attns:
                m.stop_pinning()
            self.train(was_training)
        return self


__all__ = ['BaseDenseBackbone', 'BlockStage', 'bn_stats_frozen']
