"""Building blocks shared by every family: drop-path, layer scale, conv/linear + BN pairs,
BN folding for deploy.

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
    """Linearly increasing drop-path rates over all blocks, split per stage."""
    total = sum(depths)
    rates = [x.item() for x in torch.linspace(0, drop_path_rate, total)] if total else []
    out, start = [], 0
    for d in depths:
        out.append(rates[start:start + d])
        start += d
    return out


class LayerScale(nn.Module):
    """Per-channel learnable scale ``gamma`` (shape ``(C,)`` or ``(C, 1, 1)``)."""

    def __init__(self, dim, init_value=1e-5, spatial=False):
        super().__init__()
        shape = (dim, 1, 1) if spatial else (dim,)
        self.gamma = nn.Parameter(init_value * torch.ones(shape))

    def forward(self, x):
        return x * self.gamma


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


class ConvBN(nn.Sequential):
    """``Conv2d`` (no bias) followed by ``BatchNorm2d``; folds into one conv on deploy.

    Children are named ``c`` / ``bn`` as in the LeViT / EfficientFormerV2 official layouts.
    """

    def __init__(self, in_channels, out_channels, kernel_size=1, stride=1, padding=0,
                 dilation=1, groups=1, bn_weight_init=1.0):
        super().__init__()
        self.add_module('c', nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                                       dilation, groups, bias=False))
        self.add_module('bn', nn.BatchNorm2d(out_channels))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.constant_(self.bn.bias, 0)

    def switch_to_deploy(self):
        if isinstance(self.bn, nn.Identity):
            return
        self.c = fuse_conv_bn(self.c, self.bn)
        self.bn = nn.Identity()


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
        if isinstance(self.bn, nn.Identity):
            return
        self.c = fuse_linear_bn(self.c, self.bn)
        self.bn = nn.Identity()


def pair(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


__all__ = ['DropPath', 'drop_path_or_identity', 'stochastic_depth_schedule', 'LayerScale',
           'fuse_conv_bn', 'fuse_bn_conv1x1', 'fuse_linear_bn', 'fuse_bn_linear', 'ConvBN',
           'LinearBN', 'pair']
