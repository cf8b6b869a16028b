"""EfficientFormerV2 (Li et al., ICCV 2023) as a dense-prediction backbone.

Architecture = the official dense backbone (snap-research/EfficientFormer
``detection/backbonev2.py``, ``efficientformerv2_{s0,s1,s2,l}_feat``): four stages of
``FFN`` blocks (1x1 conv MLP with a depth-wise 3x3 "mid" conv), attention blocks
(``Attention4D`` with talking heads and a local depth-wise value path) at the end of stages 3
and 4, and an attention downsample (``Attention4DDownsample`` + strided conv) before stage 4.
The official dense code returns the raw stage outputs (no output norms) and so does this class.
Module names follow timm's ``efficientformerv2`` layout, so timm weights load unchanged; the
official classification and dense layouts are renamed by :meth:`checkpoint_filter_fn`.

    stem            conv3x3/2-BN-GELU, conv3x3/2-BN-GELU                          stride 4
    stages[0]       blocks                                                        stride 4
    stages[1, 2]    downsample (conv3x3/2 + BN) + blocks                          strides 8, 16
    stages[3]       downsample (conv3x3/2 + BN  +  Attention2dDownsample) + blocks  stride 32
      blocks        FFN x (depth - vit_num), AttnFFN x vit_num (stages 2 and 3 only; the
                    stage-2 attention works on a stride-2 copy of the map and upsamples)

Attention biases, two modes (``bias_mode``):

* ``'official'`` (default; what the official dense backbone and the paper's detection /
  segmentation results use): each attention owns ``attention_biases_seg`` = an offset table
  for the fixed class resolution ``32 * bias_grid`` (G x G offsets for the attention blocks,
  2G x 2G for the downsample, G = ``bias_grid``), gathered into a (heads, G*G, G*G) /
  (heads, G*G, 4*G*G) matrix that is resized bicubically (``F.interpolate``,
  align_corners=False) to the real (Nq, Nk) of the input. The official detection backbone
  (``detection/backbonev2.py``, resolution 800) has G = 25, the ADE20K one
  (``segmentation/backbonev2.py``, resolution 512) G = 16. A classification checkpoint cannot
  provide these tables: they start at zero as in the official code. The ImageNet tables
  ``attention_biases`` are loaded but unused (persistent, non-trainable buffers, so distributed
  training never sees unused parameters).
* ``'pretrained'``: the ImageNet tables ``attention_biases`` are the trainable biases. Each
  per-head table is an image over the (|dy|, |dx|) offset grid of the ImageNet key grid (7x7
  for the attention blocks, 14x14 for the downsample); it is brought to the runtime key grid
  (non-square too) with the rule shared with LeViT and EfficientFormer v1
  (:mod:`.attention_bias`): per dimension cropped where the runtime side is smaller or equal (the
  learned values stay exact), resized bicubically where larger; then gathered with the (strided)
  offset index. At 224x224 input this is exactly the classification model. A file holding
  dense tables (an official dense release) is an error in this mode: its weights were trained
  with those tables (policy shared with v1: :func:`~effbackbones.checkpoint.reject_dense_tables`).
"""
import math

import torch.nn as nn

from ..checkpoint import reject_dense_tables, rename_keys
from ..registry import MODELS
from .attention_bias import (DETECTION_BIAS_GRID, RelPosBiasAttention,
                             check_bias_grid)
from .base import BaseDenseBackbone, BlockStage
from .layers import (ConvBN, LayerScale2d, drop_path_or_identity, fold_layer_scale_,
                     stochastic_depth_schedule)


# --------------------------------------------------------------------------------------------
# small building blocks
# --------------------------------------------------------------------------------------------
def conv_norm(in_channels, out_channels, kernel_size=1, stride=1, padding=0, groups=1):
    """``Conv2d`` (with bias, as in the official code) + ``BatchNorm2d``, children ``conv`` /
    ``bn`` as in timm's ``ConvNorm``; folds into one conv on deploy."""
    return ConvBN(in_channels, out_channels, kernel_size, stride, padding, groups=groups,
                  bias=True, names=('conv', 'bn'))


