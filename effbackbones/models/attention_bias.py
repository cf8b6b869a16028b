"""Learned relative-position attention biases, shared by EfficientFormer v1, EfficientFormerV2 and
LeViT.

All three families learn, per head, one bias value per absolute offset ``(|dy|, |dx|)`` between a
query and a key position of the token grid they were trained on (an ``R_h x R_w`` table). At
detection / segmentation sizes the grid is another one, so the table has to be adapted. Two rules
exist, and both live here once:

``'pretrained'`` (LeViT; EfficientFormer v1 / V2 ``bias_mode='pretrained'``)
    The learned table ``attention_biases`` is brought to the runtime key grid ``H x W`` *per
    dimension* (:func:`table_for_grid`): **cropped** where the runtime side is smaller than or
    equal to the table's (offsets that exist in the pretrained grid keep their learned values
    exactly) and **resized bicubically** where it is larger (an image over the offset grid,
    ``align_corners=False``, like timm / mmpretrain position-table resizing). The bias of query
    ``q`` and key ``k`` is then ``table[|dy|, |dx|]``, i.e. ``flat_table[|dy| * W + |dx|]``
    (:func:`offset_index`), with queries on every ``q_stride``-th key position (subsampled
    attention). It is gathered per axis (:func:`gather_offset_bias`), so no ``Nq x Nk`` int64
    index is ever built (141 MiB for one 4,200-token grid). At the pretraining grid nothing is
    cropped or resized: the bias is bit-for-bit the classification model's gather.

``'official'`` (the official EfficientFormer v1 / V2 dense code)
    A separate table ``attention_biases_seg`` over the offsets of a fixed dense grid is gathered
    into the ``(heads, Nq0, Nk0)`` matrix of that grid
    (:meth:`RelPosBiasAttention.dense_bias_matrix`), and that *matrix* is resized bicubically to
    the runtime ``(Nq, Nk)`` (:func:`resize_dense_bias`), as the official code does (it resizes the
    flattened token axes, not a 2-D grid). The ImageNet table ``attention_biases`` is kept as a
    persistent, non-trainable buffer: loaded and saved, never used, and never a parameter without
    gradient under DDP. The fixed grid is set by ``bias_grid`` (:func:`check_bias_grid`), the side
    of the stride-32 token grid the official files lay the tables out on: 25 in the detection
    backbones (``detection/backbone.py`` ``Attention(resolution=25)``, ``backbonev2.py``
    resolution 800: 25 x 25 stage tables, a 50 x 50 key grid in the V2 downsample), 16 in the
    ADE20K segmentation backbones (``segmentation/backbone.py`` ``Attention(resolution=16)``,
    ``backbonev2.py`` resolution 512: 16 x 16 and 32 x 32).

Cache: in eval mode the bias of each input size is kept in a bounded LRU (:class:`BiasCache`), so
variable test sizes cannot grow memory without limit. It is used only when no gradient can be
wanted for the table (eval mode, and grad disabled or the table frozen); otherwise the bias is
computed live so gradients reach the table. An entry is served only while the table keeps the
device, dtype and version (in-place edits) it was computed from, and the cache is emptied by
``train()`` / ``eval()``, by loading a state dict and by moving the module (``.to()``, ``.half()``).
While ``torch.compile`` traces or ``torch.jit`` / ``torch.onnx`` trace, the LRU is not used (it is
Python state: it would break the graph, or bake one size into a graph meant for others): the bias
is computed in the graph.

Dynamic ONNX export: while ``torch.onnx.export`` traces a forward, the grid sizes are traced
0-dim tensors (``x.shape``). When no pinned bias serves (a static export pins first, see below),
the bias is then computed from them with the same rules as tensor ops
(:meth:`RelPosBiasAttention._compute_bias_traced`): offsets from ``Range``, the pretrained table
resized to ``max(side, table side)`` and sliced, per-axis ``Gather``; in official mode the
gathered dense matrix (a graph constant) resized to the runtime ``(Nq, Nk)``. Both resizes are
PyTorch's bicubic (``align_corners=False``, ``A = -0.75``) written per axis as tap gathers
(:func:`_resize_axis_bicubic_traced`), not ONNX ``Resize``. So
one file serves every input size. Eager and ``torch.compile`` never take this path (their sizes
are ints).

Pinned bias (deploy): for a fixed input size the bias can be computed once and kept as a
non-persistent buffer ``pinned_bias`` (:meth:`RelPosBiasAttention.start_pinning`, driven by
``BaseDenseBackbone.pin_attention_biases``). It is served in eval mode, traced or not, grad enabled
or not, whenever the same grid comes again (training ignores it), so an exported graph holds it as a
constant and a compiled graph does not recompute it. It is keyed by the grid only and served in the
dtype asked for, so a ``.half()`` / ``.to(dtype)`` model converts it (the buffer follows the module)
instead of computing another. It carries the stamp of the table it was computed from
(:func:`_table_stamp`); when the table has been edited in place since (an optimiser step, a manual
edit), the eager forward pins it again from the current table. A ``torch.compile`` graph cannot
read the stamp (Dynamo does not trace ``_version``): it serves the buffer as it is, so pin again
(``pin_attention_biases``) after editing a table under a compiled model. Loading a state dict drops
the pin; ``train()`` / ``eval()`` and ``.to()`` keep it.
"""
import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

