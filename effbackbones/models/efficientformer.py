"""EfficientFormer v1 (Li et al., NeurIPS 2022) as a dense-prediction backbone.

Architecture = the official code (snap-research/EfficientFormer ``models/efficientformer.py``),
dense mode = its detection/segmentation backbone (``detection/backbone.py``,
``efficientformer_lX_feat``, ``fork_feat=True``): a ``GroupNorm(1, C)`` on every returned map.
Module names follow timm's ``efficientformer`` layout, so timm weights load as they are; the
official classification and dense layouts are renamed by :meth:`checkpoint_filter_fn`.

    stem            conv3x3/2-BN-ReLU, conv3x3/2-BN-ReLU                       stride 4
    stages[i]       downsample (conv3x3/2 + BN, i > 0) + blocks          strides 4, 8, 16, 32
      blocks        Meta4D x depth (pool mixer + conv-BN MLP, NCHW); in stage 3 the last
                    ``num_vit`` blocks are Meta3D (attention + linear MLP on (B, N, C) tokens
                    with LayerNorm), preceded by a parameter-free ``Flat`` block
    out_norms[i]    GroupNorm(1, C) per returned map (official ``norm0/2/4/6``)

Attention biases (``bias_mode``)
--------------------------------
``'official'`` (default) reproduces the official dense code: every Meta3D attention owns a new
table ``attention_biases_seg`` (heads, G*G) over the offsets of a fixed G x G grid, G =
``bias_grid`` (zeros at init; a classification checkpoint cannot provide it, so it is learnt from
scratch): 25 in the official detection backbone (``detection/backbone.py``, (8, 625)), 16 in the
ADE20K one (``segmentation/backbone.py``, (8, 256)). The gathered (heads, G*G, G*G) bias is
resized bicubically (``align_corners=False``) to (N, N) for the runtime token count N. The
ImageNet table ``attention_biases`` (heads, 49) is loaded but unused; it is a persistent,
non-trainable *buffer* here (as in the official dense code), so DDP never sees a parameter
without gradient.

``'pretrained'`` (our extension) keeps the ImageNet table ``attention_biases`` (heads, 49) as the
trainable parameter and adapts the 7x7 table over (|dy|, |dx|) to the runtime grid (H, W) with
the rule shared with LeViT and EfficientFormerV2 (:mod:`.attention_bias`): per dimension it is
cropped where the grid side is <= 7 (the learned values stay exact) and resized bicubically where
it is larger, then gathered with ``|dy| * W + |dx|``. At the pretraining grid (224 input -> 7x7)
nothing changes and the features are exactly those of the classification model. No ``_seg`` table
exists in this mode, and a file that holds them (an official dense release) is an error: its
weights were trained with those tables (policy shared with V2:
:func:`~effbackbones.checkpoint.reject_dense_tables`).
"""
import torch.nn as nn

from ..checkpoint import reject_dense_tables, rename_keys
from ..registry import MODELS
from .attention_bias import (DETECTION_BIAS_GRID, RelPosBiasAttention,
                             check_bias_grid)
from .base import BaseDenseBackbone, BlockStage
from .layers import (ConvBN, LayerScale, LayerScale2d, drop_path_or_identity, fold_bn_,
                     fold_layer_scale_, stochastic_depth_schedule)


class Stem(nn.Module):
    """Two conv3x3/2 + BN + ReLU (stride 4)."""

    def __init__(self, in_channels, dim):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, dim // 2, 3, stride=2, padding=1)
        self.norm1 = nn.BatchNorm2d(dim // 2)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1)
        self.norm2 = nn.BatchNorm2d(dim)
        self.act2 = nn.ReLU()

    def forward(self, x):
        x = self.act1(self.norm1(self.conv1(x)))
        return self.act2(self.norm2(self.conv2(x)))

    def switch_to_deploy(self):
        fold_bn_(self, 'conv1', 'norm1')
        fold_bn_(self, 'conv2', 'norm2')


def downsample_conv_bn(in_dim, out_dim):
    """Conv3x3/2 + BN between stages (official ``Embedding``; timm names ``conv`` / ``norm``)."""
    return ConvBN(in_dim, out_dim, 3, 2, 1, bias=True, names=('conv', 'norm'))


class Pooling(nn.Module):
    """PoolFormer token mixer: ``avgpool3x3(x) - x`` (padding not counted)."""

    def __init__(self, pool_size=3):
        super().__init__()
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2,
                                 count_include_pad=False)

    def forward(self, x):
        return self.pool(x) - x


