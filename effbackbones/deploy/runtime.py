"""Running exported ONNX files in a runtime, and plugging them into mm models.

:class:`RuntimeSession` is a callable ``torch.Tensor -> list[torch.Tensor]`` over one ONNX file
in any runtime of :data:`~.contract.BACKENDS` (CPU, float32; or bfloat16 inference in OpenVINO
on a CPU with native bf16); each runtime's own session lives in :mod:`.runtimes`.
:func:`attach_runtime` makes an mmdet / mmseg model run the exported part of itself in the
runtime while everything after it (mmseg's resize of the logits, mmdet's box decoding + NMS for
a raw RetinaNet file, the Mask R-CNN RPN / RoI heads) stays in PyTorch; an end-to-end
RetinaNet / Mask R-CNN file only needs its boxes mapped back to the image (and its masks pasted
into it), so ``tools/test.py CONFIG MODEL.onnx --backend onnxruntime`` evaluates with the
config's own metric. What each part attaches is written in :data:`~.parts.PARTS`.
"""
import os

import numpy as np
import torch

from .contract import (BACKENDS, INT8_CPU_KEY, PART_KEY, PRECISION_KEY, PRECISIONS,
                       SIZE_DIVISOR_KEY, cpu_int8_kind)
from .parts import END2END_PARTS, attach_part
from .runtimes import runtime_module
from .runtimes.openvino import check_native_bf16