BIAS_MODES = ('official', 'pretrained')
#: ``bias_grid`` of the official dense backbones: detection (Mask R-CNN) and ADE20K segmentation
DETECTION_BIAS_GRID = 25
SEGMENTATION_BIAS_GRID = 16


def check_bias_grid(bias_grid, bias_mode):
    """Validate the ``bias_mode`` and ``bias_grid`` arguments of EfficientFormer v1 / V2 (the one
    place: the backbones call it first, their attentions take the checked values) and return
    ``bias_grid``.

    ``bias_grid`` is the side of the stride-32 token grid of the official dense tables
    (``attention_biases_seg``); it only exists in ``bias_mode='official'``, so another value than
    the default with ``'pretrained'`` is an error rather than silently ignored.
    """
    if bias_mode not in BIAS_MODES:
        raise ValueError(f"bias_mode must be one of {BIAS_MODES}, got {bias_mode!r} "
                         f"('official': the fixed dense tables attention_biases_seg of the "
                         f"official detection / segmentation backbones; 'pretrained': the "
                         f"ImageNet table cropped / resized to the input grid)")
    if isinstance(bias_grid, bool) or not isinstance(bias_grid, int) or bias_grid < 1:
        raise ValueError(
            f'bias_grid must be a positive int (the side of the stride-32 token grid of the '
            f'official dense attention-bias tables: {DETECTION_BIAS_GRID} for the detection '
            f'backbones, {SEGMENTATION_BIAS_GRID} for the ADE20K segmentation ones), '
            f'got {bias_grid!r}')
    if bias_mode != 'official' and bias_grid != DETECTION_BIAS_GRID:
        raise ValueError(
            f"bias_grid={bias_grid} sizes the official dense tables (attention_biases_seg), "
            f"which exist only with bias_mode='official'; bias_mode={bias_mode!r} fits the "
            f'ImageNet table to the input grid instead. Drop bias_grid (or set it to '
            f"{DETECTION_BIAS_GRID}), or use bias_mode='official'.")
    return bias_grid


# --------------------------------------------------------------------------------------------
# offset grids, tables and gathers (pure functions)
# --------------------------------------------------------------------------------------------
def offset_index(q_hw, k_hw=None, q_stride=1):
    """Flat index of the ``(|dy|, |dx|)`` offsets between query and key grid positions.

    Returns ``(idx, table_hw)``: ``idx`` is ``(Nq, Nk)`` long, ``|dy| * table_w + |dx|`` on a table
    of shape ``table_hw`` = the key grid. Query ``i`` sits at key-grid position ``q_stride * i``.
    This is the official index order (tested against every released index buffer); the models
    gather per axis instead (:func:`gather_offset_bias`), this full index is the reference.
    """
    k_hw = k_hw or q_hw
    dy, dx = axis_offsets(q_hw, k_hw, q_stride)
    kh, kw = k_hw
    idx = dy[:, None, :, None] * kw + dx[None, :, None, :]
    return idx.reshape(q_hw[0] * q_hw[1], kh * kw), (kh, kw)


