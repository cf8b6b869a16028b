"""Building blocks shared by every family: drop-path and its schedule, layer scale, conv/linear +
BN pairs, and the deploy-time rewrites: folding BN and layer scales into the neighbouring layers,
dropping eval-mode no-ops, and the exportable GroupNorm. (What one runtime runs faster lives in
:mod:`effbackbones.deploy.runtimes`, not here.)

Everything that more than one family needs lives here once; a family file only composes them.
(The relative-position attention biases live in :mod:`.attention_bias`.)
"""
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


# --------------------------------------------------------------------------------------------
# regularisation
# --------------------------------------------------------------------------------------------
class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode or when ``drop_prob == 0``)."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self):
        return f'drop_prob={self.drop_prob:.3f}'


def drop_path_or_identity(prob):
    return DropPath(prob) if prob > 0 else nn.Identity()


def stochastic_depth_schedule(depths, drop_path_rate):
    """The official EfficientFormer / SwiftFormer schedule, split per stage: block ``k`` of the
    whole network (``K`` blocks) gets ``drop_path_rate * k / (K - 1)`` (Python floats, as the
    official code computes them)."""
    total = sum(depths)
    out, first = [], 0
    for d in depths:
        out.append([drop_path_rate * (first + j) / max(total - 1, 1) for j in range(d)])
        first += d
    return out


class LayerScale(nn.Module):
    """Per-channel learnable scale ``gamma``, stored in the shape the family's checkpoints use.

    * default: ``gamma`` ``(C,)`` on channels-last input (``(B, N, C)`` tokens);
    * ``spatial=True``: ``gamma`` ``(C, 1, 1)`` on NCHW maps (SwiftFormer's layout);
    * ``channels_first=True``: ``gamma`` ``(C,)`` on NCHW maps (timm's ``LayerScale2d``, see
      :class:`LayerScale2d`).
    """

    def __init__(self, dim, init_value=1e-5, spatial=False, channels_first=False):
        super().__init__()
        shape = (dim, 1, 1) if spatial else (dim,)
        self.gamma = nn.Parameter(init_value * torch.ones(shape))
        self.channels_first = bool(channels_first or spatial)

    def forward(self, x):
        return x * (self.gamma.view(-1, 1, 1) if self.channels_first else self.gamma)


class LayerScale2d(LayerScale):
    """:class:`LayerScale` of an NCHW map with a ``(C,)`` ``gamma`` (timm ``LayerScale2d``, the
    EfficientFormer v1 / V2 layout)."""

    def __init__(self, dim, init_value=1e-5):
        super().__init__(dim, init_value, channels_first=True)


# --------------------------------------------------------------------------------------------
# BN folding (deploy-time re-parameterisation)
# --------------------------------------------------------------------------------------------
def _bn_scale_shift(bn):
    """``bn(x) == x * scale + shift`` in eval mode (per channel)."""
    if isinstance(bn, _BatchNorm):
        std = torch.sqrt(bn.running_var + bn.eps)
        weight = bn.weight if bn.affine else torch.ones_like(std)
        bias = bn.bias if bn.affine else torch.zeros_like(std)
        scale = weight / std
        shift = bias - bn.running_mean * scale
        return scale, shift
    raise TypeError(f'cannot fold {type(bn).__name__}')


@torch.no_grad()
def fuse_conv_bn(conv, bn):
    """Return one conv equal to ``bn(conv(x))`` (eval-mode BN)."""
    scale, shift = _bn_scale_shift(bn)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, conv.dilation, conv.groups, bias=True,
                      padding_mode=conv.padding_mode).to(conv.weight)
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
    fused.bias.copy_(bias * scale + shift)
    return fused


@torch.no_grad()
def fuse_bn_conv1x1(bn, conv):
    """Return one conv equal to ``conv(bn(x))`` for an ungrouped, unpadded 1x1 conv."""
    assert conv.kernel_size == (1, 1) and conv.groups == 1 and conv.padding in ((0, 0), 0)
    scale, shift = _bn_scale_shift(bn)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, 1, conv.stride, bias=True).to(
        conv.weight)
    w = conv.weight[:, :, 0, 0]
    fused.weight.copy_((w * scale[None, :])[:, :, None, None])
    bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels).to(w)
    fused.bias.copy_(bias + w @ shift)
    return fused


