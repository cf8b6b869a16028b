"""The pieces Mobile-Former's blocks are built from (:mod:`.mobileformer` composes them): the
conv units, dynamic ReLU and its token hyper function, the deploy form of a channel-multiplier
depthwise conv, and the token path -- the two bridges and the Former.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import drop_path_or_identity, fold_scale_into_


def h_sigmoid(x):
    """``ReLU6(x + 3) / 6`` (the authors' ``h_sigmoid``)."""
    return F.relu6(x + 3.0) / 6.0


class HSigmoid(nn.Module):

    def forward(self, x):
        return h_sigmoid(x)


class ChannelShuffle(nn.Module):
    """``(B, g * c, H, W) -> (B, c * g, H, W)``: view as ``(g, c)`` and transpose."""

    def __init__(self, groups):
        super().__init__()
        self.groups = int(groups)

    def forward(self, x):
        b, c, h, w = x.shape
        return x.reshape(b, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(
            b, c, h, w)

    def extra_repr(self):
        return f'groups={self.groups}'


def shuffle_or_identity(groups, enabled):
    return ChannelShuffle(groups) if enabled else nn.Identity()


def conv_bn(inp, oup, kernel_size, stride=1, groups=1, *tail):
    """``nn.Sequential(Conv2d (no bias, 'same' padding), BatchNorm2d, *tail)``: the authors' conv
    units, children ``0`` / ``1`` as in their checkpoints."""
    return nn.Sequential(nn.Conv2d(inp, oup, kernel_size, stride, kernel_size // 2,
                                   groups=groups, bias=False),
                         nn.BatchNorm2d(oup), *tail)


class TokenHyperFunc(nn.Module):
    """Dynamic-ReLU coefficients from token 0: ``Linear - ReLU - Linear - h_sigmoid``.

    Returns ``(B, 2 * C, 1, 1)`` in ``[0, 1]`` for a map of ``C`` channels (authors'
    ``HyperFunc`` with ``sel_token_id=0``).
    """

    def __init__(self, token_dim, channels, reduction=4, token_id=0):
        super().__init__()
        self.token_id = token_id
        squeeze = token_dim // reduction
        self.hyper = nn.Sequential(nn.Linear(token_dim, squeeze), nn.ReLU(),
                                   nn.Linear(squeeze, 2 * channels), HSigmoid())

    def forward(self, tokens):
        return self.hyper(tokens[:, self.token_id])[:, :, None, None]


def dynamic_relu(x, coeffs, scale=2.0, slopes=False):
    """``max(a1 * x, a2 * x)`` with ``a1 = (c1 - .5) * scale + 1``, ``a2 = (c2 - .5) * scale``;
    ``slopes=True``: ``coeffs`` are ``(a1 | a2)`` already (deploy form)."""
    c1, c2 = coeffs.chunk(2, dim=1)
    if slopes:
        return torch.max(x * c1, x * c2)
    a1 = (c1 - 0.5) * scale + 1.0
    a2 = (c2 - 0.5) * scale
    return torch.max(x * a1, x * a2)


class PartMajorDepthwise(nn.Module):
    """Deploy form of a channel-multiplier depthwise conv (``C -> e * C``, ``groups=C``, output
    ``c * e + k`` read from input ``c``): ``e`` plain depthwise convs (``parts[k]`` gives the
    outputs ``c * e + k``), concatenated part-major, i.e. output ``k * C + c``. The layers that
    read the map take its channels in that order (:func:`split_multiplier_depthwise_`).

    Why: OpenVINO's CPU plugin runs a multiplier depthwise conv with its generic grouped
    kernel and a plain one with its depthwise kernel; on an AVX2 CPU the nine multiplier convs
    of Mobile-Former-294M took 20 of 72 ms at 512x512 (docs/benchmarks/amd-epyc-avx2.md).
    """

    def __init__(self, conv):
        super().__init__()
        c, e = conv.in_channels, conv.out_channels // conv.in_channels
        self.parts = nn.ModuleList()
        for k in range(e):
            part = nn.Conv2d(c, c, conv.kernel_size, conv.stride, conv.padding, groups=c,
                             bias=conv.bias is not None).to(conv.weight)
            part.weight.data.copy_(conv.weight[k::e])
            if conv.bias is not None:
                part.bias.data.copy_(conv.bias[k::e])
            self.parts.append(part)

    @staticmethod
    def source_channels(channels, multiplier):
        """For each output channel of the part-major map, the multiplier conv's channel it is."""
        return torch.arange(channels * multiplier).reshape(channels, multiplier).t().reshape(-1)

    def forward(self, x):
        return torch.cat([part(x) for part in self.parts], dim=1)


def is_multiplier_depthwise(conv):
    return (isinstance(conv, nn.Conv2d) and conv.groups == conv.in_channels
            and conv.out_channels > conv.in_channels)


@torch.no_grad()
def split_multiplier_depthwise_(seq, reader):
    """Replace the multiplier depthwise conv ``seq[0]`` by a :class:`PartMajorDepthwise` and
    take the dense 1x1 conv ``reader``'s input channels in the new order. Returns the order
    (new channel -> old channel) for whatever else is per channel of the map (dynamic-ReLU
    slopes), or None where nothing changed: already split, no multiplier, or a grouped /
    shuffled reader (26M), whose channel groups a reordering would break."""
    conv = seq[0]
    if not is_multiplier_depthwise(conv) or reader.groups != 1:
        return None
    order = PartMajorDepthwise.source_channels(conv.in_channels,
                                               conv.out_channels // conv.in_channels)
    seq[0] = PartMajorDepthwise(conv)
    reader.weight.data = reader.weight.data[:, order.to(reader.weight.device)].clone()
    return order


# --------------------------------------------------------------------------------------------
# bridges and the Former
# --------------------------------------------------------------------------------------------
def head_scale(width, num_heads, who):
    """``(width // num_heads) ** -0.5``, the attention scale of ``num_heads`` heads sharing
    ``width`` channels; a width the heads do not divide is an error naming ``who``."""
    if width % num_heads:
        raise ValueError(f'{who}: {width} channels are not divisible by {num_heads} heads')
    return (width // num_heads) ** -0.5


class MobileToFormer(nn.Module):
    """Tokens attend to the map's pixels (authors' ``Local2Global``, ``'attn'``, dynamic).

    Pixels are keys and values as they are (no projection); ``q`` lifts the tokens to the map's
    width, a gate ``2 * h_sigmoid(alpha(z))`` scales the result, ``proj`` goes back to the token
    width; residual (drop path) and post LayerNorm.
    """

    def __init__(self, channels, token_dim, num_heads=2, drop_path=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = head_scale(channels, num_heads, 'Mobile->Former bridge')
        self.alpha_scale = 2.0
        self.alpha = nn.Sequential(nn.Linear(token_dim, channels), HSigmoid())
        self.q = nn.Linear(token_dim, channels)
        self.proj = nn.Linear(channels, token_dim)
        self.layer_norm = nn.LayerNorm(token_dim)
        self.drop_path = drop_path_or_identity(drop_path)
        #: deploy form: ``q`` (scale folded) and ``alpha`` as one linear (:meth:`switch_to_deploy`)
        self.merged = False

    def forward(self, x, tokens):
        b, c, h, w = x.shape
        m = tokens.shape[1]
        if self.merged:
            q, gate = F.linear(tokens, self.qa_weight, self.qa_bias).split(c, dim=-1)
            gate = h_sigmoid(gate)
        else:
            q, gate = self.q(tokens), self.alpha(tokens)
        q = q.reshape(b, m, self.num_heads, -1).transpose(1, 2)                # B,h,M,c
        out = self._attend(x, q, (b, c, h, w))                                 # B,h,M,c
        out = out.transpose(1, 2).reshape(b, m, c) * (gate * self.alpha_scale)
        return self.layer_norm(tokens + self.drop_path(self.proj(out)))

    def _attend(self, x, q, shape):
        """Per head, the queries ``q`` (B, h, M, c) attend to the pixels of ``x`` (of
        ``shape``, read once by the caller): the pixels' ``(B, h, M, c)`` mix."""
        b, c, h, w = shape
        k = x.reshape(b, self.num_heads, c // self.num_heads, h * w)            # B,h,c,HW
        attn = q @ k                                                           # B,h,M,HW
        if self.scale != 1.0:
            attn = attn * self.scale
        return attn.softmax(dim=-1) @ k.transpose(-1, -2)

    @torch.no_grad()
    def switch_to_deploy(self):
        """``scale`` folded into ``q``; ``q`` and the gate's linear become one ``(2C, D)``
        linear (one small GEMM instead of two: the runtimes' cost of these token linears is
        per call, not per FLOP)."""
        if self.merged:
            return
        fold_scale_into_(self.q, torch.full((self.q.out_features,), self.scale))
        self.scale = 1.0
        lin = self.alpha[0]
        self.register_buffer('qa_weight', torch.cat([self.q.weight, lin.weight]),
                             persistent=False)
        self.register_buffer('qa_bias', torch.cat([self.q.bias, lin.bias]), persistent=False)
        self.merged = True


class Former(nn.Module):
    """Token self-attention + FFN, both post-norm (authors' ``GlobalBlock``, ``'attn'``).

    Keys and values are the tokens themselves; only the queries are projected. The FFN
    (ratio 2, GELU) has no drop path, as in the authors' code.
    """

    def __init__(self, token_dim, num_heads=4, ffn_ratio=2, drop_path=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = head_scale(token_dim, num_heads, 'Former (token_dim)')
        self.ffn = nn.Sequential(nn.Linear(token_dim, token_dim * ffn_ratio), nn.GELU(),
                                 nn.Linear(token_dim * ffn_ratio, token_dim))
        self.ffn_norm = nn.LayerNorm(token_dim)
        self.q = nn.Linear(token_dim, token_dim)
        self.channel_mlp = nn.Linear(token_dim, token_dim)
        self.layer_norm = nn.LayerNorm(token_dim)
        self.drop_path = drop_path_or_identity(drop_path)

    def forward(self, tokens):
        b, m, d = tokens.shape
        q = self.q(tokens).reshape(b, m, self.num_heads, -1).transpose(1, 2)        # B,h,M,d
        k = tokens.transpose(1, 2).reshape(b, self.num_heads, d // self.num_heads, m)
        attn = ((q @ k) * self.scale).softmax(dim=-1)                               # B,h,M,M
        out = (attn @ k.transpose(-1, -2)).transpose(1, 2).reshape(b, m, d)
        tokens = self.layer_norm(tokens + self.drop_path(self.channel_mlp(out)))
        return self.ffn_norm(tokens + self.ffn(tokens))


class FormerToMobile(nn.Module):
    """Pixels attend to the tokens (authors' ``Global2Local``, ``'attn'``, not dynamic).

    Query = the pixel as it is, key = ``k(z)``, value = ``proj(z)``; the result is added to the
    map (drop path).
    """

    def __init__(self, channels, token_dim, num_heads=2, drop_path=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = head_scale(channels, num_heads, 'Former->Mobile bridge')
        self.k = nn.Linear(token_dim, channels)
        self.proj = nn.Linear(token_dim, channels)
        self.drop_path = drop_path_or_identity(drop_path)
        #: deploy form (:meth:`_attend_map`)
        self.attend_map = False

    def forward(self, x, tokens, kv=None):
        """``kv``: ``(k(tokens), proj(tokens))`` when the block computed them already (deploy
        form: one merged linear per block)."""
        b, c, h, w = x.shape
        m = tokens.shape[1]
        hd = c // self.num_heads
        k, v = (self.k(tokens), self.proj(tokens)) if kv is None else kv
        k = k.transpose(1, 2).reshape(b, self.num_heads, hd, m)                   # B,h,c,M
        v = v.transpose(1, 2).reshape(b, self.num_heads, hd, m)                   # B,h,c,M
        if self.attend_map:
            return self._attend_map(x, k, v)
        q = x.reshape(b, self.num_heads, hd, h * w).transpose(-1, -2)             # B,h,HW,c
        attn = ((q @ k) * self.scale).softmax(dim=-1)                            # B,h,HW,M
        out = (attn @ v.transpose(-1, -2)).transpose(-1, -2).reshape(b, c, h, w)
        return x + self.drop_path(out)

    def _attend_map(self, x, k, v):
        """The same attention and residual with the map kept channels-first: logits as
        ``(B, h, M, HW)``, softmax over the tokens (dim 2), ``v @ attn`` is already
        ``(B, h, c, HW)`` -- no transpose of the full map on either side. The deployed form
        (``scale`` folded into ``k``). The residual is added to the ``(B, C, HW)`` matrix, not
        the map: a runtime then leaves the block's output in the plain layout the next
        block's Mobile->Former bridge reads (OpenVINO: one layout reorder less per block,
        docs/benchmarks/intel-xeon-amx.md)."""
        b, c, h, w = x.shape
        q = x.reshape(b, self.num_heads, c // self.num_heads, h * w)               # B,h,c,HW
        logits = k.transpose(-1, -2) @ q                                          # B,h,M,HW
        if self.scale != 1.0:
            logits = logits * self.scale
        out = (v @ logits.softmax(dim=2)).reshape(b, c, h * w)
        return (x.reshape(b, c, h * w) + self.drop_path(out)).reshape(b, c, h, w)

    @torch.no_grad()
    def switch_to_deploy(self):
        if self.attend_map:
            return
        fold_scale_into_(self.k, torch.full((self.k.out_features,), self.scale))
        self.scale = 1.0
        self.attend_map = True


__all__ = ['h_sigmoid', 'HSigmoid', 'ChannelShuffle', 'shuffle_or_identity', 'conv_bn',
           'TokenHyperFunc', 'dynamic_relu', 'PartMajorDepthwise', 'is_multiplier_depthwise',
           'split_multiplier_depthwise_', 'MobileToFormer', 'Former', 'FormerToMobile']