class ConvMlpBN(nn.Module):
    """1x1 conv -> BN -> GELU -> 1x1 conv -> BN (official conv ``Mlp``; BNs fold on deploy)."""

    def __init__(self, dim, hidden_dim, drop=0.0):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.norm1 = nn.BatchNorm2d(hidden_dim)
        self.act = nn.GELU()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)
        self.norm2 = nn.BatchNorm2d(dim)

    def forward(self, x):
        x = self.drop(self.act(self.norm1(self.fc1(x))))
        return self.drop(self.norm2(self.fc2(x)))

    def switch_to_deploy(self):
        fold_bn_(self, 'fc1', 'norm1')
        fold_bn_(self, 'fc2', 'norm2')


class TokenMlp(nn.Module):
    """Linear -> GELU -> Linear on (B, N, C) tokens (official ``LinearMlp``)."""

    def __init__(self, dim, hidden_dim, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Meta4D(nn.Module):
    """NCHW block: ``x + ls1 * (pool(x) - x)``, then ``x + ls2 * mlp(x)``."""

    def __init__(self, dim, mlp_ratio=4.0, pool_size=3, drop=0.0, drop_path=0.0,
                 layer_scale_init=1e-5):
        super().__init__()
        self.token_mixer = Pooling(pool_size)
        self.ls1 = LayerScale2d(dim, layer_scale_init)
        self.mlp = ConvMlpBN(dim, int(dim * mlp_ratio), drop)
        self.ls2 = LayerScale2d(dim, layer_scale_init)
        self.drop_path = drop_path_or_identity(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.ls1(self.token_mixer(x)))
        return x + self.drop_path(self.ls2(self.mlp(x)))

    def switch_to_deploy(self):
        self.mlp.switch_to_deploy()      # the BN after fc2 first, then the scale
        fold_layer_scale_(self, 'ls2', self.mlp.fc2)


class Flat(nn.Module):
    """NCHW -> (B, H*W, C): the transition before the first Meta3D block (no parameters)."""

    def forward(self, x):
        return x.flatten(2).transpose(1, 2)


class Attention(RelPosBiasAttention):
    """Multi-head self-attention with a learnt relative-position bias (official ``Attention``).

    ``qkv`` is split per head into ``key_dim`` / ``key_dim`` / ``attn_ratio * key_dim``
    (interleaved per head, as in the official code). The bias of a runtime grid ``hw`` comes from
    the shared :class:`~.attention_bias.RelPosBiasAttention` (see the module docstring for the two
    ``bias_mode``\\ s): the 7x7 pretraining table ``attention_biases`` and, in official mode, the
    ``bias_grid`` x ``bias_grid`` dense table ``attention_biases_seg``. In eval mode the biases
    of the last ``cache_size`` grid sizes are cached (like the official ``self.ab``).
    """

    def __init__(self, dim, key_dim=32, num_heads=8, attn_ratio=4, resolution=7,
                 bias_mode='official', bias_grid=DETECTION_BIAS_GRID, cache_size=4):
        super().__init__()
        self.init_heads(num_heads, key_dim, attn_ratio)
        self.qkv = nn.Linear(dim, num_heads * (2 * key_dim + self.val_dim))
        self.proj = nn.Linear(self.val_attn_dim, dim)
        self.init_relative_position_bias(num_heads, (resolution, resolution), 1, bias_mode,
                                         (bias_grid, bias_grid), cache_size)

    def forward(self, x, hw):
        b, n, _ = x.shape
        if n != hw[0] * hw[1]:
            raise ValueError(f'{n} tokens do not form a {hw[0]}x{hw[1]} grid')
        q, k, v = self.qkv(x).reshape(b, n, self.num_heads, -1).split(
            [self.key_dim, self.key_dim, self.val_dim], dim=3)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = (attn + self.attention_bias(hw, hw)).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, self.val_attn_dim)
        return self.proj(x)


class Meta3D(nn.Module):
    """(B, N, C) block: LN -> attention, LN -> linear MLP, each with a scaled residual."""

    def __init__(self, dim, mlp_ratio=4.0, drop=0.0, drop_path=0.0, layer_scale_init=1e-5,
                 **attn_kwargs):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mixer = Attention(dim, **attn_kwargs)
        self.ls1 = LayerScale(dim, layer_scale_init)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = TokenMlp(dim, int(dim * mlp_ratio), drop)
        self.ls2 = LayerScale(dim, layer_scale_init)
        self.drop_path = drop_path_or_identity(drop_path)

    def forward(self, x, hw):
        x = x + self.drop_path(self.ls1(self.token_mixer(self.norm1(x), hw)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))

    def switch_to_deploy(self):
        fold_layer_scale_(self, 'ls1', self.token_mixer.proj)
        fold_layer_scale_(self, 'ls2', self.mlp.fc2)