def axis_offsets(q_hw, k_hw, q_stride=1, device=None):
    """``|dy|`` of shape ``(qh, kh)`` and ``|dx|`` of shape ``(qw, kw)`` (long), query ``i`` at key
    position ``q_stride * i``: the two small tables a per-axis gather needs."""
    dy = (torch.arange(q_hw[0], device=device)[:, None] * q_stride
          - torch.arange(k_hw[0], device=device)[None, :]).abs()
    dx = (torch.arange(q_hw[1], device=device)[:, None] * q_stride
          - torch.arange(k_hw[1], device=device)[None, :]).abs()
    return dy, dx


def gather_offset_bias(grid_table, dy, dx):
    """``(heads, H, W)`` offset table -> ``(heads, qh * qw, kh * kw)`` attention bias.

    Equal to ``grid_table.flatten(1)[:, offset_index(...)[0]]`` but indexed per axis with the
    :func:`axis_offsets` tables, so no ``Nq x Nk`` index tensor exists. ``dy`` may hold a subset of
    the query rows (chunked attention).
    """
    bias = grid_table[:, dy[:, None, :, None], dx[None, :, None, :]]   # (h, qh, qw, kh, kw)
    return bias.reshape(grid_table.shape[0], dy.shape[0] * dx.shape[0],
                        dy.shape[1] * dx.shape[1])


def resize_bias_table(table, src_hw, dst_hw, mode='bicubic'):
    """Resize a per-head ``(heads, Hs*Ws)`` offset table to ``(heads, Hd*Wd)``.

    The table is a function of the absolute offset (|dy|, |dx|), so it is interpolated as an image
    over the offset grid; ``align_corners=False`` like timm / mmpretrain. Same size is a no-op
    (the very same tensor).
    """
    src_hw, dst_hw = tuple(src_hw), tuple(dst_hw)
    if src_hw == dst_hw:
        return table
    heads = table.shape[0]
    grid = table.reshape(1, heads, *src_hw)
    grid = F.interpolate(grid.float(), size=dst_hw, mode=mode, align_corners=False)
    return grid.reshape(heads, -1).to(table.dtype)


def table_for_grid(table, table_hw, grid_hw):
    """``(heads, Ht*Wt)`` learned table -> ``(heads, H, W)`` table covering an ``H x W`` key grid.

    Per dimension: crop where ``H <= Ht`` (resp. ``W <= Wt``), bicubic resize where larger.
    Implemented as one resize to ``(max(H, Ht), max(W, Wt))`` -- a side that keeps its size is
    sampled at its own positions (bicubic weights ``(0, 1, 0, 0)``), i.e. unchanged -- then the
    crop.
    """
    th, tw = table_hw
    h, w = grid_hw
    big = (max(h, th), max(w, tw))
    full = resize_bias_table(table, (th, tw), big)
    return full.reshape(table.shape[0], *big)[:, :h, :w]


def resize_dense_bias(gathered, q_len, k_len):
    """The official dense rule: bicubic resize of a gathered ``(heads, Nq0, Nk0)`` bias matrix to
    ``(heads, q_len, k_len)`` (``align_corners=False``)."""
    return F.interpolate(gathered.unsqueeze(0), size=(q_len, k_len), mode='bicubic',
                         align_corners=False)[0]


