"""LeViT (Graham et al., ICCV 2021) as a pyramid dense-prediction backbone for any input size.

Architecture = the official code (facebookresearch/LeViT ``levit.py``, ``LeViT_128S`` ...
``LeViT_384``); module names follow timm's ``levit`` layout (``stem.conv{1..4}``,
``stages.{i}.downsample``, ``stages.{i}.blocks.{j}``) with the official ``c``/``bn`` leaves of
``Conv2d_BN`` / ``Linear_BN``. :meth:`LeViT.checkpoint_filter_fn` converts the official flat
``patch_embed.{k}`` / ``blocks.{n}`` layout and both timm layouts (``levit_*`` and
``levit_conv_*``) to ours.

    stem.conv1 conv3x3/2-BN + Hardswish                          stride 2
    stem.conv2 conv3x3/2-BN + Hardswish   -> out index 0          stride 4
    stem.conv3 conv3x3/2-BN + Hardswish   -> out index 1          stride 8
    stem.conv4 conv3x3/2-BN, flatten to tokens                    stride 16
    stages[0]  blocks (attention + MLP)   -> out index 2          stride 16
    stages[1]  downsample (shrink attention + MLP) + blocks -> 3  stride 32
    stages[2]  downsample + blocks        -> out index 4          stride 64

Any input size (sides multiples of 32): every attention and shrink attention gathers its bias
for the runtime grid. The learned table of a block holds one value per head and absolute offset
``(|dy|, |dx|)`` on the R x R grid it was trained on (R = 14 / 7 / 4 at 224; the shrink
attentions use the key grid, 14 / 7). For a runtime key grid H x W the table must cover
``|dy| < H, |dx| < W``; per dimension it is **bicubically resized** (as an image over the offset
grid, align_corners=False) where the runtime side is larger than R and **cropped** (the learned
values, untouched) where it is smaller or equal -- the rule of :mod:`.attention_bias`, shared with
EfficientFormer v1 / V2 ``bias_mode='pretrained'``. At 224 nothing is resized and the maps equal
the official model's. The bias of query ``q`` and key ``k`` is ``table[|dy| * W + |dx|]``
(gathered per axis; shrink-attention queries sit on every second key position, query grid
``ceil(H/2) x ceil(W/2)`` as the official ``[::2, ::2]`` slicing).
"""
import re
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp

from ..checkpoint import rename_keys
from ..registry import MODELS
from .attention_bias import RelPosBiasAttention, axis_offsets, gather_offset_bias
from .base import BaseDenseBackbone, BlockStage
from .layers import ConvBN, LinearBN

ATTN_IMPLS = ('chunked', 'sdpa', 'naive')


def _ceil_half(n):
    return (n - 1) // 2 + 1


def residual_drop(x, y, drop, training):
    """``x + y`` with the official LeViT ``Residual`` per-sample drop (train mode only)."""
    if training and drop > 0:
        keep = torch.rand(x.size(0), 1, 1, device=x.device).ge_(drop).div(1 - drop).detach()
        return x + y * keep.to(y.dtype)
    return x + y