class EfficientFormerStage(BlockStage):
    """Downsample (conv3x3/2 + BN, stages 1-3), then the blocks, each through ``run_block``:
    Meta4D blocks on the NCHW map, then (last stage) ``Flat`` and the Meta3D blocks on the
    ``(B, H*W, C)`` tokens of the same grid. Returns the NCHW map."""

    def __init__(self, in_dim, dim, depth, drop_path_rates, downsample, num_vit=0,
                 mlp_ratio=4.0, pool_size=3, layer_scale_init=1e-5, attn_kwargs=None,
                 with_cp=False):
        super().__init__(with_cp)
        self.downsample = downsample_conv_bn(in_dim, dim) if downsample else nn.Identity()
        blocks = []
        if num_vit and num_vit >= depth:
            blocks.append(Flat())
        for j in range(depth):
            if depth - j <= num_vit:
                blocks.append(Meta3D(dim, mlp_ratio, drop_path=drop_path_rates[j],
                                     layer_scale_init=layer_scale_init, **(attn_kwargs or {})))
            else:
                blocks.append(Meta4D(dim, mlp_ratio, pool_size, drop_path=drop_path_rates[j],
                                     layer_scale_init=layer_scale_init))
                if num_vit and depth - j - 1 == num_vit:
                    blocks.append(Flat())
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        x = self.downsample(x)
        b, c, h, w = x.shape
        for block in self.blocks:
            if isinstance(block, Flat):
                x = block(x)
            elif isinstance(block, Meta3D):
                x = self.run_block(block, x, (h, w))
            else:
                x = self.run_block(block, x)
        if x.dim() == 3:
            x = x.transpose(1, 2).reshape(b, c, h, w)
        return x


