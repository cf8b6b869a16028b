"""SwiftFormer (Shaker et al., ICCV 2023) as a dense-prediction backbone.

Architecture = the official code (Amshaker/SwiftFormer ``models/swiftformer.py``, the July-2023
additive attention with ``normalize(A, dim=1)``), dense mode = its ``fork_feat=True`` path: a
BatchNorm2d on every returned map. Module names follow timm's ``swiftformer`` layout, so timm
weights load as they are and the official layout is renamed by :meth:`checkpoint_filter_fn`.

    stem            conv3x3/2-BN-ReLU, conv3x3/2-BN-ReLU              stride 4
    stages[i]       downsample (conv3x3/2 + BN, i > 0) + blocks     strides 4, 8, 16, 32
      blocks        ConvEncoder x (depth-1), SwiftFormerEncoder x 1
    out_norms[i]    BatchNorm2d per returned map (official ``norm0/2/4/6``)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import rename_keys
from ..registry import MODELS
from .base import BaseDenseBackbone, BlockStage
from .layers import (ConvBN, LayerScale, drop_path_or_identity, fold_bn_, fold_conv_bn_pairs_,
                     fold_layer_scale_, stochastic_depth_schedule)


class ConvEncoder(nn.Module):
    """Depth-wise 3x3 conv + BN, then a 1x1 MLP; scaled residual (official ``ConvEncoder``)."""

    def __init__(self, dim, hidden_dim, drop_path=0.0, layer_scale_init=1.0):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.BatchNorm2d(dim)
        self.pwconv1 = nn.Conv2d(dim, hidden_dim, 1)
        self.act = nn.GELU()
        self.pwconv2 = nn.Conv2d(hidden_dim, dim, 1)
        self.layer_scale = LayerScale(dim, layer_scale_init, spatial=True)
        self.drop_path = drop_path_or_identity(drop_path)

    def forward(self, x):
        y = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x)))))
        return x + self.drop_path(self.layer_scale(y))

    def switch_to_deploy(self):
        fold_bn_(self, 'dwconv', 'norm')
        fold_layer_scale_(self, 'layer_scale', self.pwconv2)


class LocalRepresentation(ConvEncoder):
    """The official ``SwiftFormerLocalRepresentation``: a ConvEncoder with a dim->dim MLP."""

    def __init__(self, dim):
        super().__init__(dim, dim, drop_path=0.0, layer_scale_init=1.0)


class EfficientAdditiveAttention(nn.Module):
    """SwiftFormer's additive attention on (B, N, C) tokens (linear in N).

    A global query ``G = sum_n A_n q_n`` with ``A = normalize(q w_g * scale, over tokens)``
    modulates the keys; the result is projected and added to the queries.
    """

    def __init__(self, dim):
        super().__init__()
        self.to_query = nn.Linear(dim, dim)
        self.to_key = nn.Linear(dim, dim)
        self.w_g = nn.Parameter(torch.randn(dim, 1))
        self.scale = dim ** -0.5
        self.proj = nn.Linear(dim, dim)
        self.final = nn.Linear(dim, dim)

    def forward(self, x):
        query = F.normalize(self.to_query(x), dim=-1)
        key = F.normalize(self.to_key(x), dim=-1)
        attn = F.normalize((query @ self.w_g) * self.scale, dim=1)   # (B, N, 1) over tokens
        global_query = (attn * query).sum(dim=1, keepdim=True)       # (B, 1, C)
        return self.final(self.proj(global_query * key) + query)

    def forward_map(self, x):
        """The same attention on an NCHW map, the linears as 1x1 convs: what the deployed model
        runs (no transposes to and from tokens around every attention)."""
        query = F.normalize(_conv1x1(x, self.to_query), dim=1)
        key = F.normalize(_conv1x1(x, self.to_key), dim=1)
        logits = F.conv2d(query, self.w_g.t()[:, :, None, None]) * self.scale     # (B, 1, H, W)
        attn = F.normalize(logits.flatten(2), dim=-1)                             # over pixels
        global_query = self._global_query(query, attn)                            # (B, C, 1)
        out = _conv1x1(global_query.unsqueeze(-1) * key, self.proj) + query
        return _conv1x1(out, self.final)

    def _global_query(self, query, attn):
        """``sum_n A_n q_n`` of the NCHW ``query`` with the ``(B, 1, HW)`` weights ``attn``:
        ``(B, C, 1)``."""
        return query.flatten(2) @ attn.transpose(1, 2)


def _conv1x1(x, linear):
    """``linear`` applied to every pixel of an NCHW map."""
    return F.conv2d(x, linear.weight[:, :, None, None], linear.bias)


class ConvMlp(nn.Module):
    """BN + 1x1-conv MLP (official ``Mlp``)."""

    def __init__(self, dim, hidden_dim, drop=0.0):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(dim)
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(self.norm1(x))))))

    def switch_to_deploy(self):
        fold_bn_(self, 'fc1', 'norm1', bn_first=True)


class SwiftFormerEncoder(nn.Module):
    """Local representation -> additive attention -> MLP, each with a scaled residual."""

    def __init__(self, dim, mlp_ratio=4.0, drop_path=0.0, layer_scale_init=1e-5):
        super().__init__()
        self.local_representation = LocalRepresentation(dim)
        self.attn = EfficientAdditiveAttention(dim)
        self.linear = ConvMlp(dim, int(dim * mlp_ratio))
        self.layer_scale_1 = LayerScale(dim, layer_scale_init, spatial=True)
        self.layer_scale_2 = LayerScale(dim, layer_scale_init, spatial=True)
        self.drop_path = drop_path_or_identity(drop_path)
        #: deploy form: attention on the NCHW map (``attn.forward_map``)
        self.attend_map = False

    def forward(self, x):
        x = self.local_representation(x)
        if self.attend_map:
            mixed = self.attn.forward_map(x)
        else:       # the official layout: (B, N, C) tokens
            b, c, h, w = x.shape
            tokens = self.attn(x.flatten(2).transpose(1, 2))
            mixed = tokens.transpose(1, 2).reshape(b, c, h, w)
        x = x + self.drop_path(self.layer_scale_1(mixed))
        return x + self.drop_path(self.layer_scale_2(self.linear(x)))

    def switch_to_deploy(self):
        fold_layer_scale_(self, 'layer_scale_1', self.attn.final)
        fold_layer_scale_(self, 'layer_scale_2', self.linear.fc2)
        self.attend_map = True


def downsample_conv_bn(in_dim, out_dim):
    """Conv 3x3 stride 2 + BN between stages (official ``Embedding``; timm names ``proj`` /
    ``norm``)."""
    return ConvBN(in_dim, out_dim, 3, 2, 1, bias=True, names=('proj', 'norm'))


class SwiftFormerStage(BlockStage):
    """Downsample (conv3x3/2 + BN, stages 1-3), then the blocks, each through ``run_block``."""

    def __init__(self, in_dim, dim, depth, mlp_ratio, drop_path_rates, downsample, num_vit=1,
                 with_cp=False):
        super().__init__(with_cp)
        self.downsample = downsample_conv_bn(in_dim, dim) if downsample else nn.Identity()
        blocks = []
        for j in range(depth):
            if depth - j <= num_vit:
                blocks.append(SwiftFormerEncoder(dim, mlp_ratio, drop_path=drop_path_rates[j]))
            else:
                # The official code builds ConvEncoders without drop path; kept for fidelity.
                blocks.append(ConvEncoder(dim, int(dim * mlp_ratio)))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        x = self.downsample(x)
        for block in self.blocks:
            x = self.run_block(block, x)
        return x


class Stem(nn.Sequential):

    def __init__(self, in_channels, dim):
        super().__init__(
            nn.Conv2d(in_channels, dim // 2, 3, stride=2, padding=1), nn.BatchNorm2d(dim // 2),
            nn.ReLU(), nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1), nn.BatchNorm2d(dim),
            nn.ReLU())

    def switch_to_deploy(self):
        fold_conv_bn_pairs_(self)


@MODELS.register_module()
class SwiftFormer(BaseDenseBackbone):
    """SwiftFormer backbone returning stride-4/8/16/32 maps.

    Args:
        arch (str | dict): ``'xs'``, ``'s'``, ``'l1'``, ``'l3'`` or a dict with ``widths``,
            ``depths`` (and optionally ``mlp_ratio``, ``num_vit``).
        in_channels (int): input channels. Default 3.
        out_indices (Sequence[int]): which stages to return. Default all four.
        drop_path_rate (float): stochastic depth; as in the official code it acts on the
            SwiftFormerEncoder blocks with the rate of their position in the whole network.
        frozen_stages (int): -1 none, 0 the stem, k the stem and stages 0..k-1.
        norm_eval (bool): keep BatchNorms in eval mode while training.
        with_cp (bool): activation checkpointing per block.
        init_cfg (dict): ``dict(type='Pretrained', checkpoint=PATH)`` loads an official
            (ImageNet ``model`` layout or dense ``fork_feat`` layout) or timm checkpoint.

    Input sides need not be multiples of 32: every stride-2 conv pads by 1, so a side ``L``
    gives maps of ``ceil(L / 4)``, then halves rounding up.
    """
    arch_zoo = {
        'xs': dict(widths=[48, 56, 112, 220], depths=[3, 3, 6, 4]),
        's': dict(widths=[48, 64, 168, 224], depths=[3, 3, 9, 6]),
        'l1': dict(widths=[48, 96, 192, 384], depths=[4, 3, 10, 5]),
        'l3': dict(widths=[64, 128, 320, 512], depths=[4, 4, 12, 6]),
    }
    arch_aliases = {'extrasmall': 'xs', 'small': 's'}
    arch_keys = ('widths', 'depths')
    size_divisor = None
    new_key_patterns = ('out_norms.*',)

    def __init__(self, arch='xs', in_channels=3, out_indices=(0, 1, 2, 3), drop_path_rate=0.0,
                 frozen_stages=-1, norm_eval=False, with_cp=False, init_cfg=None):
        super().__init__(arch, in_channels, out_indices, frozen_stages, norm_eval, with_cp,
                         drop_path_rate, init_cfg)
        widths = list(self.arch_settings['widths'])
        depths = list(self.arch_settings['depths'])
        mlp_ratio = self.arch_settings.get('mlp_ratio', 4.0)
        num_vit = self.arch_settings.get('num_vit', 1)
        if len(widths) != 4 or len(depths) != 4:
            raise ValueError('SwiftFormer arch needs 4 widths and 4 depths')
        self.channels = tuple(widths)

        self.stem = Stem(in_channels, widths[0])
        dpr = stochastic_depth_schedule(depths, self.drop_path_rate)
        stages = []
        for i in range(4):
            stages.append(SwiftFormerStage(widths[i - 1] if i else widths[0], widths[i],
                                           depths[i], mlp_ratio, dpr[i], downsample=i > 0,
                                           num_vit=num_vit, with_cp=self.with_cp))
        self.stages = nn.ModuleList(stages)
        self.out_norms = nn.ModuleList(
            nn.BatchNorm2d(widths[i]) if i in self.out_indices else nn.Identity()
            for i in range(4))
        self._freeze_stages()

    def stage_groups(self):
        return [[self.stem]] + [[self.stages[i], self.out_norms[i]] for i in range(4)]

    def forward(self, x):
        self.check_input(x)
        return self.forward_stages(self.stem(x), self.out_norms)

    # ---------------------------------------------------------------------------------------
    def checkpoint_filter_fn(self, state_dict):
        """Official (``patch_embed``/``network``/``norm{0,2,4,6}``) or timm layout -> ours."""
        keys = list(state_dict)
        if any(k.startswith(('network.', 'patch_embed.')) for k in keys):
            return rename_keys(state_dict, _OFFICIAL_RULES, layout='official')
        layout = 'timm' if any(k.startswith('stages.') for k in keys) else 'native'
        return rename_keys(state_dict, (), layout=layout)


#: official layout -> ours, applied in order by :func:`~effbackbones.checkpoint.rename_keys`
_OFFICIAL_RULES = [
    (r'^patch_embed\.', 'stem.'),
    (r'^network\.(\d+)\.(\d+)\.', lambda m: f'stages.{int(m[1]) // 2}.blocks.{m[2]}.'),
    (r'^network\.(\d+)\.', lambda m: f'stages.{(int(m[1]) + 1) // 2}.downsample.'),
    (r'^norm([0246])\.', lambda m: f'out_norms.{int(m[1]) // 2}.'),
    (r'\.attn\.Proj\.', '.attn.proj.'),
    (r'\.(layer_scale(?:_[12])?)$', r'.\1.gamma'),
]


__all__ = ['SwiftFormer']