def read_metadata(path):
    if path.endswith('.xml'):
        return _read_ir_metadata(path)
    import onnx
    model = onnx.load(path, load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    inp = model.graph.input[0].type.tensor_type.shape.dim
    meta['_input_dims'] = tuple(d.dim_value if d.HasField('dim_value') else None for d in inp)
    # the names the file declares: OpenVINO also gives an output the name of the node that
    # computed it, and its get_any_name the smallest (/model/out_norms.0/... for out_0)
    meta['_output_names'] = [o.name for o in model.graph.output]
    return meta


def _read_ir_metadata(path):
    """The metadata of an OpenVINO IR (an INT8 file of :mod:`.quantize`, kept in its
    ``rt_info`` under ``effbackbones_metadata``), as :func:`read_metadata` gives an ONNX file's."""
    import openvino as ov
    model = ov.Core().read_model(path)
    info = model.get_rt_info()
    meta = {}
    if 'effbackbones_metadata' in info:
        meta = {k: v.astype(str) for k, v in dict(info['effbackbones_metadata']).items()}
    meta['_input_dims'] = tuple(d.get_length() if d.is_static else None
                                for d in model.inputs[0].get_partial_shape())
    meta['_output_names'] = [o.get_any_name() for o in model.outputs]
    return meta


def check_int8_cpu(path, metadata):
    """Refuse an INT8 file quantized for VNNI CPUs (8-bit weights) on a CPU without VNNI:
    there the int8 kernels' 16-bit sums saturate (SwiftFormer-L1: 0.107 mean relative error on
    its stride-32 map instead of 0.011, docs/int8.md), which nothing else would report."""
    if metadata.get(PRECISION_KEY) != 'int8':
        return
    made_for = metadata.get(INT8_CPU_KEY, 'vnni')     # files written before the key: vnni
    if made_for == 'vnni' and cpu_int8_kind() == 'avx2':
        raise ValueError(f'{path} is INT8 quantized for CPUs with VNNI / AMX, and this CPU has '
                         f'no VNNI (or ONEDNN_MAX_CPU_ISA caps it below): its AVX2 int8 kernels '
                         f'would saturate on these weights. Quantize again for it: '
                         f'tools/quantize.py ... --cpu avx2')


class RuntimeSession:
    """One ONNX file in ``backend`` on the CPU; float32 numpy in and out.

    Args:
        path: the .onnx file (exported in float32, or an INT8 QDQ file of :mod:`.quantize`),
            or an OpenVINO IR ``.xml`` (the INT8 file of :mod:`.quantize`; OpenVINO only).
        backend: ``'onnxruntime'`` or ``'openvino'``.
        threads: intra-op threads (default: the runtime's own choice).
        precision: ``'float32'`` (default), or ``'bfloat16'``: OpenVINO only, on a CPU with
            native bf16 (e.g. AVX512-BF16 / AMX), which OpenVINO reports as ``'BF16'`` in
            ``OPTIMIZATION_CAPABILITIES``. OpenVINO then runs the float32 file's convolutions,
            matrix multiplies etc. in bfloat16 (its own choice of which ops stay float32).
            float32 pins OpenVINO to float32: on CPUs with native bf16 its default would be
            bfloat16. onnxruntime's CPU provider has no bfloat16 execution: refused.

    Raises:
        ValueError: an unknown backend or precision, bfloat16 with onnxruntime, bfloat16 on
            a CPU without native bf16 (where OpenVINO would otherwise quietly keep float32), or
            OpenVINO compiling the file in another precision than asked.
    """

    def __init__(self, path, backend='onnxruntime', threads=None, precision='float32'):
        if backend not in BACKENDS:
            raise ValueError(f'backend must be one of {BACKENDS}, got {backend!r}')
        if precision not in PRECISIONS:
            raise ValueError(f'precision must be one of {PRECISIONS}, got {precision!r}')
        runtime = runtime_module(backend)
        if precision not in runtime.PRECISIONS:
            able = [b for b in BACKENDS if precision in runtime_module(b).PRECISIONS]
            raise ValueError(
                f"precision={precision!r} runs in "
                f"{' / '.join(runtime_module(b).NAME for b in able)} only ({backend}'s CPU "
                f"provider has no {precision} execution): use backend={able[0]!r}, or "
                f"precision='float32'")
        if not os.path.isfile(path):
            raise FileNotFoundError(f'ONNX file not found: {path}')
        if path.endswith('.xml') and backend != 'openvino':
            raise ValueError(f'{path} is an OpenVINO IR: run it with backend openvino '
                             f'(tools/quantize.py --backend onnxruntime writes a QDQ .onnx for '
                             f'onnxruntime)')
        self.path, self.backend, self.precision = path, backend, precision
        self.metadata = read_metadata(path)
        self.input_dims = self.metadata.pop('_input_dims')
        self.output_names = self.metadata.pop('_output_names')
        check_int8_cpu(path, self.metadata)
        self._session = runtime.Session(path, threads, precision)

    @property
    def part(self):
        return self.metadata.get(PART_KEY, 'backbone')

    @property
    def one_image_per_run(self):
        """The file was exported for batch 1 (every ``--end2end`` detector, a static
        ``--batch 1`` file): a batch of N images runs image by image (:meth:`__call__`)."""
        return self.input_dims[0] == 1

    def check_input(self, x):
        expected = list(self.input_dims)
        if self.one_image_per_run:
            expected[0] = None
        if len(expected) != x.dim() or any(
                e is not None and e != s for e, s in zip(expected, x.shape)):
            want = 'x'.join('?' if e is None else str(e) for e in self.input_dims)
            got = 'x'.join(map(str, x.shape))
            raise ValueError(
                f'{self.path} was exported for input {want}; got {got}. Export it again with '
                f'--shape {x.shape[2]} {x.shape[3]} (and --batch {x.shape[0]}), or with '
                f'--dynamic (any backbone family; an --end2end detector: free height and '
                f'width, batch 1).')
        d = int(self.metadata.get(SIZE_DIVISOR_KEY, 0))
        if d and (x.shape[2] % d or x.shape[3] % d):
            raise ValueError(
                f'{self.path} needs input sides that are multiples of {d} (its backbone\'s '
                f'rule), got {x.shape[2]}x{x.shape[3]}. Pad the input (mmdet/mmseg '
                f'data_preprocessor: pad_size_divisor={d} / size_divisor={d}) or resize.')

    def __call__(self, x):
        """The file's outputs for ``x``, a list of tensors on ``x``'s device. A file of batch 1
        given N > 1 images runs them one by one: the outputs are concatenated along the batch,
        except an end-to-end detector's (the number of detections differs per image), which
        come as one list per output of N per-image tensors (``(K_i, 5)``, ``(K_i,)``...)."""
        self.check_input(x)
        if x.shape[0] == 1 or not self.one_image_per_run:
            return self._run(x)
        runs = [self._run(x[i:i + 1]) for i in range(x.shape[0])]
        if self.part in END2END_PARTS:
            return [[run[k][0] for run in runs] for k in range(len(runs[0]))]
        return [torch.cat(outs) for outs in zip(*runs)]

    def _run(self, x):
        arr = np.ascontiguousarray(x.detach().cpu().float().numpy())
        outs = self._session.run(arr)
        return [torch.from_numpy(np.asarray(o)).to(x.device) for o in outs]


def attach_runtime(model, path, backend='onnxruntime', threads=None, torch_weights=None,
                   precision='float32'):
    """Make ``model`` (an mmdet / mmseg model built from the config the file was exported from)
    run the exported part of itself in ``backend``; returns the session.

    ``torch_weights`` says whether the parts left in PyTorch get trained weights: required for
    a two-stage detector (its RPN / RoI heads are not in the file). ``precision``: of the
    file's run (:class:`RuntimeSession`); the parts left in PyTorch stay float32.
    """
    session = RuntimeSession(path, backend, threads, precision)
    attach_part(model, session, torch_weights)
    return session


__all__ = ['BACKENDS', 'PRECISIONS', 'RuntimeSession', 'attach_runtime', 'check_native_bf16',
           'read_metadata']