# --------------------------------------------------------------------------------------------
# the same rules on traced sizes (dynamic ONNX export)
# --------------------------------------------------------------------------------------------
def _resize_axis_bicubic_traced(m, axis, out_len, a=-0.75):
    """PyTorch's bicubic resize (``align_corners=False``, ``A = -0.75``, border taps clamped)
    of ``m`` along one ``axis`` to a traced length, as four row gathers and a weighted sum:
    per output position the source ``(i + 0.5) * in / out - 0.5``, its four taps and weights
    come from ``Range`` and element-wise ops on the size."""
    in_len = m.shape[axis]
    scale = torch.as_tensor(float(in_len)) / torch.as_tensor(out_len).to(torch.float32)
    src = (torch.arange(out_len).to(torch.float32) + 0.5) * scale - 0.5
    first = torch.floor(src)
    t = src - first
    # the cubic convolution kernel at the distances of the four taps (1 + t, t, 1 - t, 2 - t)
    near = [((a + 2) * d - (a + 3)) * d * d + 1 for d in (t, 1 - t)]
    far = [((a * d - 5 * a) * d + 8 * a) * d - 4 * a for d in (t + 1, 2 - t)]
    weights = (far[0], near[0], near[1], far[1])
    view = [1] * m.dim()
    view[axis] = -1
    out = 0
    for k, w in zip((-1, 0, 1, 2), weights):
        idx = torch.clamp(first + k, 0, in_len - 1).to(torch.long)
        out = out + m.index_select(axis, idx) * w.reshape(view)
    return out


def table_for_grid_traced(table, table_hw, grid_hw):
    """:func:`table_for_grid` for a key grid whose sides are traced 0-dim tensors (the sizes a
    traced ``x.shape`` gives), so the graph resizes and crops for the size it is run at: the
    ``max`` is a tensor op (ONNX ``Clip``), the resize per axis by tap gathers
    (:func:`_resize_axis_bicubic_traced`; an identity on a side that keeps its size: cubic
    weights ``(0, 1, 0, 0)`` at integer positions), the crop a ``Slice``."""
    th, tw = table_hw
    h, w = grid_hw
    grid = table.reshape(table.shape[0], th, tw).float()
    grid = _resize_axis_bicubic_traced(grid, 1, torch.clamp(torch.as_tensor(h), min=th))
    grid = _resize_axis_bicubic_traced(grid, 2, torch.clamp(torch.as_tensor(w), min=tw))
    return grid[:, :h, :w].to(table.dtype)


def resize_dense_bias_traced(gathered, q_len, k_len):
    """:func:`resize_dense_bias` to traced ``(q_len, k_len)``, separably per axis with gathers
    (:func:`_resize_axis_bicubic_traced`) instead of ONNX ``Resize``: onnxruntime's cubic
    ``Resize`` takes seconds on these matrices (1.8 s per EfficientFormerV2-S0 forward at
    512x512), the gathers milliseconds."""
    rows = _resize_axis_bicubic_traced(gathered, 1, q_len)
    return _resize_axis_bicubic_traced(rows, 2, k_len)


def gather_offset_bias_traced(grid_table, dy, dx):
    """:func:`gather_offset_bias` as two single-index gathers (ONNX ``Gather``) whose sizes
    come from the traced offset tables: columns by ``|dx|`` on the small table first, then rows
    by ``|dy|``. (Rows first, OpenVINO 2026.4 on 2 threads returned wrong values from the
    second, large gather for big square grids, e.g. 2 heads on a 64x64 token grid; in this order
    it is right.)"""
    heads = grid_table.shape[0]
    (qh, kh), (qw, kw) = dy.shape, dx.shape
    cols = grid_table.index_select(2, dx.reshape(-1))            # (h, H, qw*kw)
    rows = cols.index_select(1, dy.reshape(-1))                  # (h, qh*kh, qw*kw)
    bias = rows.reshape(heads, qh, kh, qw, kw).permute(0, 1, 3, 2, 4)
    return bias.reshape(heads, qh * qw, kh * kw)