@torch.no_grad()
def fuse_linear_bn(linear, bn):
    """Return one Linear equal to ``bn(linear(x))`` (BatchNorm1d over the output features)."""
    scale, shift = _bn_scale_shift(bn)
    fused = nn.Linear(linear.in_features, linear.out_features, bias=True).to(linear.weight)
    fused.weight.copy_(linear.weight * scale[:, None])
    bias = linear.bias if linear.bias is not None else torch.zeros_like(shift)
    fused.bias.copy_(bias * scale + shift)
    return fused


@torch.no_grad()
def fuse_bn_linear(bn, linear):
    """Return one Linear equal to ``linear(bn(x))`` (BatchNorm over the input features)."""
    scale, shift = _bn_scale_shift(bn)
    fused = nn.Linear(linear.in_features, linear.out_features, bias=True).to(linear.weight)
    fused.weight.copy_(linear.weight * scale[None, :])
    bias = linear.bias if linear.bias is not None else torch.zeros(linear.out_features).to(shift)
    fused.bias.copy_(bias + linear.weight @ shift)
    return fused


@torch.no_grad()
def fold_bn_(module, layer_name, bn_name, bn_first=False):
    """Fold the BatchNorm child ``bn_name`` of ``module`` into its neighbour ``layer_name``.

    ``bn_first=False``: ``bn(layer(x))``; ``True``: ``layer(bn(x))`` (a 1x1 conv or a Linear).
    The fused layer replaces ``layer_name`` and the BN becomes ``nn.Identity`` -- the child names
    stay, since they are each family's checkpoint layout. A no-op once folded, so deploy may run
    twice. Works on ``nn.Sequential`` children too (names ``'0'``, ``'1'``...).
    """
    bn = getattr(module, bn_name)
    if not isinstance(bn, _BatchNorm):
        return
    layer = getattr(module, layer_name)
    if isinstance(layer, nn.Linear):
        fused = fuse_bn_linear(bn, layer) if bn_first else fuse_linear_bn(layer, bn)
    else:
        fused = fuse_bn_conv1x1(bn, layer) if bn_first else fuse_conv_bn(layer, bn)
    setattr(module, layer_name, fused)
    setattr(module, bn_name, nn.Identity())


@torch.no_grad()
def fold_conv_bn_pairs_(seq):
    """In an ``nn.Sequential``, fold every ``Conv2d`` that is directly followed by a BatchNorm."""
    for i in range(len(seq) - 1):
        if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], _BatchNorm):
            fold_bn_(seq, str(i), str(i + 1))


@torch.no_grad()
def fold_scale_into_(layer, gamma):
    """``gamma * layer(x)`` -> ``layer'(x)`` in place, for a conv / linear ``layer`` (``gamma`` per
    output channel, any shape with ``C`` elements)."""
    g = gamma.reshape(-1)
    layer.weight.mul_(g.reshape(-1, *([1] * (layer.weight.dim() - 1))))
    if layer.bias is not None:
        layer.bias.mul_(g)


def fold_layer_scale_(module, scale_name, layer):
    """Fold the :class:`LayerScale` child ``scale_name`` of ``module`` into ``layer``, the last
    layer of its branch, which must have its BN folded already; the scale becomes
    ``nn.Identity``. A no-op once folded (or where the block has no such scale)."""
    scale = getattr(module, scale_name, None)
    if not isinstance(scale, LayerScale):
        return
    fold_scale_into_(layer, scale.gamma)
    setattr(module, scale_name, nn.Identity())


