"""Mobile-Former (Chen et al., CVPR 2022) as a dense-prediction backbone with global tokens.

Architecture = the authors' classification code (AAboys/MobileFormer ``mobile_former.py`` +
``dna_blocks.py``, the released ``mobile_former_{26m..508m}`` configurations). The authors never
released detection code; the dense backbone returns the conv-path ("Mobile") maps of the last
block at each resolution, which is what their RetinaNet/DETR experiments describe.

A MobileNet-style conv path and ``M`` global tokens of width ``D`` run in parallel::

    stem            conv3x3/2 - BN - ReLU6                                  stride 2
    tokens          nn.Embedding(M, D): the learned initial tokens, shared by all images
    features[i]     one block each (below); the output of the last block at stride 4/8/16/32
                    is a returned map (features[2, 4, 8, 11] for 151M-508M, [1, 3, 6, 8] for
                    26M/52M/96M)

A block (authors' ``DnaBlock`` / ``DnaBlock3``), given the map ``x`` and tokens ``z``:

1. ``local_global`` (Mobile->Former bridge): the tokens attend to the pixels of ``x`` (2 heads,
   the pixels are keys and values without projection), gated by ``2 * h_sigmoid(alpha(z))``,
   projected back to ``D``, residual + post LayerNorm;
2. ``global_block`` (Former): multi-head self-attention among the tokens (4 heads, keys = values
   = the tokens), ``channel_mlp``, residual + post LayerNorm, then an FFN (ratio 2, GELU),
   residual + post LayerNorm;
3. the conv path with **dynamic ReLU**: each ``hyperN`` maps token 0 to per-channel
   coefficients ``(a1, a2)`` and the activation is ``max(a1 * x, a2 * x)``;

   * ``'pw-dw-pw'`` (``DnaBlock``, stride 1): 1x1 expand - dyReLU - 3x3 dw - dyReLU - 1x1
     project, residual when the shape is kept;
   * ``'dw-pw-dw-pw'`` (``DnaBlock3``, the stride-2 blocks): 3x3 dw (stride, channel
     multiplier) - dyReLU - 1x1 - [inner residual from here] 3x3 dw - dyReLU - 1x1 [+];
   * with ``e1 == 1`` or ``e2 == 0`` the block is conv only (3x3 dw - ReLU6 - 1x1; tokens pass
     unchanged), as the first block of every variant;

   26M uses grouped 1x1 convs (4 groups) with channel shuffles exactly where the authors put
   them;
4. ``global_local`` (Former->Mobile bridge): every pixel attends to the tokens (2 heads, query =
   the pixel without projection, key ``k(z)``, value ``proj(z)``), added to the map.

The module layout of ``stem`` / ``tokens`` / ``features`` is the authors' one, so their
checkpoints load without renaming; the classifier and the final top-level bridge
(``local_global.*``, which only feeds the classifier) are reported as ignored.

This file holds the blocks and the backbone; the pieces they are built from (conv units,
dynamic ReLU, the bridges and the Former) live in :mod:`.mobileformer_layers`.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import rename_keys
from ..registry import MODELS
from .base import BaseDenseBackbone, BlockStage
from .layers import drop_path_or_identity, fold_conv_bn_pairs_
from .mobileformer_layers import (Former, FormerToMobile, MobileToFormer, TokenHyperFunc, conv_bn,
                                  dynamic_relu, shuffle_or_identity, split_multiplier_depthwise_)

CONV_ONLY = 'conv-only'
PW_DW_PW = 'pw-dw-pw'          # authors' DnaBlock
DW_PW_DW_PW = 'dw-pw-dw-pw'    # authors' DnaBlock3
BLOCK_KINDS = (PW_DW_PW, DW_PW_DW_PW)


# --------------------------------------------------------------------------------------------
# blocks: forward(x, tokens) -> (x, tokens)
# --------------------------------------------------------------------------------------------
class ConvOnlyBlock(nn.Module):
    """3x3 dw (channel multiplier ``e1``) - BN - ReLU6 - [shuffle] - 1x1 - BN; tokens untouched.

    The authors' conv-alone path (``e1 == 1`` or ``e2 == 0``). Residual when stride 1 and the
    width is kept; the ``'pw-dw-pw'`` kind applies drop path to it, ``'dw-pw-dw-pw'`` does not.
    """

    def __init__(self, inp, oup, stride, e1, groups=1, drop_path=0.0):
        super().__init__()
        hidden = inp * e1
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 3, stride, 1, groups=inp, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            shuffle_or_identity(inp, groups > 1),
            nn.Conv2d(hidden, oup, 1, 1, 0, groups=groups, bias=False),
            nn.BatchNorm2d(oup))
        self.identity = stride == 1 and inp == oup
        self.drop_path = drop_path_or_identity(drop_path)

    def forward(self, x, tokens):
        out = self.conv(x)
        if self.identity:
            out = self.drop_path(out) + x
        return out, tokens

    def switch_to_deploy(self):
        fold_conv_bn_pairs_(self.conv)
        # ReLU6 and the (identity) shuffle are per channel: only the 1x1 conv reads the order
        split_multiplier_depthwise_(self.conv, self.conv[4])


class _BridgedBlock(nn.Module):
    """What the two token-aware block kinds share: outer residual, bridges, Former, deploy."""

    def _build_residual_and_bridges(self, inp, oup, stride, token_dim, bridge_heads,
                                    former_heads, ffn_ratio, drop_path):
        """Outer residual when stride 1 and the width is kept; the Mobile->Former bridge, the
        Former and the Former->Mobile bridge (drop path on every token / map update)."""
        self.identity = stride == 1 and inp == oup
        self.drop_path = drop_path_or_identity(drop_path)
        #: deploy form of :meth:`token_outputs`
        self.merged = False
        self.local_global = MobileToFormer(inp, token_dim, bridge_heads, drop_path)
        self.global_block = Former(token_dim, former_heads, ffn_ratio, drop_path)
        self.global_local = FormerToMobile(oup, token_dim, bridge_heads, drop_path)

    def update_tokens(self, x, tokens):
        """Mobile->Former bridge, then the Former: the tokens the conv path of this block reads."""
        return self.global_block(self.local_global(x, tokens))

    def token_outputs(self, tokens):
        """What the updated tokens feed: the two dynamic-ReLU coefficient sets ``(B, 2C, 1, 1)``
        and the Former->Mobile ``(k(tokens), proj(tokens))`` (None in the eager form: the bridge
        computes them). Deploy form: two linears for all of it (:meth:`switch_to_deploy`), and
        the coefficients are the slopes ``(a1 | a2)`` themselves."""
        hyper_a, hyper_b = (getattr(self, name) for name in self.hyper_names)
        if not self.merged:
            return hyper_a(tokens), hyper_b(tokens), None
        c = self.global_local.k.out_features
        s = hyper_a.hyper[0].out_features
        k, v, z = F.linear(tokens, self.tok_weight, self.tok_bias).split([c, c, 2 * s], dim=-1)
        # the slopes directly: (h_sigmoid(u) - .5) * 2 + [1 | 0] = clamp(u / 3 + 1, 0, 2) - [0 | 1],
        # the 1/3 and the offsets folded into the weights and bias
        coeffs = torch.minimum(torch.maximum(
            F.linear(F.relu(z[:, 0]), self.hyp_weight, self.hyp_bias), self.hyp_lo), self.hyp_hi)
        ca, cb = coeffs[:, :, None, None].split(self.hyper_split, dim=1)
        return ca, cb, (k, v)

    def conv_dynamic_relu(self, conv, x, coeffs):
        """The conv unit ``conv`` on ``x``, then dynamic ReLU with ``coeffs``
        (:meth:`token_outputs`): the step a runtime's export stand-in may compute in another
        form (:mod:`effbackbones.deploy.runtimes.openvino`)."""
        return dynamic_relu(conv(x), coeffs, slopes=self.merged)

    @torch.no_grad()
    def switch_to_deploy(self):
        """Fold the BNs; merge the linears that read the updated tokens: ``global_local.k``
        (scale folded), ``global_local.proj`` and both hyper functions' first layers into one
        ``(2C + 2S, D)`` linear, the two second layers into one block-diagonal linear (exact
        zeros off the blocks). The runtimes pay these tiny GEMMs per call, not per FLOP."""
        for name in ('conv1', 'conv2', 'conv3', 'conv4'):
            seq = getattr(self, name, None)
            if seq is not None:
                fold_conv_bn_pairs_(seq)
        if self.merged:
            return
        self.global_local.switch_to_deploy()
        gl = self.global_local
        ha, hb = (getattr(self, name).hyper for name in self.hyper_names)
        self.register_buffer('tok_weight', torch.cat(
            [gl.k.weight, gl.proj.weight, ha[0].weight, hb[0].weight]), persistent=False)
        self.register_buffer('tok_bias', torch.cat(
            [gl.k.bias, gl.proj.bias, ha[0].bias, hb[0].bias]), persistent=False)
        wa, wb = ha[2].weight, hb[2].weight
        hyp = wa.new_zeros(wa.shape[0] + wb.shape[0], wa.shape[1] + wb.shape[1])
        hyp[:wa.shape[0], :wa.shape[1]] = wa
        hyp[wa.shape[0]:, wa.shape[1]:] = wb
        bias = torch.cat([ha[2].bias, hb[2].bias]) / 3.0 + 1.0
        # second half of each set (a2) is shifted down by 1: clamp to [-1, 1]
        shift = torch.cat([torch.arange(n) >= n // 2 for n in (wa.shape[0], wb.shape[0])])
        shift = shift.to(bias)
        self.register_buffer('hyp_weight', hyp / 3.0, persistent=False)
        self.register_buffer('hyp_bias', bias - shift, persistent=False)
        self.register_buffer('hyp_lo', -shift, persistent=False)
        self.register_buffer('hyp_hi', 2.0 - shift, persistent=False)
        self.hyper_split = (wa.shape[0], wb.shape[0])
        self.merged = True


class InvertedBottleneckBlock(_BridgedBlock):
    """``'pw-dw-pw'`` block (authors' ``DnaBlock``) with both bridges and the Former.

    1x1 expand (groups) - BN - [shuffle] - dyReLU - 3x3 dw (stride) - BN - dyReLU - 1x1 project
    (groups) - BN - [shuffle]; residual (drop path) when the shape is kept, then the
    Former->Mobile bridge.
    """
    #: the two hyper functions (token -> dynamic-ReLU coefficients), in conv order
    hyper_names = ('hyper1', 'hyper2')

    def __init__(self, inp, oup, stride, e1, token_dim, groups=1, bridge_heads=2,
                 former_heads=4, ffn_ratio=2, hyper_reduction=4, drop_path=0.0):
        super().__init__()
        hidden = round(inp * e1)
        shuffle = groups > 1
        self.conv1 = conv_bn(inp, hidden, 1, 1, groups, shuffle_or_identity(groups, shuffle))
        self.hyper1 = TokenHyperFunc(token_dim, hidden, hyper_reduction)
        self.conv2 = conv_bn(hidden, hidden, 3, stride, hidden)
        self.hyper2 = TokenHyperFunc(token_dim, hidden, hyper_reduction)
        self.conv3 = conv_bn(hidden, oup, 1, 1, groups, shuffle_or_identity(groups, shuffle))
        self._build_residual_and_bridges(inp, oup, stride, token_dim, bridge_heads,
                                         former_heads, ffn_ratio, drop_path)

    def forward(self, x, tokens):
        tokens = self.update_tokens(x, tokens)
        coeffs1, coeffs2, kv = self.token_outputs(tokens)
        out = self.conv_dynamic_relu(self.conv1, x, coeffs1)
        out = self.conv3(self.conv_dynamic_relu(self.conv2, out, coeffs2))
        if self.identity:
            out = self.drop_path(out) + x
        return self.global_local(out, tokens, kv), tokens


class DoubleDepthwiseBlock(_BridgedBlock):
    """``'dw-pw-dw-pw'`` block (authors' ``DnaBlock3``, the stride-2 blocks) with the bridges.

    3x3 dw (stride, ``inp -> inp * e1``) - BN - [shuffle] - dyReLU - 1x1 (groups) - BN, then an
    inner residual around 3x3 dw (``oup -> oup * e2``) - BN - [shuffle] - dyReLU - 1x1 (groups)
    - BN (drop path on the branch), then the Former->Mobile bridge; outer residual when stride 1
    and the width is kept.
    """
    #: the two hyper functions (token -> dynamic-ReLU coefficients), in conv order
    hyper_names = ('hyper1', 'hyper3')

    def __init__(self, inp, oup, stride, e1, e2, token_dim, groups=1, bridge_heads=2,
                 former_heads=4, ffn_ratio=2, hyper_reduction=4, drop_path=0.0):
        super().__init__()
        hidden1 = round(inp * e1)
        hidden2 = round(oup * e2)
        shuffle = groups > 1
        self.conv1 = conv_bn(inp, hidden1, 3, stride, inp, shuffle_or_identity(inp, shuffle))
        self.hyper1 = TokenHyperFunc(token_dim, hidden1, hyper_reduction)
        self.conv2 = conv_bn(hidden1, oup, 1, 1, groups)
        self.conv3 = conv_bn(oup, hidden2, 3, 1, oup, shuffle_or_identity(oup, shuffle))
        self.hyper3 = TokenHyperFunc(token_dim, hidden2, hyper_reduction)
        self.conv4 = conv_bn(hidden2, oup, 1, 1, groups)
        self._build_residual_and_bridges(inp, oup, stride, token_dim, bridge_heads,
                                         former_heads, ffn_ratio, drop_path)

    def forward(self, x, tokens):
        tokens = self.update_tokens(x, tokens)
        coeffs1, coeffs3, kv = self.token_outputs(tokens)
        inner = self.conv2(self.conv_dynamic_relu(self.conv1, x, coeffs1))
        out = self.conv_dynamic_relu(self.conv3, inner, coeffs3)
        out = self.drop_path(self.conv4(out)) + inner
        out = self.global_local(out, tokens, kv)
        if self.identity:
            out = out + x
        return out, tokens

    @torch.no_grad()
    def switch_to_deploy(self):
        """The bridged block's deploy form, and both multiplier depthwise convs split into
        plain ones (:func:`split_multiplier_depthwise_`): the dynamic-ReLU slopes ``(a1 | a2)``
        of each map follow its new channel order."""
        super().switch_to_deploy()
        offset = 0
        for dw, reader, rows in ((self.conv1, self.conv2[0], self.hyper_split[0]),
                                 (self.conv3, self.conv4[0], self.hyper_split[1])):
            order = split_multiplier_depthwise_(dw, reader)
            if order is not None:
                index = torch.arange(sum(self.hyper_split))
                index[offset:offset + rows] = offset + torch.cat([order, order + rows // 2])
                for name in ('hyp_weight', 'hyp_bias', 'hyp_lo', 'hyp_hi'):
                    buf = getattr(self, name)
                    setattr(self, name, buf[index.to(buf.device)].clone())
            offset += rows


class MobileFormerBlocks(BlockStage, nn.Sequential):
    """The authors' ``features``: all blocks in one sequence (children ``0``, ``1``... as in
    their checkpoints), which is the stage here: its forward runs each block on ``(x, tokens)``
    through ``run_block`` and collects the maps the backbone returns."""

    def __init__(self, blocks, with_cp=False):
        super().__init__(with_cp)
        for i, block in enumerate(blocks):
            self.add_module(str(i), block)

    def forward(self, x, tokens, collect=(), last=-1):
        """Run blocks ``0..last`` (all when ``last < 0``); returns the maps after the blocks in
        ``collect`` (in block order) and the tokens after the last block run."""
        last = len(self) - 1 if last < 0 else last
        maps = []
        for i in range(last + 1):
            x, tokens = self.run_block(self[i], x, tokens)
            if i in collect:
                maps.append(x)
        return maps, tokens


class Stem(nn.Sequential):
    """conv3x3/2 (no bias) - BN - ReLU6."""

    def __init__(self, in_channels, out_channels):
        super().__init__(nn.Conv2d(in_channels, out_channels, 3, 2, 1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU6())

    def switch_to_deploy(self):
        fold_conv_bn_pairs_(self)


# (kind, e1, out channels, stride, e2) per block, as the authors' ``dna_blocks`` tables
# ``[b, e1, c, n=1, s, e2]`` with DnaBlock -> 'pw-dw-pw' and DnaBlock3 -> 'dw-pw-dw-pw'.
def _large(c0, c1, c2, c3, c4, c5, e_1=3, e_1b=3, e_2=3, e_2b=3):
    """The 12-block layout of 151M-508M (strides 2, 4, 4, 8, 8, 16 x4, 32 x3)."""
    return [(DW_PW_DW_PW, 2, c0, 1, 0),
            (DW_PW_DW_PW, 6, c1, 2, 4), (PW_DW_PW, e_1, c1, 1, e_1b),
            (DW_PW_DW_PW, 6, c2, 2, 4), (PW_DW_PW, e_2, c2, 1, e_2b),
            (DW_PW_DW_PW, 6, c3, 2, 4), (PW_DW_PW, 4, c3, 1, 4),
            (PW_DW_PW, 6, c4, 1, 4), (PW_DW_PW, 6, c4, 1, 4),
            (DW_PW_DW_PW, 6, c5, 2, 4), (PW_DW_PW, 6, c5, 1, 4), (PW_DW_PW, 6, c5, 1, 4)]


_SMALL_BLOCKS = [(DW_PW_DW_PW, 3, 12, 2, 0), (PW_DW_PW, 3, 12, 1, 3),
                 (DW_PW_DW_PW, 6, 24, 2, 4), (PW_DW_PW, 3, 24, 1, 3),
                 (DW_PW_DW_PW, 6, 48, 2, 4), (PW_DW_PW, 4, 48, 1, 4), (PW_DW_PW, 6, 64, 1, 4),
                 (DW_PW_DW_PW, 6, 96, 2, 4), (PW_DW_PW, 6, 96, 1, 4)]


@MODELS.register_module()
class MobileFormer(BaseDenseBackbone):
    """Mobile-Former backbone returning the conv-path maps at strides 4/8/16/32 (+ tokens).

    Args:
        arch (str | dict): ``'26m'``, ``'52m'``, ``'96m'``, ``'151m'``, ``'214m'``, ``'294m'``,
            ``'508m'`` (also ``'mobile_former_26m'`` etc.) or a dict with ``stem_channels``,
            ``blocks`` (``[(kind, e1, channels, stride, e2), ...]``, kind ``'pw-dw-pw'`` or
            ``'dw-pw-dw-pw'``), ``token_num``, ``token_dim`` and optionally ``groups`` (1x1
            conv groups, 4 for 26M), ``bridge_heads`` (2), ``former_heads`` (4),
            ``ffn_ratio`` (2), ``hyper_reduction`` (4).
        in_channels (int): input channels. Default 3.
        out_indices (Sequence[int]): which of the stride-4/8/16/32 maps to return.
        return_tokens (bool): also return the global tokens, as the last element of the output
            tuple, shape ``(B, token_num, token_dim)``. They are the tokens after the last block
            (``features[-1]``), i.e. what the authors' ``self.features`` hands to the
            classifier's final bridge; with ``return_tokens=True`` every block runs, whatever
            ``out_indices`` is. Default False (only the maps; blocks after the last requested
            map are skipped).
        drop_path_rate (float): stochastic depth; block ``i`` of ``L`` uses
            ``rate * (i + 1) / L`` on its conv branch and on the token updates of its bridges
            and Former attention (authors' schedule; see the doc for the per-sample choice).
        frozen_stages (int): -1 none, 0 the stem group (stem, initial tokens and the blocks at
            stride 2), k also the blocks of the first k resolutions.
        norm_eval (bool): keep BatchNorms in eval mode while training (LayerNorms of the token
            path are not BatchNorms and keep training).
        with_cp (bool): activation checkpointing per block.
        init_cfg (dict): ``dict(type='Pretrained', checkpoint=PATH)`` loads an authors' ImageNet
            checkpoint (``state_dict`` / ``state_dict_ema`` / raw, ``module.`` prefix stripped);
            ``classifier.*`` and the top-level ``local_global.*`` are ignored.

    Any input size works (``size_divisor = None``): every stride-2 conv is 3x3 with padding 1,
    so the map at stride ``s`` of a side ``L`` has side ``ceil(L / s)``.
    """
    arch_zoo = {
        '26m': dict(stem_channels=8, blocks=_SMALL_BLOCKS, token_num=3, token_dim=128,
                    groups=4),
        '52m': dict(stem_channels=8, blocks=_SMALL_BLOCKS, token_num=3, token_dim=128),
        '96m': dict(stem_channels=12, token_num=4, token_dim=128, blocks=[
            (DW_PW_DW_PW, 2, 12, 1, 0),
            (DW_PW_DW_PW, 6, 16, 2, 4),
            (DW_PW_DW_PW, 6, 32, 2, 4), (PW_DW_PW, 3, 32, 1, 3),
            (DW_PW_DW_PW, 6, 64, 2, 4), (PW_DW_PW, 4, 64, 1, 4), (PW_DW_PW, 6, 88, 1, 4),
            (DW_PW_DW_PW, 6, 128, 2, 4), (PW_DW_PW, 6, 128, 1, 4)]),
        '151m': dict(stem_channels=12, token_num=6, token_dim=192,
                     blocks=_large(12, 16, 32, 64, 88, 128)),
        '214m': dict(stem_channels=12, token_num=6, token_dim=192,
                     blocks=_large(12, 20, 40, 80, 112, 160, e_1b=4, e_2=4, e_2b=4)),
        '294m': dict(stem_channels=16, token_num=6, token_dim=192,
                     blocks=_large(16, 24, 48, 96, 128, 192, e_1=4, e_1b=4, e_2=4, e_2b=4)),
        '508m': dict(stem_channels=24, token_num=6, token_dim=192,
                     blocks=_large(24, 40, 72, 128, 176, 240)),
    }
    arch_aliases = {f'mobileformer{k}': k for k in ('26m', '52m', '96m', '151m', '214m',
                                                    '294m', '508m')}
    arch_aliases.update({k[:-1]: k for k in ('26m', '52m', '96m', '151m', '214m', '294m',
                                             '508m')})
    arch_keys = ('stem_channels', 'blocks', 'token_num', 'token_dim')
    size_divisor = None
    new_key_patterns = ()
    #: the authors' classification head and the final bridge that only feeds it
    ignored_key_patterns = ('classifier.*', 'local_global.*')

    def __init__(self, arch='294m', in_channels=3, out_indices=(0, 1, 2, 3), return_tokens=False,
                 drop_path_rate=0.0, frozen_stages=-1, norm_eval=False, with_cp=False,
                 init_cfg=None):
        super().__init__(arch, in_channels, out_indices, frozen_stages, norm_eval, with_cp,
                         drop_path_rate, init_cfg)
        cfg = self.arch_settings
        self.return_tokens = bool(return_tokens)
        self.token_num = int(cfg['token_num'])
        self.token_dim = int(cfg['token_dim'])
        groups = int(cfg.get('groups', 1))
        common = dict(token_dim=self.token_dim, groups=groups,
                      bridge_heads=int(cfg.get('bridge_heads', 2)),
                      former_heads=int(cfg.get('former_heads', 4)),
                      ffn_ratio=int(cfg.get('ffn_ratio', 2)),
                      hyper_reduction=int(cfg.get('hyper_reduction', 4)))

        self.tokens = nn.Embedding(self.token_num, self.token_dim)
        self.stem = Stem(in_channels, cfg['stem_channels'])

        specs = [tuple(b) for b in cfg['blocks']]
        num_blocks = len(specs)
        blocks, block_strides = [], []
        inp, stride_now = cfg['stem_channels'], 2
        for i, spec in enumerate(specs):
            if len(spec) != 5 or spec[0] not in BLOCK_KINDS or spec[3] not in (1, 2):
                raise ValueError(f'MobileFormer block {i}: expected (kind, e1, channels, '
                                 f'stride, e2) with kind in {BLOCK_KINDS} and stride 1 or 2, '
                                 f'got {spec!r}')
            kind, e1, oup, s, e2 = spec
            dpr = self.drop_path_rate * (i + 1) / num_blocks
            if e1 == 1 or e2 == 0:
                blocks.append(ConvOnlyBlock(inp, oup, s, e1, groups,
                                            drop_path=dpr if kind == PW_DW_PW else 0.0))
            elif kind == PW_DW_PW:
                blocks.append(InvertedBottleneckBlock(inp, oup, s, e1, drop_path=dpr,
                                                      **common))
            else:
                blocks.append(DoubleDepthwiseBlock(inp, oup, s, e1, e2, drop_path=dpr,
                                                   **common))
            inp, stride_now = oup, stride_now * s
            block_strides.append(stride_now)
        self.features = MobileFormerBlocks(blocks, self.with_cp)

        # the returned map of each stride is the output of the last block at that stride
        self.block_strides = tuple(block_strides)
        out_blocks = []
        for s in self.strides:
            at_s = [i for i, bs in enumerate(block_strides) if bs == s]
            if not at_s:
                raise ValueError(f'MobileFormer arch has no block at stride {s} (block strides '
                                 f'{block_strides}); it needs strides 2/4 ... 32')
            out_blocks.append(at_s[-1])
        if max(block_strides) > self.strides[-1]:
            raise ValueError(f'MobileFormer arch goes beyond stride {self.strides[-1]} '
                             f'(block strides {block_strides})')
        self.out_blocks = tuple(out_blocks)
        self.channels = tuple(specs[i][2] for i in out_blocks)
        self._freeze_stages()

    # ---------------------------------------------------------------------------------------
    def stage_groups(self):
        stem_group = [self.stem, self.tokens] + [
            self.features[i] for i, s in enumerate(self.block_strides) if s == 2]
        groups = [stem_group]
        for s in self.strides:
            groups.append([self.features[i] for i, bs in enumerate(self.block_strides)
                           if bs == s])
        return groups

    def unused_groups(self):
        # with return_tokens every block runs, so nothing is left out of training
        return [] if self.return_tokens else super().unused_groups()

    def forward(self, x):
        """Return the maps of ``out_indices`` (+ the ``(B, M, D)`` tokens if ``return_tokens``)."""
        self.check_input(x)
        x = self.stem(x)
        tokens = self.tokens.weight.unsqueeze(0).expand(x.shape[0], -1, -1)
        wanted = tuple(self.out_blocks[i] for i in self.out_indices)
        outs, tokens = self.features(x, tokens, wanted, -1 if self.return_tokens else wanted[-1])
        if self.return_tokens:
            outs.append(tokens)
        return tuple(outs)

    # ---------------------------------------------------------------------------------------
    def init_default_weights(self):
        """The authors' init: conv N(0, sqrt(2 / (k*k*out))), linear N(0, 0.01), BN 1/0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / n))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def checkpoint_filter_fn(self, state_dict):
        """The authors' layout is ours for stem / tokens / features: nothing to rename.

        A classification checkpoint (with ``classifier.*`` / top-level ``local_global.*``) is
        reported as ``layout='official'``; their tensors are then ignored by
        :attr:`ignored_key_patterns`.
        """
        official = any(k.startswith(('classifier.', 'local_global.')) for k in state_dict)
        return rename_keys(state_dict, (), layout='official' if official else 'native')


__all__ = ['MobileFormer']