# --------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------
def _table_stamp(table):
    """What a cached or pinned bias depends on besides the input size: device, dtype, the version
    counter (bumped by every in-place edit, ``load_state_dict`` and optimiser steps included) and
    the storage (``table.data = other`` swaps it without an edit)."""
    try:
        version = table._version
    except RuntimeError:        # inference-mode tensors track no version
        version = None
    return table.device, table.dtype, version, table.data_ptr()


class BiasCache:
    """A bounded LRU of computed biases; ``size <= 0`` disables it.

    Every entry remembers the stamp of the table it was computed from (:func:`_table_stamp`) and is
    only served while the table still has it.
    """

    def __init__(self, size):
        self.size = int(size)
        self._data = OrderedDict()

    def lookup(self, key, stamp):
        hit = self._data.get(key)
        if hit is None or hit[0] != stamp:
            return None
        self._data.move_to_end(key)
        return hit[1]

    def store(self, key, stamp, value):
        if self.size <= 0:
            return value
        self._data[key] = (stamp, value)
        self._data.move_to_end(key)
        while len(self._data) > self.size:
            self._data.popitem(last=False)
        return value

    def clear(self):
        self._data.clear()

    def keys(self):
        """Keys from least to most recently used."""
        return list(self._data)

    def __getitem__(self, key):
        return self._data[key][1]

    def __iter__(self):
        return iter(self.keys())

    def __len__(self):
        return len(self._data)


