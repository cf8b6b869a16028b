"""What every deploy module agrees on: the opset, the runtimes, the ONNX metadata keys, the
parity tolerance and the errors. It imports nothing from :mod:`effbackbones.deploy`, so every
other module there can import it.
"""
import os

import numpy as np
import torch

#: the ONNX opset written (LayerNormalization needs 17; 17 is read by onnxruntime >= 1.14 and
#: OpenVINO >= 2022.3)
OPSET = 17
#: the runtimes a file runs in (:mod:`.runtime`) and a static graph can be tuned for; each has
#: its module in :mod:`.runtimes` (session + substitution table)
BACKENDS = ('onnxruntime', 'openvino')
#: inference precisions of a runtime session (the file and its inputs / outputs stay float32)
PRECISIONS = ('float32', 'bfloat16')

#: :func:`compare` tolerance: ``|out - ref| <= ATOL_OF_MAX * max|ref| + RTOL * |ref|``, the rule
#: of the official reference packs (``make_weights.compare_outputs``)
ATOL_OF_MAX = 2e-4
RTOL = 1e-4

#: ONNX metadata keys written by the export and read by the runtime session
PART_KEY = 'effbackbones.part'
#: the backbone's side rule (a dynamic file checks its inputs with it)
SIZE_DIVISOR_KEY = 'effbackbones.size_divisor'
DYNAMIC_KEY = 'effbackbones.dynamic'
#: the runtime whose substitutions changed the graph, ``'none'`` where none did
TUNED_FOR_KEY = 'effbackbones.tuned_for'
INPUT_SHAPE_KEY = 'effbackbones.input_shape'
#: an INT8 file's precision (``int8``; float32 files have no such key) and the CPUs its int8
#: weights are for (:data:`INT8_CPUS`)
PRECISION_KEY = 'effbackbones.precision'
INT8_CPU_KEY = 'effbackbones.int8_cpu'
#: what an INT8 file can be quantized for: ``vnni``, CPUs whose int8 kernels sum u8 x s8
#: products in 32 bits (AVX512-VNNI, AVX-VNNI, AMX); ``avx2``, any x86 CPU, those without VNNI
#: included, whose AVX2 int8 kernels add pairs of products in saturating 16 bits (NNCF's overflow
#: fix: 7-bit weight ranges, a little less accurate on VNNI CPUs)
INT8_CPUS = ('vnni', 'avx2')
#: /proc/cpuinfo flags of the int8 dot-product instructions
VNNI_FLAGS = ('avx512_vnni', 'avx_vnni', 'amx_int8')
#: words of the oneDNN ISA names (``ONEDNN_MAX_CPU_ISA`` values) whose kernels have bf16, and
#: int8 dot products (every bf16 level has VNNI)
BF16_ISA_WORDS = ('BF16', 'AMX', 'FP16')
VNNI_ISA_WORDS = ('VNNI',) + BF16_ISA_WORDS


def cpu_int8_kind(cpuinfo='/proc/cpuinfo'):
    """``'vnni'`` where this CPU's int8 kernels have the VNNI / AMX dot products (oneDNN's
    ``ONEDNN_MAX_CPU_ISA`` cap, which OpenVINO and PyTorch honour, included), else ``'avx2'``;
    ``None`` where the CPU cannot be read (not x86 Linux)."""
    try:
        with open(cpuinfo) as f:
            flags = set(next((line.split(':', 1)[1] for line in f
                              if line.startswith('flags')), '').split())
    except OSError:
        return None
    capped = isa_capped_below(VNNI_ISA_WORDS)
    return 'vnni' if flags & set(VNNI_FLAGS) and not capped else 'avx2'


def isa_capped_below(levels):
    """Whether ``ONEDNN_MAX_CPU_ISA`` (honoured by OpenVINO's CPU plugin and PyTorch's
    oneDNN) caps the kernels below every ISA whose name holds one of ``levels``
    (:data:`BF16_ISA_WORDS`, :data:`VNNI_ISA_WORDS`): the CPU then runs as a lesser one,
    whatever its flags say."""
    cap = os.environ.get('ONEDNN_MAX_CPU_ISA', '').upper()
    return bool(cap) and cap != 'ALL' and not any(level in cap for level in levels)


class ExportError(ValueError):
    """An export request that cannot be satisfied (the message says what to do instead)."""


class ParityError(RuntimeError):
    """The exported graph does not reproduce the PyTorch outputs within tolerance."""


def compare(outs, refs, names=None):
    """``(ok, report)``: every ``outs[i]`` within ``2e-4 * max|refs[i]| + 1e-4 * |refs[i]|``.

    One report line per output with the worst excess ratio (``err / allowed``, must be <= 1)
    and the max abs difference relative to ``max|ref|``.
    """
    if len(outs) != len(refs):
        return False, f'{len(outs)} outputs, expected {len(refs)}'
    ok, lines = True, []
    for i, (o, r) in enumerate(zip(outs, refs)):
        name = names[i] if names else f'output {i}'
        o = torch.as_tensor(np.asarray(o) if not torch.is_tensor(o) else o).double()
        r = torch.as_tensor(np.asarray(r) if not torch.is_tensor(r) else r).double()
        if o.shape != r.shape:
            ok = False
            lines.append(f'{name}: shape {tuple(o.shape)} != reference {tuple(r.shape)}')
            continue
        peak = r.abs().max().item() if r.numel() else 0.0
        err = (o - r).abs()
        allowed = ATOL_OF_MAX * peak + RTOL * r.abs()
        finite = bool(torch.isfinite(o).all())
        ratio = (err / allowed.clamp_min(1e-30)).max().item() if r.numel() else 0.0
        good = finite and bool((err <= allowed).all())
        ok &= good
        lines.append(f'{name}: {"ok " if good else "BAD"} shape {tuple(r.shape)} '
                     f'max|diff|/max|ref| {err.max().item() / max(peak, 1e-30):.2e} '
                     f'(worst err/allowed {ratio:.3f}{"" if finite else ", non-finite"})')
    return ok, '\n'.join(lines)


__all__ = ['OPSET', 'BACKENDS', 'PRECISIONS', 'ATOL_OF_MAX', 'RTOL', 'PART_KEY',
           'SIZE_DIVISOR_KEY', 'DYNAMIC_KEY', 'TUNED_FOR_KEY', 'INPUT_SHAPE_KEY', 'PRECISION_KEY',
           'INT8_CPU_KEY', 'INT8_CPUS', 'BF16_ISA_WORDS', 'VNNI_ISA_WORDS', 'cpu_int8_kind',
           'isa_capped_below', 'ExportError', 'ParityError', 'compare']
