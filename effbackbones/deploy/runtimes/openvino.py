"""OpenVINO (CPU plugin): float32 or bfloat16 sessions, and the export stand-ins of a static
graph tuned for it, run in float (:data:`SUBSTITUTIONS`) or quantized (:data:`INT8_SUBSTITUTIONS`).

The one fact the stand-ins work around (OpenVINO 2026.4, CPU plugin): it runs convolutions
channels-last, and its float32 channels-last -> channels-first reorder of a map with 16 to 64
channels (:data:`SLOW_REORDER_CHANNELS`) is a scalar loop, ~30x slower per element than the
oneDNN kernel it uses for 4-12 or 80+ channels (docs/benchmarks/amd-epyc-avx512.md). Where a
consumer needs such a map channels-first (a graph output, a reshape into groups, an attention
reading ``(C, HW)``), the stand-in hands it over another way with the same values:

=====================================  ===================================================
model module                           stand-in
=====================================  ===================================================
``BackboneMaps`` (conv-written maps)   outputs through :func:`channels_first`
``ExportableGroupNorm``                input through :func:`channels_first`
SwiftFormer ``EfficientAdditiveAtt.``  global query read from the channels-last pixels
Mobile-Former bridges (deploy form)    pixels read in :func:`space_to_depth` blocks
=====================================  ===================================================

A graph that will be quantized (:mod:`..quantize`) is another case: OpenVINO's int8
convolutions write their maps channels-last, and the layers after a dynamic ReLU read them
quantized. Its table takes Mobile-Former's bridges and blocks in other forms (Mobile-Former-508M
at 512x512, docs/benchmarks/intel-xeon-amx-int8.md: its INT8 file runs 1.42-1.47x the float32
file when quantized from the float table's graph, 1.54-1.61x from this one; a float32 file is
~10% slower in these forms, hence two tables):

=====================================  ===================================================
model module                           stand-in in :data:`INT8_SUBSTITUTIONS`
=====================================  ===================================================
Mobile-Former bridges (deploy form)    pixels read as the channels-last ``(B, HW, C)`` rows
Mobile-Former split multiplier dw      dynamic ReLU per part, before the concatenation
=====================================  ===================================================
"""
import os

import torch

from ...models.efficientformer import EfficientFormer
from ...models.layers import ExportableGroupNorm
from ...models.mobileformer import (DoubleDepthwiseBlock, FormerToMobile, MobileFormer,
                                    MobileToFormer)
from ...models.mobileformer_layers import PartMajorDepthwise
from ...models.swiftformer import EfficientAdditiveAttention
from ..contract import BF16_ISA_WORDS, PRECISIONS, isa_capped_below
from ..parts import BackboneMaps
from ..substitution import RuntimeForm, adopt

#: channel counts whose float32 channels-last -> channels-first reorder OpenVINO's CPU plugin
#: (2026.4) runs as a scalar loop
SLOW_REORDER_CHANNELS = range(16, 65)


def channels_first(x):
    """``x`` (NCHW) unchanged, in the graph that OpenVINO runs fast where ``x`` is the
    channels-last output of a conv with :data:`SLOW_REORDER_CHANNELS` channels and the
    consumer needs it channels-first: the channels-last view ``(B, HW, C)`` (free on that
    memory) transposed by OpenVINO's transpose kernel, instead of its scalar reorder (a
    48x128x128 map: 0.9 ms instead of 4.5 ms). Returns ``(x, changed)``: other maps pass as
    they are."""
    b, c, h, w = x.shape
    if c not in SLOW_REORDER_CHANNELS:
        return x, False
    return x.permute(0, 2, 3, 1).reshape(b, h * w, c).transpose(1, 2).reshape(b, c, h, w), True