class Mlp(nn.Module):
    """1x1 conv-BN-GELU, depth-wise 3x3 conv-BN-GELU, 1x1 conv-BN (official ``Mlp(mid_conv=True)``,
    timm ``ConvMlpWithNorm``)."""

    def __init__(self, dim, hidden_dim, drop=0.0):
        super().__init__()
        self.fc1 = conv_norm(dim, hidden_dim)
        self.act = nn.GELU()
        self.mid = conv_norm(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim)
        self.drop = nn.Dropout(drop)
        self.fc2 = conv_norm(hidden_dim, dim)

    def forward(self, x):
        x = self.act(self.fc1(x))
        x = self.drop(self.act(self.mid(x)))
        return self.drop(self.fc2(x))


class Stem(nn.Module):
    """Two conv3x3/2-BN-GELU (official ``stem``, timm ``Stem4``)."""

    def __init__(self, in_channels, dim):
        super().__init__()
        self.conv1 = conv_norm(in_channels, dim // 2, 3, stride=2, padding=1)
        self.act1 = nn.GELU()
        self.conv2 = conv_norm(dim // 2, dim, 3, stride=2, padding=1)
        self.act2 = nn.GELU()

    def forward(self, x):
        return self.act2(self.conv2(self.act1(self.conv1(x))))


# --------------------------------------------------------------------------------------------
# attention (biases: the shared RelPosBiasAttention)
# --------------------------------------------------------------------------------------------
class Attention2d(RelPosBiasAttention):
    """Official ``Attention4D``: multi-head attention on an NCHW map with talking heads, a local
    depth-wise value path, and (stride 2, stage 3) a strided copy of the map that is upsampled
    back. ``resolution`` = (pretraining, dense) side of the map *before* the stride."""

    def __init__(self, dim, key_dim=32, num_heads=8, attn_ratio=4, stride=None,
                 resolution=(7, 25), bias_mode='official', cache_size=2):
        super().__init__()
        self.init_heads(num_heads, key_dim, attn_ratio)
        if stride is not None:
            self.stride_conv = conv_norm(dim, dim, 3, stride=stride, padding=1, groups=dim)
            self.upsample = nn.Upsample(scale_factor=stride, mode='bilinear')
            res = tuple(math.ceil(r / stride) for r in resolution)
        else:
            self.stride_conv = None
            self.upsample = None
            res = tuple(resolution)
        dh = self.val_attn_dim
        self.q = conv_norm(dim, num_heads * key_dim)
        self.k = conv_norm(dim, num_heads * key_dim)
        self.v = conv_norm(dim, dh)
        self.v_local = conv_norm(dh, dh, 3, padding=1, groups=dh)
        self.talking_head1 = nn.Conv2d(num_heads, num_heads, 1)
        self.talking_head2 = nn.Conv2d(num_heads, num_heads, 1)
        self.act = nn.GELU()
        self.proj = conv_norm(dh, dim)
        self.init_relative_position_bias(num_heads, (res[0], res[0]), 1, bias_mode,
                                         (res[1], res[1]), cache_size)

    def forward(self, x):
        b = x.shape[0]
        h, w = x.shape[2:]
        if self.stride_conv is not None:
            x = self.stride_conv(x)
            h, w = h // 2, w // 2          # as the official code (sides multiple of 32)
        n = h * w
        q = self.q(x).reshape(b, self.num_heads, self.key_dim, n).transpose(-2, -1)
        k = self.k(x).reshape(b, self.num_heads, self.key_dim, n)
        v = self.v(x)
        v_local = self.v_local(v)
        v = v.reshape(b, self.num_heads, self.val_dim, n).transpose(-2, -1)
        attn = (q @ k) * self.scale
        attn = attn + self.attention_bias((h, w), (h, w))
        attn = self.talking_head1(attn).softmax(dim=-1)
        attn = self.talking_head2(attn)
        x = (attn @ v).transpose(-2, -1).reshape(b, self.val_attn_dim, h, w) + v_local
        if self.upsample is not None:
            x = self.upsample(x)
        return self.proj(self.act(x))


class LocalGlobalQuery(nn.Module):
    """Query of the attention downsample: strided depth-wise conv + strided sampling, 1x1 conv-BN
    (official ``LGQuery``)."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.pool = nn.AvgPool2d(1, 2, 0)
        self.local = nn.Conv2d(in_dim, in_dim, 3, stride=2, padding=1, groups=in_dim)
        self.proj = conv_norm(in_dim, out_dim)

    def forward(self, x):
        return self.proj(self.local(x) + self.pool(x))


class Attention2dDownsample(RelPosBiasAttention):
    """Official ``Attention4DDownsample``: queries on the stride-2 grid attend to the full map.
    ``resolution`` = (pretraining, dense) side of the key map."""

    def __init__(self, dim, out_dim, key_dim=16, num_heads=8, attn_ratio=4,
                 resolution=(14, 50), bias_mode='official', cache_size=2):
        super().__init__()
        self.init_heads(num_heads, key_dim, attn_ratio)
        dh = self.val_attn_dim
        self.q = LocalGlobalQuery(dim, num_heads * key_dim)
        self.k = conv_norm(dim, num_heads * key_dim)
        self.v = conv_norm(dim, dh)
        self.v_local = conv_norm(dh, dh, 3, stride=2, padding=1, groups=dh)
        self.act = nn.GELU()
        self.proj = conv_norm(dh, out_dim)
        # official query stride = ceil(res / ceil(res / 2)) = 2 for the even resolutions used
        self.init_relative_position_bias(num_heads, (resolution[0],) * 2, 2, bias_mode,
                                         (resolution[1],) * 2, cache_size)

    def forward(self, x):
        b = x.shape[0]
        h, w = x.shape[2:]
        qh, qw = h // 2, w // 2
        q = self.q(x).reshape(b, self.num_heads, self.key_dim, qh * qw).transpose(-2, -1)
        k = self.k(x).reshape(b, self.num_heads, self.key_dim, h * w)
        v = self.v(x)
        v_local = self.v_local(v)
        v = v.reshape(b, self.num_heads, self.val_dim, h * w).transpose(-2, -1)
        attn = (q @ k) * self.scale
        attn = attn + self.attention_bias((qh, qw), (h, w))
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(-2, -1).reshape(b, self.val_attn_dim, qh, qw) + v_local
        return self.proj(self.act(x))


class Downsample(nn.Module):
    """conv3x3/2 + BN between stages; before stage 4 plus an attention downsample (official
    ``Embedding``, ``asub=True``)."""

    def __init__(self, in_dim, out_dim, attn=None):
        super().__init__()
        self.conv = conv_norm(in_dim, out_dim, 3, stride=2, padding=1)
        self.attn = attn

    def forward(self, x):
        out = self.conv(x)
        if self.attn is not None:
            out = self.attn(x) + out
        return out


class EfficientFormerV2Block(nn.Module):
    """``FFN`` (mlp only) or ``AttnFFN`` (token mixer + mlp), each with a layer-scaled residual."""

    def __init__(self, dim, mlp_ratio, drop_path=0.0, token_mixer=None,
                 layer_scale_init=1e-5):
        super().__init__()
        self.token_mixer = token_mixer
        self.ls1 = LayerScale2d(dim, layer_scale_init) if token_mixer is not None else None
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale2d(dim, layer_scale_init)
        self.drop_path = drop_path_or_identity(drop_path)

    def forward(self, x):
        if self.token_mixer is not None:
            x = x + self.drop_path(self.ls1(self.token_mixer(x)))
        return x + self.drop_path(self.ls2(self.mlp(x)))

    def switch_to_deploy(self):
        """Fold the layer scales into the last conv of their branch (after its BN is folded)."""
        self.mlp.fc2.switch_to_deploy()
        fold_layer_scale_(self, 'ls2', self.mlp.fc2.conv)
        if self.token_mixer is not None:
            self.token_mixer.proj.switch_to_deploy()
            fold_layer_scale_(self, 'ls1', self.token_mixer.proj.conv)


class EfficientFormerV2Stage(BlockStage):
    """Downsample (stages 1-3; before stage 3 with the attention downsample), then the blocks;
    the downsample and each block run through ``run_block``."""

    def __init__(self, downsample, blocks, with_cp=False):
        super().__init__(with_cp)
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        if not isinstance(self.downsample, nn.Identity):
            x = self.run_block(self.downsample, x)
        for block in self.blocks:
            x = self.run_block(block, x)
        return x


@MODELS.register_module()
class EfficientFormerV2(BaseDenseBackbone):
    """EfficientFormerV2 backbone returning stride-4/8/16/32 maps (raw stage outputs).

    Args:
        arch (str | dict): ``'s0'``, ``'s1'``, ``'s2'``, ``'l'`` or a dict with ``widths``,
            ``depths``, ``mlp_ratios`` (one list per stage, one ratio per block) and
            ``vit_num`` (attention blocks at the end of stages 3 and 4).
        in_channels (int): input channels. Default 3.
        out_indices (Sequence[int]): which stages to return. Default all four.
        drop_path_rate (float): stochastic depth with the official schedule
            ``rate * global_block_index / (num_blocks - 1)`` (the official dense classes use
            0 / 0 / 0.02 / 0.1 for S0 / S1 / S2 / L).
        bias_mode (str): ``'official'`` (default, = the official dense backbone: dense tables
            at a fixed resolution, gathered matrix resized to the input) or ``'pretrained'`` (the
            ImageNet tables, cropped / resized as offset tables to the input grid). See the
            module doc.
        bias_grid (int): ``bias_mode='official'`` only: side of the stride-32 token grid of the
            dense tables, i.e. the official class ``resolution`` / 32 (stage tables G x G, the
            downsample's key grid 2G x 2G). 25 (default) = the official detection backbone
            (resolution 800), 16 = the official ADE20K segmentation backbone (resolution 512);
            a released dense file fits only its own value.
        bias_cache_size (int): gathered biases cached per input size in eval mode, per
            attention (LRU). 0 disables the cache. Default 2.
        frozen_stages (int): -1 none, 0 the stem, k the stem and stages 0..k-1.
        norm_eval (bool): keep BatchNorms in eval mode while training. Default False: the
            official V2 detection / segmentation runs convert BN to SyncBN and train it (the
            official dense class's ``train()`` override that freezes BN is ``norm_eval=True``).
        with_cp (bool): activation checkpointing per block.
        init_cfg (dict): ``dict(type='Pretrained', checkpoint=PATH)`` loads an official
            ImageNet (``model``) or dense checkpoint, or a timm checkpoint.

    Input sides must be multiples of 32 (the stage-3 attention works on a stride-2 copy of the
    stride-16 map and the downsample attention halves it again).
    """
    arch_zoo = {
        's0': dict(widths=[32, 48, 96, 176], depths=[2, 2, 6, 4], vit_num=2,
                   mlp_ratios=[[4, 4],
                               [4, 4],
                               [4, 3, 3, 3, 4, 4],
                               [4, 3, 3, 4]]),
        's1': dict(widths=[32, 48, 120, 224], depths=[3, 3, 9, 6], vit_num=2,
                   mlp_ratios=[[4, 4, 4],
                               [4, 4, 4],
                               [4, 4, 3, 3, 3, 3, 4, 4, 4],
                               [4, 4, 3, 3, 4, 4]]),
        's2': dict(widths=[32, 64, 144, 288], depths=[4, 4, 12, 8], vit_num=4,
                   mlp_ratios=[[4, 4, 4, 4],
                               [4, 4, 4, 4],
                               [4, 4, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4],
                               [4, 4, 3, 3, 3, 3, 4, 4]]),
        'l': dict(widths=[40, 80, 192, 384], depths=[5, 5, 15, 10], vit_num=6,
                  mlp_ratios=[[4, 4, 4, 4, 4],
                              [4, 4, 4, 4, 4],
                              [4, 4, 4, 4, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4],
                              [4, 4, 4, 3, 3, 3, 3, 4, 4, 4]]),
    }
    arch_aliases = {'large': 'l', 'efficientformerv2s0': 's0', 'efficientformerv2s1': 's1',
                    'efficientformerv2s2': 's2', 'efficientformerv2l': 'l'}
    arch_keys = ('widths', 'depths', 'mlp_ratios', 'vit_num')
    size_divisor = 32
    #: the dense bias tables: a classification / timm checkpoint cannot provide them
    new_key_patterns = ('*.attention_biases_seg',)
    #: heads + final norm of the classifier, and the index tables of any release (we compute
    #: our own, non-persistent)
    ignored_key_patterns = BaseDenseBackbone.ignored_key_patterns + (
        '*.attention_bias_idxs', '*.attention_bias_idxs_seg')

    #: resolution of the ImageNet model (``attention_biases`` tables); the official dense
    #: code's fixed resolution (``attention_biases_seg`` tables) is ``32 * bias_grid``
    pretrain_resolution = 224

    def __init__(self, arch='s0', in_channels=3, out_indices=(0, 1, 2, 3), drop_path_rate=0.0,
                 bias_mode='official', bias_grid=DETECTION_BIAS_GRID, bias_cache_size=2,
                 frozen_stages=-1, norm_eval=False, with_cp=False, init_cfg=None):
        super().__init__(arch, in_channels, out_indices, frozen_stages, norm_eval, with_cp,
                         drop_path_rate, init_cfg)
        if not isinstance(bias_cache_size, int) or bias_cache_size < 0:
            raise ValueError(f'bias_cache_size must be an int >= 0, got {bias_cache_size!r}')
        self.bias_mode = bias_mode
        self.bias_grid = check_bias_grid(bias_grid, bias_mode)
        dense_resolution = 32 * bias_grid
        widths = [int(c) for c in self.arch_settings['widths']]
        depths = [int(d) for d in self.arch_settings['depths']]
        mlp_ratios = [list(r) for r in self.arch_settings['mlp_ratios']]
        vit_num = int(self.arch_settings['vit_num'])
        if len(widths) != 4 or len(depths) != 4 or len(mlp_ratios) != 4:
            raise ValueError('EfficientFormerV2 arch needs 4 widths, 4 depths and 4 '
                             'mlp_ratios lists')
        if [len(r) for r in mlp_ratios] != depths:
            raise ValueError(f'mlp_ratios must give one ratio per block: lengths '
                             f'{[len(r) for r in mlp_ratios]} vs depths {depths}')
        if not 0 <= vit_num <= min(depths[2], depths[3]):
            raise ValueError(f'vit_num must be in [0, {min(depths[2], depths[3])}], '
                             f'got {vit_num}')
        self.channels = tuple(widths)
        self.vit_num = vit_num

        # side of the stage-i map at the pretraining / dense resolution (official ceil rule)
        def res(i):
            return (math.ceil(self.pretrain_resolution / 2 ** (i + 2)),
                    math.ceil(dense_resolution / 2 ** (i + 2)))

        attn_kw = dict(bias_mode=bias_mode, cache_size=bias_cache_size)
        self.stem = Stem(in_channels, widths[0])
        dpr = stochastic_depth_schedule(depths, self.drop_path_rate)
        stages = []
        for i in range(4):
            downsample = None
            if i > 0:
                attn = Attention2dDownsample(widths[i - 1], widths[i], resolution=res(i - 1),
                                             **attn_kw) if i == 3 else None
                downsample = Downsample(widths[i - 1], widths[i], attn)
            blocks = []
            for j in range(depths[i]):
                mixer = None
                if i >= 2 and j > depths[i] - 1 - vit_num:
                    mixer = Attention2d(widths[i], stride=2 if i == 2 else None,
                                        resolution=res(i), **attn_kw)
                blocks.append(EfficientFormerV2Block(widths[i], mlp_ratios[i][j], dpr[i][j],
                                                     mixer))
            stages.append(EfficientFormerV2Stage(downsample, blocks, self.with_cp))
        self.stages = nn.ModuleList(stages)
        self._freeze_stages()

    def stage_groups(self):
        return [[self.stem]] + [[stage] for stage in self.stages]

    def forward(self, x):
        self.check_input(x)
        return self.forward_stages(self.stem(x))

    # ---------------------------------------------------------------------------------------
    # checkpoints
    # ---------------------------------------------------------------------------------------
    def checkpoint_filter_fn(self, state_dict):
        """Official (classification ``model`` or dense ``*_feat``) or timm layout -> ours.

        With ``bias_mode='pretrained'`` a file holding dense tables is refused
        (:func:`~effbackbones.checkpoint.reject_dense_tables`).
        """
        keys = list(state_dict)
        if any(k.startswith(('network.', 'patch_embed.')) for k in keys):
            layout, rules = 'official', _OFFICIAL_RULES
        else:
            layout = 'timm' if any(k.startswith(('norm.', 'head.', 'head_dist.'))
                                   for k in keys) else 'native'
            rules = ()
        out = rename_keys(state_dict, rules, layout, value_rules=_VALUE_RULES)
        reject_dense_tables(out, self)
        return out


_STEM_KEYS = {'0': 'conv1.conv', '1': 'conv1.bn', '3': 'conv2.conv', '4': 'conv2.bn'}
_BLOCK = r'(\.blocks\.\d+\.)'
_DOWN = r'(\.downsample\.)'
#: official layout -> ours, applied in order by :func:`~effbackbones.checkpoint.rename_keys`:
#: ``network.{2i}.{j}`` are blocks, ``network.{2i-1}`` the downsample before stage i, then the
#: names inside blocks (conv + BN pairs of the official ``nn.Sequential``\ s) and downsamples
_OFFICIAL_RULES = [
    (r'^patch_embed\.([0134])\.', lambda m: f'stem.{_STEM_KEYS[m[1]]}.'),
    (r'^network\.(\d*[02468])\.(\d+)\.', lambda m: f'stages.{int(m[1]) // 2}.blocks.{m[2]}.'),
    (r'^network\.(\d*[13579])\.', lambda m: f'stages.{(int(m[1]) + 1) // 2}.downsample.'),
    (r'^dist_head\.', 'head_dist.'),
    # blocks
    (_BLOCK + r'mlp\.fc1\.', r'\1mlp.fc1.conv.'), (_BLOCK + r'mlp\.norm1\.', r'\1mlp.fc1.bn.'),
    (_BLOCK + r'mlp\.mid\.', r'\1mlp.mid.conv.'), (_BLOCK + r'mlp\.mid_norm\.', r'\1mlp.mid.bn.'),
    (_BLOCK + r'mlp\.fc2\.', r'\1mlp.fc2.conv.'), (_BLOCK + r'mlp\.norm2\.', r'\1mlp.fc2.bn.'),
    (_BLOCK + r'layer_scale_([12])$', r'\1ls\2.gamma'),
    (_BLOCK + r'token_mixer\.(q|k|v|v_local|stride_conv)\.0\.', r'\1token_mixer.\2.conv.'),
    (_BLOCK + r'token_mixer\.(q|k|v|v_local|stride_conv)\.1\.', r'\1token_mixer.\2.bn.'),
    (_BLOCK + r'token_mixer\.proj\.1\.', r'\1token_mixer.proj.conv.'),
    (_BLOCK + r'token_mixer\.proj\.2\.', r'\1token_mixer.proj.bn.'),
    # downsamples (plain: proj + norm; with attention: conv + bn + attn)
    (_DOWN + r'(proj|conv)\.', r'\1conv.conv.'), (_DOWN + r'(norm|bn)\.', r'\1conv.bn.'),
    (_DOWN + r'attn\.q\.local\.0\.', r'\1attn.q.local.'),
    (_DOWN + r'attn\.q\.proj\.0\.', r'\1attn.q.proj.conv.'),
    (_DOWN + r'attn\.q\.proj\.1\.', r'\1attn.q.proj.bn.'),
    (_DOWN + r'attn\.(k|v|v_local)\.0\.', r'\1attn.\2.conv.'),
    (_DOWN + r'attn\.(k|v|v_local)\.1\.', r'\1attn.\2.bn.'),
    (_DOWN + r'attn\.proj\.1\.', r'\1attn.proj.conv.'),
    (_DOWN + r'attn\.proj\.2\.', r'\1attn.proj.bn.'),
]
#: official layer scales are (C, 1, 1); ours (C,)
_VALUE_RULES = [(r'\.ls[12]\.gamma$', lambda v: v.reshape(-1) if v.dim() == 3 else v)]


__all__ = ['EfficientFormerV2']