# --------------------------------------------------------------------------------------------
# the attention base class
# --------------------------------------------------------------------------------------------
class RelPosBiasAttention(nn.Module):
    """Base of every attention module with a learned relative-position bias.

    A subclass calls :meth:`init_heads` and :meth:`init_relative_position_bias` in its
    ``__init__`` and adds :meth:`attention_bias` to its logits. The tables keep the official /
    timm key names on the attention module itself: ``attention_biases`` (the pretraining table)
    and, in official mode, ``attention_biases_seg`` (the fixed dense table). See the module
    docstring for both rules and the cache.
    """

    def init_heads(self, num_heads, key_dim, attn_ratio):
        """Head layout: ``key_dim`` for queries / keys, ``attn_ratio * key_dim`` for values."""
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.scale = key_dim ** -0.5
        self.val_dim = int(attn_ratio * key_dim)
        self.val_attn_dim = self.val_dim * num_heads

    def init_relative_position_bias(self, num_heads, table_hw, q_stride=1, bias_mode='pretrained',
                                    dense_hw=None, cache_size=2):
        """Create the tables and the caches.

        Args:
            table_hw: key grid of the pretraining resolution (shape of ``attention_biases``).
            q_stride: queries sit on every ``q_stride``-th key position (subsampled attention).
            bias_mode: ``'pretrained'`` or ``'official'`` (then ``dense_hw`` = key grid of the
                fixed dense table ``attention_biases_seg``).
            cache_size: sizes whose bias is kept in eval mode (LRU; 0: no cache).
        """
        self.bias_mode = bias_mode
        self.table_hw = tuple(table_hw)
        self.q_stride = int(q_stride)
        table = torch.zeros(num_heads, self.table_hw[0] * self.table_hw[1])
        if bias_mode == 'official':
            self.dense_hw = tuple(dense_hw)
            # ImageNet table: loaded and saved but unused -> a persistent buffer, so distributed
            # training never meets a parameter without gradient
            self.register_buffer('attention_biases', table)
            # the official dense code initialises the dense table at zero
            self.attention_biases_seg = nn.Parameter(
                torch.zeros(num_heads, self.dense_hw[0] * self.dense_hw[1]))
        else:
            self.dense_hw = None
            self.attention_biases = nn.Parameter(table)
        self._bias_cache = BiasCache(cache_size)     # (q_hw, k_hw, dtype) -> (heads, Nq, Nk)
        self._table_cache = BiasCache(cache_size)    # k_hw -> (heads, H, W), pretrained mode
        # deploy: the one bias (or offset table) of a fixed input size, see the module docstring
        self.register_buffer('pinned_bias', None, persistent=False)
        self.pinned_key = None
        self._pinned_stamp = None
        self._pin_next = False

    # -- biases -----------------------------------------------------------------------------
    def bias_table(self):
        """The table this mode learns (``attention_biases_seg`` or ``attention_biases``)."""
        return self.attention_biases_seg if self.bias_mode == 'official' else \
            self.attention_biases

    def _cached(self, kind, key, make, dtype=None):
        """``make()`` (in the table's dtype) in ``dtype`` if given, served from the pinned buffer
        or the ``kind`` LRU (``'bias'`` or ``'table'``) when no gradient can be wanted for the
        table."""
        def in_dtype(value):
            return value if dtype is None else value.to(dtype)

        if self.training:
            return in_dtype(make())
        table = self.bias_table()
        if self.pinned_bias is not None and self.pinned_key == (kind, key):
            # an explicit deploy choice: also with grad enabled. Converted, not recomputed, for
            # another dtype; pinned again if the table was edited since (see the module docstring)
            if torch.compiler.is_compiling() or self._pinned_stamp == _table_stamp(table):
                return in_dtype(self.pinned_bias)
            self._pin(kind, key, make)
            return in_dtype(self.pinned_bias)
        if torch.is_grad_enabled() and table.requires_grad:
            return in_dtype(make())
        if self._pin_next:
            self._pin_next = False           # pin the outermost request only
            self._pin(kind, key, make)
            return in_dtype(self.pinned_bias)
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return in_dtype(make())
        # the LRU keeps a bias per dtype asked for (no conversion per call); tables are asked for
        # in their own dtype only
        cache, lru_key = ((self._bias_cache, key + (dtype,)) if kind == 'bias'
                          else (self._table_cache, key))
        stamp = _table_stamp(table)
        value = cache.lookup(lru_key, stamp)
        if value is None:
            with torch.no_grad():
                value = cache.store(lru_key, stamp, in_dtype(make()))
        return value

    def _pin(self, kind, key, make):
        with torch.no_grad():
            self.pinned_bias = make().detach().clone()
        self.pinned_key = (kind, key)
        self._pinned_stamp = _table_stamp(self.bias_table())

    def dense_bias_matrix(self):
        """Official mode: the ``(heads, Nq0, Nk0)`` gather of ``attention_biases_seg`` on its
        fixed dense grid (queries at ``q_stride``, query grid ``ceil(side / q_stride)``)."""
        q_hw = tuple(math.ceil(s / self.q_stride) for s in self.dense_hw)
        table = self.attention_biases_seg
        dy, dx = axis_offsets(q_hw, self.dense_hw, self.q_stride, table.device)
        return gather_offset_bias(table.reshape(table.shape[0], *self.dense_hw), dy, dx)

    def bias_from_traced_sizes(self, hw):
        """True when the grid ``hw`` holds traced sizes (0-dim tensors: what ``x.shape`` gives
        while tracing) under ``torch.onnx.export`` and no pinned bias serves (a dynamic export;
        a static one pins first). The bias is then computed from those sizes
        (:meth:`_compute_bias_traced`), so the graph holds the rule, not one size's result.
        Eager and ``torch.compile`` sizes are ints: the first test answers, nothing else runs."""
        return torch.is_tensor(hw[0]) and self.pinned_bias is None and \
            torch.onnx.is_in_onnx_export()

    def table_for_grid(self, k_hw):
        """Pretrained mode: the ``(heads, H, W)`` offset table for a runtime key grid (cropped /
        resized per dimension; cached in eval like the biases)."""
        if self.bias_from_traced_sizes(k_hw):
            return table_for_grid_traced(self.attention_biases, self.table_hw, k_hw)
        k_hw = (int(k_hw[0]), int(k_hw[1]))
        return self._cached('table', k_hw, lambda: table_for_grid(
            self.attention_biases, self.table_hw, k_hw))

    def attention_bias(self, q_hw, k_hw, dtype=None):
        """The ``(heads, Nq, Nk)`` bias for a query grid ``q_hw`` and a key grid ``k_hw`` (in
        ``dtype`` if given, else the table's)."""
        if self.bias_from_traced_sizes(k_hw):
            bias = self._compute_bias_traced(q_hw, k_hw)
            return bias if dtype is None else bias.to(dtype)
        q_hw = (int(q_hw[0]), int(q_hw[1]))
        k_hw = (int(k_hw[0]), int(k_hw[1]))
        return self._cached('bias', (q_hw, k_hw), lambda: self._compute_bias(q_hw, k_hw), dtype)

    def _compute_bias(self, q_hw, k_hw):
        if self.bias_mode == 'official':
            bias = resize_dense_bias(self.dense_bias_matrix(), q_hw[0] * q_hw[1],
                                     k_hw[0] * k_hw[1])
        else:
            table = self.table_for_grid(k_hw)
            dy, dx = axis_offsets(q_hw, k_hw, self.q_stride, table.device)
            bias = gather_offset_bias(table, dy, dx)
        return bias

    def _compute_bias_traced(self, q_hw, k_hw):
        """:meth:`_compute_bias` for grids whose sides are traced 0-dim tensors (dynamic ONNX
        export): the same rules as tensor ops on the sizes (Range, tap gathers, Slice, Gather)."""
        if self.bias_mode == 'official':
            return resize_dense_bias_traced(self.dense_bias_matrix(), q_hw[0] * q_hw[1],
                                            k_hw[0] * k_hw[1])
        table = table_for_grid_traced(self.attention_biases, self.table_hw, k_hw)
        dy, dx = axis_offsets(q_hw, k_hw, self.q_stride, table.device)
        return gather_offset_bias_traced(table, dy, dx)

    # -- pinning (deploy) -------------------------------------------------------------------
    def start_pinning(self):
        """The next bias (or offset table) this module computes in eval mode is pinned (kept as
        the ``pinned_bias`` buffer, replacing any earlier one)."""
        self.drop_pinned_bias()
        self._pin_next = True

    def stop_pinning(self):
        self._pin_next = False

    def drop_pinned_bias(self):
        self.pinned_bias = None
        self.pinned_key = None
        self._pinned_stamp = None

    # -- cache invalidation -----------------------------------------------------------------
    def clear_bias_cache(self):
        """Empty the per-size LRU caches (the pinned bias, a deploy choice, stays)."""
        self._bias_cache.clear()
        self._table_cache.clear()

    def train(self, mode=True):
        self.clear_bias_cache()
        return super().train(mode)

    def _apply(self, *args, **kwargs):
        # the pinned buffer is converted with the table: a pin that was fresh stays fresh under
        # the table's new stamp, a stale one stays stale
        self.clear_bias_cache()
        fresh = (self.pinned_bias is not None
                 and self._pinned_stamp == _table_stamp(self.bias_table()))
        out = super()._apply(*args, **kwargs)
        self._pinned_stamp = _table_stamp(self.bias_table()) if fresh else None
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        self.clear_bias_cache()
        self.drop_pinned_bias()
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self):
        s = (f'heads={self.num_heads}, key_dim={self.key_dim}, bias_mode={self.bias_mode}, '
             f'table_hw={self.table_hw}')
        if self.dense_hw is not None:
            s += f', dense_hw={self.dense_hw}'
        return s + (f', q_stride={self.q_stride}' if self.q_stride != 1 else '')


__all__ = ['BIAS_MODES', 'DETECTION_BIAS_GRID', 'SEGMENTATION_BIAS_GRID', 'check_bias_grid',
           'offset_index', 'axis_offsets', 'gather_offset_bias',
           'resize_bias_table', 'table_for_grid', 'resize_dense_bias',
           'table_for_grid_traced', 'gather_offset_bias_traced', 'resize_dense_bias_traced',
           'BiasCache',
           'RelPosBiasAttention']