# --------------------------------------------------------------------------------------------
# space-to-depth / depth-to-space as their ONNX ops
# --------------------------------------------------------------------------------------------
def _space_to_depth(x, block):
    b, c, h, w = x.shape
    return (x.reshape(b, c, h // block, block, w // block, block).permute(0, 3, 5, 1, 2, 4)
            .reshape(b, block * block * c, h // block, w // block))


def _depth_to_space(x, block):
    b, c, h, w = x.shape
    c //= block * block
    return (x.reshape(b, block, block, c, h, w).permute(0, 3, 4, 1, 5, 2)
            .reshape(b, c, h * block, w * block))


class _PixelBlocks(torch.autograd.Function):
    """Space-to-depth (``to_depth``) or depth-to-space in ONNX's order, exported as that ONNX op;
    each is the other's gradient (a permutation)."""

    @staticmethod
    def forward(ctx, x, block, to_depth):
        ctx.block, ctx.to_depth = block, to_depth
        return (_space_to_depth if to_depth else _depth_to_space)(x, block)

    @staticmethod
    def backward(ctx, grad):
        return (_depth_to_space if ctx.to_depth else _space_to_depth)(grad, ctx.block), None, None

    @staticmethod
    def symbolic(g, x, block, to_depth):
        if to_depth:
            return g.op('SpaceToDepth', x, blocksize_i=block)
        return g.op('DepthToSpace', x, blocksize_i=block, mode_s='DCR')


def space_to_depth(x, block):
    """``(B, C, H, W) -> (B, block**2 * C, H / block, W / block)`` in ONNX ``SpaceToDepth``'s
    order (output channel ``(i * block + j) * C + c`` holds pixel ``(i, j)`` of each block),
    exported as that op (PyTorch's ``pixel_unshuffle`` has another channel order and exports as
    reshapes and a 6-D transpose)."""
    return _PixelBlocks.apply(x, block, True)


def depth_to_space(x, block):
    """The inverse of :func:`space_to_depth`, exported as ONNX ``DepthToSpace`` (mode DCR)."""
    return _PixelBlocks.apply(x, block, False)


# --------------------------------------------------------------------------------------------
# the stand-ins
# --------------------------------------------------------------------------------------------
#: backbones whose returned maps are channels-first in OpenVINO already (EfficientFormer: they
#: come out of GroupNorms; Mobile-Former: out of the Former->Mobile bridges)
CHANNELS_FIRST_MAPS = (EfficientFormer, MobileFormer)


class BackboneMapsForOpenVINO(RuntimeForm, BackboneMaps):
    """The backbone's conv-written maps leave the graph through :func:`channels_first`."""

    def forward(self, x):
        maps = []
        for m in super().forward(x):
            m, changed = channels_first(m)
            if changed:
                self.mark_applied()
            maps.append(m)
        return tuple(maps)


def _backbone_maps(part):
    if isinstance(part.model, CHANNELS_FIRST_MAPS):
        return None
    return adopt(BackboneMapsForOpenVINO, part)


class GroupNormForOpenVINO(RuntimeForm, ExportableGroupNorm):
    """The input is made channels-first (:func:`channels_first`) for the group reshape
    (EfficientFormer's output norms read conv-written maps)."""

    def forward(self, x):
        if x.dim() == 4:
            x, changed = channels_first(x)
            if changed:
                self.mark_applied()
        return super().forward(x)


class AdditiveAttentionForOpenVINO(RuntimeForm, EfficientAdditiveAttention):
    """SwiftFormer's global query reads the pixels as the channels-last matrix OpenVINO's convs
    write, not the channels-first one it reorders 16-64 channels into slowly."""

    def _global_query(self, query, attn):
        b, c, h, w = query.shape
        if c not in SLOW_REORDER_CHANNELS:
            return super()._global_query(query, attn)
        self.mark_applied()
        pixels = query.permute(0, 2, 3, 1).reshape(b, h * w, c)
        return (attn @ pixels).transpose(1, 2)                                    # (B, C, 1)


def pixel_block(channels, height, width):
    """Side of the pixel blocks a Mobile-Former bridge of the deploy form reads its map in
    (1: the map as it is).

    The bridges read the map as a channels-first ``(C, HW)`` matrix: for
    :data:`SLOW_REORDER_CHANNELS` (4.9 of Mobile-Former-294M's ~20 ms at 512x512,
    docs/benchmarks/amd-epyc-avx512.md) ``space_to_depth`` (channels-last in OpenVINO) first
    makes ``block**2 * C >= 80`` channels, so the reorder that follows takes the fast kernel. The
    attention sums over all pixels (tokens attend to the map) or treats each pixel alone
    (pixels attend to the tokens), so reading them in block order changes nothing but the
    order of a sum. The sides must divide by the block (a static graph: traced sizes).
    """
    if channels not in SLOW_REORDER_CHANNELS:
        return 1
    block = 2 if 4 * channels >= 80 else 4
    return block if height % block == 0 and width % block == 0 else 1


def _pixel_blocks_per_head(x, num_heads, block):
    """:func:`space_to_depth` ``(x, block)`` as ``(B, block**2, heads, C / heads, HW / block**2)``:
    per head, ``block**2`` sets of pixels."""
    b, c, h, w = x.shape
    return space_to_depth(x, block).reshape(b, block * block, num_heads, c // num_heads,
                                            h * w // (block * block))


class MobileToFormerForOpenVINO(RuntimeForm, MobileToFormer):
    """The tokens attend to the pixels of :func:`space_to_depth` ``(x, block)``
    (:func:`pixel_block`): ``n = block**2`` pixel sets of ``p`` pixels. The softmax over all
    ``n * p`` pixels is taken unnormalised, its sums divide the ``(B, h, M, c)`` result."""

    def _attend(self, x, q, shape):
        block = pixel_block(*shape[1:])
        if block == 1:
            return super()._attend(x, q, shape)
        self.mark_applied()
        k = _pixel_blocks_per_head(x, self.num_heads, block)                   # B,n,h,c,p
        logits = q.unsqueeze(1) @ k                                            # B,n,h,M,p
        if self.scale != 1.0:
            logits = logits * self.scale
        weights = (logits - logits.amax(dim=(1, 4), keepdim=True)).exp()
        return (weights @ k.transpose(-1, -2)).sum(dim=1) / \
            weights.sum(dim=(1, 4)).unsqueeze(-1)                              # B,h,M,c


class FormerToMobileForOpenVINO(RuntimeForm, FormerToMobile):
    """Each pixel of :func:`space_to_depth` ``(x, block)`` attends to the tokens, the result
    goes back through :func:`depth_to_space` (:func:`pixel_block`)."""

    def _attend_map(self, x, k, v):
        b, c, h, w = x.shape
        block = pixel_block(c, h, w)
        if block == 1:
            return super()._attend_map(x, k, v)
        self.mark_applied()
        q = _pixel_blocks_per_head(x, self.num_heads, block)                     # B,n,h,c,p
        logits = k.transpose(-1, -2).unsqueeze(1) @ q                            # B,n,h,M,p
        if self.scale != 1.0:
            logits = logits * self.scale
        out = v.unsqueeze(1) @ logits.softmax(dim=3)                             # B,n,h,c,p
        out = (q + self.drop_path(out)).reshape(b, block * block * c, h // block, w // block)
        return depth_to_space(out, block)


def pixel_rows(x):
    """``(B, C, H, W) -> (B, HW, C)``: the pixels as rows, which is the memory of a
    channels-last map as it is (OpenVINO drops the transpose)."""
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w, c)


def head_block_diagonal(per_head):
    """``(B, h, c, M)`` per-head matrices -> ``(B, h * c, h * M)`` with head ``i``'s on the
    diagonal and exact zeros elsewhere: one MatMul of the ``(B, HW, C)`` pixel rows serves all
    heads (``h`` times the multiply-adds of a few tokens, and no split of the channels)."""
    b, heads, c, m = per_head.shape
    eye = torch.eye(heads, dtype=per_head.dtype, device=per_head.device)
    return (per_head[:, :, :, None, :] * eye[None, :, None, :, None]).reshape(
        b, heads * c, heads * m)


class MobileToFormerPixelRows(RuntimeForm, MobileToFormer):
    """The tokens attend to the :func:`pixel_rows` of the map: logits ``(B, h*M, HW)`` from one
    MatMul of the block-diagonal queries with the transposed rows (a MatMul input OpenVINO
    reads transposed, no copy), so that the softmax reductions run along the contiguous pixel
    axis; the softmax is taken unnormalised and its sums divide the ``(B, h, M, c)`` result."""

    def _attend(self, x, q, shape):
        self.mark_applied()
        b, c, _, _ = shape
        heads, m = self.num_heads, q.shape[2]
        rows = pixel_rows(x)                                                    # B,HW,C
        queries = head_block_diagonal(q.transpose(-1, -2)).transpose(1, 2)     # B,hM,C
        logits = queries @ rows.transpose(1, 2)                                 # B,hM,HW
        if self.scale != 1.0:
            logits = logits * self.scale
        weights = (logits - logits.amax(dim=-1, keepdim=True)).exp()
        mixed = (weights @ rows).reshape(b, heads, m, heads, c // heads)       # B,h,M,h,c
        eye = torch.eye(heads, dtype=x.dtype, device=x.device)
        mixed = (mixed * eye[None, :, None, :, None]).sum(dim=3)               # own head's
        return mixed / weights.sum(dim=-1).reshape(b, heads, m, 1)


class FormerToMobilePixelRows(RuntimeForm, FormerToMobile):
    """Each of the :func:`pixel_rows` attends to the tokens: logits ``(B, HW, h*M)`` from one
    MatMul with the block-diagonal keys; the softmax over each head's tokens is taken
    unnormalised and its per-head sums come from a MatMul with a block-diagonal of ones (a
    normalising division of the weights themselves would become OpenVINO's Softmax over 6
    tokens, which is slow). The result is added to the rows and handed back as a map."""

    def _attend_map(self, x, k, v):
        self.mark_applied()
        b, c, h, w = x.shape
        heads, m = self.num_heads, k.shape[-1]
        rows = pixel_rows(x)                                                    # B,HW,C
        logits = (rows @ head_block_diagonal(k)).reshape(b, h * w, heads, m)
        if self.scale != 1.0:
            logits = logits * self.scale
        weights = (logits - logits.amax(dim=-1, keepdim=True)).exp().reshape(b, h * w, -1)
        mixed = weights @ head_block_diagonal(v).transpose(1, 2)               # B,HW,C
        sums = weights @ head_block_diagonal(torch.ones_like(v)).transpose(1, 2)
        rows = rows + self.drop_path(mixed / sums)
        return rows.reshape(b, h, w, c).permute(0, 3, 1, 2)


class PartwiseDynamicReLUForOpenVINO(RuntimeForm, DoubleDepthwiseBlock):
    """A split multiplier depthwise conv (:class:`PartMajorDepthwise`) is activated part by
    part (each part's slopes: its slice of the part-major ``(a1 | a2)``), then concatenated.

    Why: in an INT8 file the layer after the concatenation reads it quantized. Activated after
    the concatenation, the concatenation joins float32 maps (OpenVINO's reference kernel) and
    the dynamic ReLU quantizes the joined map; activated per part, each part's activation
    quantizes its own map and OpenVINO concatenates int8 maps, a quarter of the bytes
    (Mobile-Former-508M at 512x512: docs/benchmarks/intel-xeon-amx-int8.md)."""

    def conv_dynamic_relu(self, conv, x, coeffs):
        depthwise = conv[0]
        if not isinstance(depthwise, PartMajorDepthwise):
            return super().conv_dynamic_relu(conv, x, coeffs)
        self.mark_applied()
        per_channel = conv[1:]                 # what follows the conv is per channel (folded BN)
        parts = len(depthwise.parts)
        a1, a2 = (c.chunk(parts, dim=1) for c in coeffs.chunk(2, dim=1))
        maps = [per_channel(part(x)) for part in depthwise.parts]
        return torch.cat([torch.max(y * s1, y * s2) for y, s1, s2 in zip(maps, a1, a2)], dim=1)


#: how messages name it
NAME = 'OpenVINO'
#: model module type -> its stand-in in a static graph tuned for OpenVINO; Mobile-Former's
#: bridges only in their deploy form (the eager form reads the map token-major anyway)
SUBSTITUTIONS = {
    BackboneMaps: _backbone_maps,
    ExportableGroupNorm: lambda m: adopt(GroupNormForOpenVINO, m),
    EfficientAdditiveAttention: lambda m: adopt(AdditiveAttentionForOpenVINO, m),
    MobileToFormer: lambda m: adopt(MobileToFormerForOpenVINO, m) if m.merged else None,
    FormerToMobile: lambda m: adopt(FormerToMobileForOpenVINO, m) if m.attend_map else None,
}
#: the same for a graph that will be quantized: Mobile-Former's bridges on the pixel rows, its
#: split depthwise convs activated per part (deploy forms only: the eager blocks have no split
#: convs)
INT8_SUBSTITUTIONS = {
    **SUBSTITUTIONS,
    MobileToFormer: lambda m: adopt(MobileToFormerPixelRows, m) if m.merged else None,
    FormerToMobile: lambda m: adopt(FormerToMobilePixelRows, m) if m.attend_map else None,
    DoubleDepthwiseBlock:
        lambda m: adopt(PartwiseDynamicReLUForOpenVINO, m) if m.merged else None,
}


# --------------------------------------------------------------------------------------------
# sessions
# --------------------------------------------------------------------------------------------
def check_native_bf16(core):
    """Raise a ValueError unless OpenVINO reports native bfloat16 on this CPU ('BF16' in the
    CPU's ``OPTIMIZATION_CAPABILITIES``, e.g. AVX512-BF16 or AMX)."""
    caps = list(core.get_property('CPU', 'OPTIMIZATION_CAPABILITIES'))
    if 'BF16' not in caps:
        name = core.get_property('CPU', 'FULL_DEVICE_NAME')
        raise ValueError(f"precision='bfloat16' needs a CPU with native bf16 (AVX512-BF16 or "
                         f"AMX); OpenVINO reports {caps} for {name}: run precision='float32'")
    # the capabilities come from the CPU's flags; a cap leaves OpenVINO without bf16 kernels
    if isa_capped_below(BF16_ISA_WORDS):
        raise ValueError(f"precision='bfloat16': ONEDNN_MAX_CPU_ISA="
                         f"{os.environ['ONEDNN_MAX_CPU_ISA']} caps OpenVINO below bf16 kernels: "
                         f"run precision='float32'")


def compile_config(threads=None, precision='float32'):
    """OpenVINO's CPU configuration of a session: latency hint, the inference precision
    pinned (float32 would otherwise be bfloat16 on CPUs with native bf16), ``threads``."""
    config = {'INFERENCE_PRECISION_HINT': {'float32': 'f32', 'bfloat16': 'bf16'}[precision],
              'PERFORMANCE_HINT': 'LATENCY'}
    if threads:
        config['INFERENCE_NUM_THREADS'] = int(threads)
    return config


class Session:
    """One ONNX file compiled by OpenVINO for the CPU (:func:`compile_config`)."""

    def __init__(self, path, threads=None, precision='float32'):
        import openvino as ov
        core = ov.Core()
        config = compile_config(threads, precision)
        hint = config['INFERENCE_PRECISION_HINT']
        if hint == 'bf16':
            check_native_bf16(core)
        self._compiled = core.compile_model(core.read_model(path), 'CPU', config)
        used = self._compiled.get_property('INFERENCE_PRECISION_HINT').get_type_name()
        # OpenVINO keeps its default when it cannot honour the hint: never run something
        # other than what was asked for
        if used != hint:
            raise ValueError(f'OpenVINO compiled {path} with inference precision {used}, '
                             f'not the requested {hint} ({precision})')
        self._request = self._compiled.create_infer_request()

    def run(self, array):
        result = self._request.infer({0: array})
        return [result[o] for o in self._compiled.outputs]


__all__ = ['NAME', 'SUBSTITUTIONS', 'INT8_SUBSTITUTIONS', 'PRECISIONS', 'compile_config',
           'Session', 'SLOW_REORDER_CHANNELS', 'channels_first', 'pixel_block', 'pixel_rows',
           'head_block_diagonal', 'space_to_depth', 'depth_to_space',
           'check_native_bf16']