def replace_inference_noops_(module):
    """Replace every ``nn.Dropout`` / :class:`DropPath` below ``module`` by
    ``nn.Identity`` (what they compute in eval mode), so a deployed or exported graph has no
    trace of them."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.Dropout, DropPath)):
                setattr(parent, name, nn.Identity())


class ExportableGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` as explicit ops whose means are taken one axis at a time, for deployed /
    exported models; same values in PyTorch, same parameters.

    Why: the ONNX export of ``nn.GroupNorm`` is an ``InstanceNormalization`` over a reshaped map,
    which ONNX Runtime and OpenVINO reduce in float32 in one long pass. On EfficientFormer's
    stride-4 map (``GroupNorm(1, C)``: 786k values at 512x512) that put the output 2e-4 (relative)
    off PyTorch, whose reductions are pairwise. Means over ``W``, then ``H``, then the channels of
    a group (equal counts, so the mean of means is the mean) keep every reduction short: 3e-7.
    """

    @classmethod
    def from_group_norm(cls, gn):
        new = cls(gn.num_groups, gn.num_channels, gn.eps, gn.affine)
        if gn.affine:
            new = new.to(gn.weight)
            with torch.no_grad():
                new.weight.copy_(gn.weight)
                new.bias.copy_(gn.bias)
        return new

    @staticmethod
    def _mean(x):
        # x: (B, G, C/G, *spatial): mean over every axis from 2 on, the last one first
        for _ in range(x.dim() - 2):
            x = x.mean(dim=-1)
        return x

    def forward(self, x):
        shape = x.shape
        g = x.reshape(shape[0], self.num_groups, -1, *shape[2:])
        stat_shape = (shape[0], self.num_groups) + (1,) * (g.dim() - 2)
        centred = g - self._mean(g).reshape(stat_shape)
        var = self._mean(centred * centred).reshape(stat_shape)
        x = (centred * torch.rsqrt(var + self.eps)).reshape(shape)
        if self.affine:
            affine_shape = (1, -1) + (1,) * (x.dim() - 2)
            x = x * self.weight.reshape(affine_shape) + self.bias.reshape(affine_shape)
        return x


def exportable_group_norms_(module):
    """Replace every plain ``nn.GroupNorm`` below ``module`` by :class:`ExportableGroupNorm`."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.GroupNorm:
                setattr(parent, name, ExportableGroupNorm.from_group_norm(child))


class ConvBN(nn.Sequential):
    """``Conv2d`` followed by ``BatchNorm2d``; folds into one conv on deploy.

    The child names are the family's checkpoint layout: ``('c', 'bn')`` (default: LeViT's
    ``Conv2d_BN``), ``('conv', 'bn')`` (timm's EfficientFormerV2 ``ConvNorm``), ``('conv', 'norm')``
    / ``('proj', 'norm')`` (the official ``Embedding`` downsample of EfficientFormer / SwiftFormer
    in timm's names). ``bias``: the official EfficientFormer / SwiftFormer convs keep theirs.
    """

    def __init__(self, in_channels, out_channels, kernel_size=1, stride=1, padding=0,
                 dilation=1, groups=1, bias=False, bn_weight_init=1.0, names=('c', 'bn')):
        super().__init__()
        self._names = tuple(names)
        conv_name, bn_name = self._names
        self.add_module(conv_name, nn.Conv2d(in_channels, out_channels, kernel_size, stride,
                                             padding, dilation, groups, bias=bias))
        bn = nn.BatchNorm2d(out_channels)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.constant_(bn.bias, 0)
        self.add_module(bn_name, bn)

    def switch_to_deploy(self):
        fold_bn_(self, *self._names)


class LinearBN(nn.Sequential):
    """``Linear`` (no bias) followed by ``BatchNorm1d`` over features, for (B, N, C) tokens."""

    def __init__(self, in_features, out_features, bn_weight_init=1.0):
        super().__init__()
        self.add_module('c', nn.Linear(in_features, out_features, bias=False))
        self.add_module('bn', nn.BatchNorm1d(out_features))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.constant_(self.bn.bias, 0)

    def forward(self, x):
        x = self.c(x)
        if isinstance(self.bn, nn.Identity):
            return x
        return self.bn(x.flatten(0, 1)).reshape_as(x)

    def switch_to_deploy(self):
        fold_bn_(self, 'c', 'bn')


__all__ = ['DropPath', 'drop_path_or_identity', 'stochastic_depth_schedule', 'LayerScale',
           'LayerScale2d', 'fuse_conv_bn', 'fuse_bn_conv1x1', 'fuse_linear_bn', 'fuse_bn_linear',
           'fold_bn_', 'fold_conv_bn_pairs_', 'fold_scale_into_', 'fold_layer_scale_',
           'replace_inference_noops_', 'ExportableGroupNorm', 'exportable_group_norms_', 'ConvBN',
           'LinearBN']