class _BiasAttention(RelPosBiasAttention):
    """LeViT's attention base: the shared bias (pretrained-table rule, one cached size) and the
    three attention implementations (see :class:`LeViT` ``attn_impl``)."""

    #: ``'chunked'``: elements of one query chunk's ``(B, heads, rows*W, Nk)`` score tensor
    chunk_elems = 2 ** 24

    def _init_bias(self, num_heads, table_hw, q_stride, attn_impl):
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f'attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}')
        self.attn_impl = attn_impl
        # eval cache: the latest input size only (detection sizes change per image)
        self.init_relative_position_bias(num_heads, table_hw, q_stride, 'pretrained',
                                         cache_size=1)

    def attend(self, q, k, v, q_hw, k_hw):
        """``softmax(q k^T * key_dim**-0.5 + bias) v`` for (B, heads, N, d) tensors."""
        if self.attn_impl == 'chunked':
            return self._attend_chunked(q, k, v, q_hw, k_hw)
        bias = self.attention_bias(q_hw, k_hw, q.dtype)
        if self.attn_impl == 'sdpa':
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        attn = (q @ k.transpose(-2, -1)) * self.scale + bias
        return attn.softmax(dim=-1) @ v

    def _attend_rows(self, q, k, v, table, dy, dx):
        """SDPA for the queries of some grid rows; their bias gathered from the (h, H, W) table."""
        bias = gather_offset_bias(table, dy, dx).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)

    def _attend_chunked(self, q, k, v, q_hw, k_hw):
        """Queries in chunks of whole grid rows, each chunk checkpointed while training, so
        neither an ``Nq x Nk`` score/softmax tensor nor the full bias is ever kept."""
        if self.bias_from_traced_sizes(k_hw):
            # dynamic ONNX export: the row split is Python control flow on the size, which the
            # graph would freeze at the traced size; all rows in one chunk instead
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=self.attention_bias(q_hw, k_hw, q.dtype), scale=self.scale)
        table = self.table_for_grid(k_hw)
        dy, dx = axis_offsets(q_hw, k_hw, self.q_stride, q.device)
        b, h, _, _ = q.shape
        per_row = b * h * q_hw[1] * k.shape[2]
        rows = max(1, self.chunk_elems // per_row)
        if rows >= q_hw[0]:
            return self._attend_rows(q, k, v, table, dy, dx)
        save = torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad or table.requires_grad)
        outs = []
        for r0 in range(0, q_hw[0], rows):
            r1 = min(q_hw[0], r0 + rows)
            args = (q[:, :, r0 * q_hw[1]:r1 * q_hw[1]], k, v, table, dy[r0:r1], dx)
            if save:
                outs.append(cp.checkpoint(self._attend_rows, *args, use_reentrant=False,
                                          preserve_rng_state=False))
            else:
                outs.append(self._attend_rows(*args))
        return torch.cat(outs, dim=2)


class Attention(_BiasAttention):
    """LeViT attention on (B, N, C) tokens of a ``hw`` grid (official ``Attention``)."""

    def __init__(self, dim, key_dim, num_heads, attn_ratio, table_hw, attn_impl='chunked'):
        super().__init__()
        self.init_heads(num_heads, key_dim, attn_ratio)
        self.qkv = LinearBN(dim, self.val_attn_dim + 2 * key_dim * num_heads)
        self.proj = nn.Sequential(OrderedDict([
            ('act', nn.Hardswish()),
            ('ln', LinearBN(self.val_attn_dim, dim, bn_weight_init=0.0))]))
        self._init_bias(num_heads, table_hw, 1, attn_impl)

    def forward(self, x, hw):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.num_heads, -1).split(
            [self.key_dim, self.key_dim, self.val_dim], dim=3)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        x = self.attend(q, k, v, hw, hw)
        return self.proj(x.transpose(1, 2).reshape(b, n, self.val_attn_dim))


class _SubsampledQuery(nn.Module):
    """Queries of the shrink attention: every second token of the grid, then Linear-BN."""

    def __init__(self, in_dim, out_dim, stride):
        super().__init__()
        self.stride = stride
        self.ln = LinearBN(in_dim, out_dim)

    def forward(self, x, hw):
        b, _, c = x.shape
        x = x.view(b, hw[0], hw[1], c)[:, ::self.stride, ::self.stride].reshape(b, -1, c)
        return self.ln(x)