@MODELS.register_module()
class EfficientFormer(BaseDenseBackbone):
    """EfficientFormer (v1) backbone returning stride-4/8/16/32 maps.

    Args:
        arch (str | dict): ``'l1'``, ``'l3'``, ``'l7'`` or a dict with ``widths``, ``depths``,
            ``num_vit`` (Meta3D blocks at the end of stage 3) and optionally
            ``layer_scale_init``, ``mlp_ratio``, ``pool_size``.
        bias_mode (str): ``'official'`` (default, the official dense code: a new table
            ``attention_biases_seg`` on a fixed grid, resized to the token count) or
            ``'pretrained'`` (the ImageNet 7x7 table cropped / resized to the runtime grid). See
            the module docstring.
        bias_grid (int): ``bias_mode='official'`` only: side of the fixed grid of
            ``attention_biases_seg`` (the stride-32 token grid the official tables are laid out
            on). 25 (default) = the official detection backbone, 16 = the official ADE20K
            segmentation backbone; a released dense file fits only its own value.
        in_channels (int): input channels. Default 3.
        out_indices (Sequence[int]): which stages to return. Default all four.
        drop_path_rate (float): stochastic depth; official schedule, block ``k`` of the whole
            network (``K`` blocks) gets ``drop_path_rate * k / (K - 1)``.
        frozen_stages (int): -1 none, 0 the stem, k the stem and stages 0..k-1 (with norms).
        norm_eval (bool): keep BatchNorms in eval mode while training.
        with_cp (bool): activation checkpointing per block.
        bias_cache_size (int): attention biases of this many input sizes are kept per
            attention block in eval mode (0: no cache).
        init_cfg (dict): ``dict(type='Pretrained', checkpoint=PATH)`` loads an official
            classification (``model``) or dense checkpoint, or a timm checkpoint.

    Input sides need not be multiples of 32: every stride-2 conv pads by 1, so a side ``L``
    gives maps of ``ceil(L / 4)``, then halves rounding up; attention works for any grid.
    """
    arch_zoo = {
        'l1': dict(widths=[48, 96, 224, 448], depths=[3, 2, 6, 4], num_vit=1,
                   layer_scale_init=1e-5),
        'l3': dict(widths=[64, 128, 320, 512], depths=[4, 4, 12, 6], num_vit=4,
                   layer_scale_init=1e-5),
        'l7': dict(widths=[96, 192, 384, 768], depths=[6, 6, 18, 8], num_vit=8,
                   layer_scale_init=1e-6),
    }
    arch_aliases = {'efficientformerl1': 'l1', 'efficientformerl3': 'l3',
                    'efficientformerl7': 'l7'}
    arch_keys = ('widths', 'depths', 'num_vit')
    size_divisor = None
    new_key_patterns = ('out_norms.*', '*.attention_biases_seg')
    ignored_key_patterns = ('head.*', 'head_dist.*', 'dist_head.*', 'norm.*',
                            '*.attention_bias_idxs', '*.attention_bias_idxs_seg')

    def __init__(self, arch='l1', bias_mode='official', bias_grid=DETECTION_BIAS_GRID,
                 in_channels=3, out_indices=(0, 1, 2, 3), drop_path_rate=0.0, frozen_stages=-1,
                 norm_eval=False, with_cp=False, bias_cache_size=4, init_cfg=None):
        super().__init__(arch, in_channels, out_indices, frozen_stages, norm_eval, with_cp,
                         drop_path_rate, init_cfg)
        self.bias_mode = bias_mode
        self.bias_grid = check_bias_grid(bias_grid, bias_mode)
        s = self.arch_settings
        widths, depths = list(s['widths']), list(s['depths'])
        num_vit = int(s['num_vit'])
        if len(widths) != 4 or len(depths) != 4:
            raise ValueError('EfficientFormer arch needs 4 widths and 4 depths')
        if not 0 <= num_vit <= depths[3]:
            raise ValueError(f'num_vit must be in [0, depths[3]={depths[3]}], got {num_vit}')
        self.num_vit = num_vit
        self.channels = tuple(widths)

        attn_kwargs = dict(bias_mode=bias_mode, bias_grid=bias_grid, cache_size=bias_cache_size)
        self.stem = Stem(in_channels, widths[0])
        dpr = stochastic_depth_schedule(depths, self.drop_path_rate)
        stages = []
        for i in range(4):
            stages.append(EfficientFormerStage(
                widths[i - 1] if i else widths[0], widths[i], depths[i], dpr[i], downsample=i > 0,
                num_vit=num_vit if i == 3 else 0, mlp_ratio=s.get('mlp_ratio', 4.0),
                pool_size=s.get('pool_size', 3),
                layer_scale_init=s.get('layer_scale_init', 1e-5), attn_kwargs=attn_kwargs,
                with_cp=self.with_cp))
        self.stages = nn.ModuleList(stages)
        self.out_norms = nn.ModuleList(
            nn.GroupNorm(1, widths[i]) if i in self.out_indices else nn.Identity()
            for i in range(4))

        # What a checkpoint may lack / carry beyond this instance (see load_pretrained).
        self.new_key_patterns = ('out_norms.*',) + (
            ('*.attention_biases_seg',) if bias_mode == 'official' else ())
        self.ignored_key_patterns = type(self).ignored_key_patterns + tuple(
            f'out_norms.{i}.*' for i in range(4) if i not in self.out_indices)
        self._freeze_stages()

    def stage_groups(self):
        return [[self.stem]] + [[self.stages[i], self.out_norms[i]] for i in range(4)]

    def forward(self, x):
        self.check_input(x)
        return self.forward_stages(self.stem(x), self.out_norms)

    # ---------------------------------------------------------------------------------------
    def checkpoint_filter_fn(self, state_dict):
        """Official (classification or dense ``fork_feat``) or timm layout -> ours.

        Our names are timm's (``stem.conv1``, ``stages.{i}.downsample.conv``,
        ``stages.{i}.blocks.{j}.ls1.gamma``...) plus ``out_norms.{i}`` and the official-mode
        ``attention_biases_seg``, so a timm file only needs its head dropped (ignored keys).
        With ``bias_mode='pretrained'`` a file holding dense tables is refused
        (:func:`~effbackbones.checkpoint.reject_dense_tables`).
        """
        keys = list(state_dict)
        if any(k.startswith(('network.', 'patch_embed.')) for k in keys):
            out = rename_keys(state_dict, _OFFICIAL_RULES, layout='official')
        else:
            native = any(k.startswith('out_norms.') or k.endswith('.attention_biases_seg')
                         for k in keys)
            timm = not native and any(k.startswith('stages.') for k in keys)
            out = rename_keys(state_dict, (), layout='timm' if timm else 'native')
        reject_dense_tables(out, self)
        return out


_STEM_NAMES = {'0': 'conv1', '1': 'norm1', '3': 'conv2', '4': 'norm2'}
#: official ``patch_embed`` / ``network.{2i}.{j}`` (blocks) / ``network.{2i-1}`` (downsample) /
#: ``norm{0,2,4,6}`` -> ours, applied in order by :func:`~effbackbones.checkpoint.rename_keys`
_OFFICIAL_RULES = [
    (r'^patch_embed\.(\d+)\.', lambda m: f'stem.{_STEM_NAMES.get(m[1], m[1])}.'),
    (r'^network\.(\d+)\.(\d+)\.', lambda m: f'stages.{int(m[1]) // 2}.blocks.{m[2]}.'),
    (r'^network\.(\d+)\.proj\.', lambda m: f'stages.{(int(m[1]) + 1) // 2}.downsample.conv.'),
    (r'^network\.(\d+)\.norm\.', lambda m: f'stages.{(int(m[1]) + 1) // 2}.downsample.norm.'),
    (r'^norm([0246])\.', lambda m: f'out_norms.{int(m[1]) // 2}.'),
    (r'^dist_head\.', 'head_dist.'),
    (r'\.layer_scale_([12])$', r'.ls\1.gamma'),
]


__all__ = ['EfficientFormer']
