"""What every deploy module agrees on: the opset, the runtimes, the ONNX metadata keys, the
parity tolerance and the errors. It imports nothing from :mod:`effbackbones.deploy`, so every
other module there can import it.
"""
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
           'SIZE_DIVISOR_KEY', 'DYNAMIC_KEY', 'TUNED_FOR_KEY', 'INPUT_SHAPE_KEY', 'ExportError',
           'ParityError', 'compare']