class AttentionSubsample(_BiasAttention):
    """LeViT shrink attention (official ``AttentionSubsample``): stride-2 queries, full keys."""

    def __init__(self, in_dim, out_dim, key_dim, num_heads, attn_ratio, table_hw, stride=2,
                 attn_impl='chunked'):
        super().__init__()
        self.init_heads(num_heads, key_dim, attn_ratio)
        self.stride = stride
        self.kv = LinearBN(in_dim, self.val_attn_dim + key_dim * num_heads)
        self.q = _SubsampledQuery(in_dim, key_dim * num_heads, stride)
        self.proj = nn.Sequential(OrderedDict([
            ('act', nn.Hardswish()),
            ('ln', LinearBN(self.val_attn_dim, out_dim))]))
        self._init_bias(num_heads, table_hw, stride, attn_impl)

    def out_hw(self, hw):
        return tuple((s - 1) // self.stride + 1 for s in hw)

    def forward(self, x, hw):
        b, n, _ = x.shape
        q_hw = self.out_hw(hw)
        k, v = self.kv(x).view(b, n, self.num_heads, -1).split([self.key_dim, self.val_dim], 3)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        q = self.q(x, hw).view(b, -1, self.num_heads, self.key_dim).transpose(1, 2)
        x = self.attend(q, k, v, q_hw, hw)
        return self.proj(x.transpose(1, 2).reshape(b, -1, self.val_attn_dim))


class Mlp(nn.Module):
    """Linear-BN, Hardswish, Linear-BN (BN weight 0 at init, as the official residual MLP)."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.ln1 = LinearBN(dim, hidden_dim)
        self.act = nn.Hardswish()
        self.ln2 = LinearBN(hidden_dim, dim, bn_weight_init=0.0)

    def forward(self, x):
        return self.ln2(self.act(self.ln1(x)))


class LeViTBlock(nn.Module):
    """Residual attention + residual MLP (two official ``Residual`` blocks)."""

    def __init__(self, dim, key_dim, num_heads, attn_ratio, mlp_ratio, table_hw, drop_path=0.0,
                 attn_impl='chunked'):
        super().__init__()
        self.attn = Attention(dim, key_dim, num_heads, attn_ratio, table_hw, attn_impl)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = float(drop_path)

    def forward(self, x, hw):
        x = residual_drop(x, self.attn(x, hw), self.drop_path, self.training)
        return residual_drop(x, self.mlp(x), self.drop_path, self.training)


class LeViTDownsample(nn.Module):
    """Shrink attention (no residual) followed by a residual MLP."""

    def __init__(self, in_dim, out_dim, key_dim, num_heads, attn_ratio, mlp_ratio, table_hw,
                 drop_path=0.0, attn_impl='chunked'):
        super().__init__()
        self.attn_downsample = AttentionSubsample(in_dim, out_dim, key_dim, num_heads,
                                                  attn_ratio, table_hw, 2, attn_impl)
        self.mlp = Mlp(out_dim, int(out_dim * mlp_ratio))
        self.drop_path = float(drop_path)

    def forward(self, x, hw):
        x = self.attn_downsample(x, hw)
        return residual_drop(x, self.mlp(x), self.drop_path, self.training)


class LeViTStage(BlockStage):
    """Optional shrink-attention downsample, then the blocks, each through ``run_block``, on
    ``(B, N, C)`` tokens of an ``hw`` grid: ``forward(x, hw) -> (x, hw)``."""

    def __init__(self, in_dim, dim, key_dim, depth, num_heads, table_hw, downsample, drop_path,
                 attn_impl, attn_ratio=2.0, mlp_ratio=2.0, with_cp=False):
        super().__init__(with_cp)
        if downsample:
            # official down_ops: ('Subsample', key_dim, in_dim // key_dim, 4, 2, 2)
            self.downsample = LeViTDownsample(in_dim, dim, key_dim, in_dim // key_dim, 4.0, 2.0,
                                              table_hw, drop_path, attn_impl)
            table_hw = tuple(_ceil_half(r) for r in table_hw)
        else:
            self.downsample = None
        self.table_hw = table_hw
        self.blocks = nn.ModuleList(
            LeViTBlock(dim, key_dim, num_heads, attn_ratio, mlp_ratio, table_hw, drop_path,
                       attn_impl) for _ in range(depth))

    def forward(self, x, hw):
        if self.downsample is not None:
            x = self.run_block(self.downsample, x, hw)
            hw = self.downsample.attn_downsample.out_hw(hw)
        for block in self.blocks:
            x = self.run_block(block, x, hw)
        return x, hw


class Stem(nn.Module):
    """Four conv3x3/2-BN (official ``b16``); Hardswish after the first three."""

    def __init__(self, in_channels, dim):
        super().__init__()
        self.conv1 = ConvBN(in_channels, dim // 8, 3, 2, 1)
        self.act1 = nn.Hardswish()
        self.conv2 = ConvBN(dim // 8, dim // 4, 3, 2, 1)
        self.act2 = nn.Hardswish()
        self.conv3 = ConvBN(dim // 4, dim // 2, 3, 2, 1)
        self.act3 = nn.Hardswish()
        self.conv4 = ConvBN(dim // 2, dim, 3, 2, 1)


@MODELS.register_module()
class LeViT(BaseDenseBackbone):
    """LeViT backbone returning stride-4/8/16/32(/64) maps for any input (sides % 32 == 0).

    Args:
        arch (str | dict): ``'128s'``, ``'128'``, ``'192'``, ``'256'``, ``'384'`` (also
            ``'LeViT-128S'`` ...) or a dict with ``embed_dims``, ``key_dim``, ``num_heads``,
            ``depths``.
        in_channels (int): input channels. Default 3.
        out_indices (Sequence[int]): 0..4 = strides 4, 8, 16, 32, 64. Default ``(0, 1, 2, 3)``.
            Channels: ``embed_dims[0] // 4``, ``embed_dims[0] // 2``, then ``embed_dims``.
        drop_path_rate (float): the official ``Residual`` drop: the same rate on every residual
            attention / MLP (not a linear schedule; the shrink attention has no residual).
        frozen_stages (int): -1 none; 0 freezes ``stem.conv1`` (stride 2); ``k`` in 1..5 also
            freezes what produces out indices ``0..k-1``: 1 ``stem.conv2``, 2 ``stem.conv3``,
            3 ``stem.conv4`` + ``stages[0]``, 4 ``stages[1]``, 5 ``stages[2]``.
        norm_eval (bool): keep BatchNorms in eval mode while training.
        with_cp (bool): activation checkpointing per LeViT block / downsample while training.
        attn_impl (str): how ``softmax(q k^T * key_dim**-0.5 + bias) v`` is computed (same
            values; see docs/levit.md for measured memory):
            ``'chunked'`` (default): ``F.scaled_dot_product_attention`` with the bias as an
            additive float mask, over chunks of query rows (``chunk_elems`` score elements each,
            one chunk at 224), each chunk checkpointed while training: no ``Nq x Nk`` score,
            softmax or bias tensor is kept, and the eval cache holds only the offset tables.
            ``'sdpa'``: one SDPA call with the full ``(heads, Nq, Nk)`` bias (cached in eval).
            ``'naive'``: the official ``(q @ k^T) * scale + bias``, softmax, ``@ v``.
        pretrain_img_size (int): input size the bias tables were trained at (224: tables of
            14x14 / 7x7 / 4x4 offsets). Only changes parameter shapes; runtime sizes are free.
        init_cfg (dict): ``dict(type='Pretrained', checkpoint=PATH)``: official ``LeViT-*.pth``
            (``model`` wrapper, index buffers included) or timm ``levit_*`` / ``levit_conv_*``.
    """
    arch_zoo = {
        '128s': dict(embed_dims=(128, 256, 384), key_dim=16, num_heads=(4, 6, 8),
                     depths=(2, 3, 4)),
        '128': dict(embed_dims=(128, 256, 384), key_dim=16, num_heads=(4, 8, 12),
                    depths=(4, 4, 4)),
        '192': dict(embed_dims=(192, 288, 384), key_dim=32, num_heads=(3, 5, 6),
                    depths=(4, 4, 4)),
        '256': dict(embed_dims=(256, 384, 512), key_dim=32, num_heads=(4, 6, 8),
                    depths=(4, 4, 4)),
        '384': dict(embed_dims=(384, 512, 768), key_dim=32, num_heads=(6, 9, 12),
                    depths=(4, 4, 4)),
    }
    arch_aliases = {f'levit{k}': k for k in ('128s', '128', '192', '256', '384')}
    arch_keys = ('embed_dims', 'key_dim', 'num_heads', 'depths')
    size_divisor = 32
    #: same weights, other attention implementations: timed side by side by tools/benchmark.py
    benchmark_variants = {'attn=sdpa': dict(attn_impl='sdpa'),
                          'attn=naive': dict(attn_impl='naive')}
    strides = (4, 8, 16, 32, 64)
    ignored_key_patterns = ('head.*', 'head_dist.*', '*attention_bias_idxs')

    def __init__(self, arch='128s', in_channels=3, out_indices=(0, 1, 2, 3), drop_path_rate=0.0,
                 frozen_stages=-1, norm_eval=False, with_cp=False, attn_impl='chunked',
                 pretrain_img_size=224, init_cfg=None):
        super().__init__(arch, in_channels, out_indices, frozen_stages, norm_eval, with_cp,
                         drop_path_rate, init_cfg)
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f'attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}')
        s = self.arch_settings
        dims, depths, heads = tuple(s['embed_dims']), tuple(s['depths']), tuple(s['num_heads'])
        key_dim = int(s['key_dim'])
        if not len(dims) == len(depths) == len(heads) == 3:
            raise ValueError('LeViT arch needs 3 embed_dims, depths and num_heads')
        if dims[0] % 8 or any(d % key_dim for d in dims[:2]):
            raise ValueError(f'LeViT arch: embed_dims[0] must be a multiple of 8 and '
                             f'embed_dims[0:2] multiples of key_dim, got {dims}, {key_dim}')
        if pretrain_img_size % 16:
            raise ValueError(f'pretrain_img_size must be a multiple of 16, got '
                             f'{pretrain_img_size}')
        self.attn_impl = attn_impl
        self.channels = (dims[0] // 4, dims[0] // 2) + dims

        self.stem = Stem(in_channels, dims[0])
        table_hw = (pretrain_img_size // 16,) * 2
        stages = []
        for i in range(3):
            stage = LeViTStage(dims[i - 1] if i else dims[0], dims[i], key_dim, depths[i],
                               heads[i], table_hw, downsample=i > 0,
                               drop_path=self.drop_path_rate, attn_impl=attn_impl,
                               with_cp=self.with_cp)
            table_hw = stage.table_hw
            stages.append(stage)
        self.stages = nn.ModuleList(stages)
        self._freeze_stages()

    def stage_groups(self):
        st = self.stem
        return [[st.conv1], [st.conv2], [st.conv3], [st.conv4, self.stages[0]],
                [self.stages[1]], [self.stages[2]]]

    def forward(self, x):
        self.check_input(x)
        last = self.out_indices[-1]
        st = self.stem
        outs = []
        x = st.act1(st.conv1(x))
        x = st.act2(st.conv2(x))
        if 0 in self.out_indices:
            outs.append(x)
        if last == 0:
            return tuple(outs)
        x = st.act3(st.conv3(x))
        if 1 in self.out_indices:
            outs.append(x)
        if last == 1:
            return tuple(outs)
        x = st.conv4(x)
        hw = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)
        for i, stage in enumerate(self.stages):
            x, hw = stage(x, hw)
            if i + 2 in self.out_indices:
                outs.append(x.transpose(1, 2).reshape(x.shape[0], -1, *hw))
            if i + 2 >= last:
                break
        return tuple(outs)

    # ---------------------------------------------------------------------------------------
    def checkpoint_filter_fn(self, state_dict):
        """Official flat layout, timm ``levit_*`` / ``levit_conv_*`` layouts -> ours.

        * official: ``patch_embed.{0,2,4,6}`` -> ``stem.conv{1..4}``; the flat ``blocks.{n}``
          get their place in our tree from the file's own structure (``m.qkv``: attention,
          ``m.0``: MLP, ``kv``: shrink attention, whose MLP is ``blocks.{n+1}``:
          :func:`_official_block_rules`), so a file of another variant fails with a clear
          shape / key report instead of being silently re-sliced.
        * timm: same tree as ours with ``linear`` instead of ``c``; ``levit_conv_*`` stores the
          token Linear weights as 1x1 convs ``(out, in, 1, 1)``, squeezed here.
        * ``attention_bias_idxs`` buffers (official files) keep their name and are reported as
          ignored: our indices are built for the runtime grid, never read from a file.
        """
        keys = list(state_dict)
        if any(k.startswith(('patch_embed.', 'blocks.')) for k in keys):
            return rename_keys(state_dict, _official_block_rules(keys), layout='official')
        if any(k.startswith('stem.conv1.linear.') for k in keys) or any(
                '.linear.' in k and k.startswith('stages.') for k in keys):
            conv = any(k.startswith('stages.') and k.endswith('.linear.weight') and v.dim() == 4
                       for k, v in state_dict.items())
            return rename_keys(state_dict, [(r'\.linear\.', '.c.')],
                               layout='timm_conv' if conv else 'timm',
                               value_rules=[(r'^stages\..*\.c\.weight$', _squeeze_1x1)])
        return rename_keys(state_dict, (), layout='native')


def _squeeze_1x1(v):
    return v[:, :, 0, 0] if v.dim() == 4 and v.shape[2:] == (1, 1) else v


def _official_block_rules(keys):
    """The renaming rules of an official LeViT file, from the order of its ``blocks.{n}``."""
    kinds = {}
    for k in keys:
        m = re.match(r'blocks\.(\d+)\.(m\.qkv|m\.0|kv)\.', k)
        if m:
            kinds[int(m[1])] = {'m.qkv': 'attn', 'm.0': 'mlp', 'kv': 'sub'}[m[2]]
    # walk the file's blocks: n -> our module prefix
    prefix, stage, j, after_sub = {}, 0, 0, False
    for n in sorted(kinds):
        kind = kinds[n]
        if kind == 'sub':
            stage, j, after_sub = stage + 1, 0, True
            prefix[n] = f'stages.{stage}.downsample.attn_downsample.'
        elif kind == 'mlp' and after_sub:
            prefix[n] = f'stages.{stage}.downsample.mlp.'
            after_sub = False
        elif kind == 'attn':
            prefix[n] = f'stages.{stage}.blocks.{j}.attn.'
        else:   # the MLP closing block j (official: attention, MLP pairs)
            prefix[n] = f'stages.{stage}.blocks.{j}.mlp.'
            j += 1
    stem = {'0': 'conv1', '2': 'conv2', '4': 'conv3', '6': 'conv4'}
    return [
        (r'^patch_embed\.([0246])\.', lambda m: f'stem.{stem[m[1]]}.'),
        (r'^blocks\.(\d+)\.', lambda m: prefix.get(int(m[1]), m[0])),
        # inside the blocks: official Sequential indices -> our names
        (r'(\.attn_downsample\.)(q|proj)\.1\.', r'\1\2.ln.'),
        (r'(\.blocks\.\d+\.attn\.)m\.proj\.1\.', r'\1proj.ln.'),
        (r'(\.blocks\.\d+\.attn\.)m\.', r'\1'),
        (r'(\.mlp\.)m\.0\.', r'\1ln1.'),
        (r'(\.mlp\.)m\.2\.', r'\1ln2.'),
    ]


__all__ = ['LeViT', 'Attention', 'AttentionSubsample']
