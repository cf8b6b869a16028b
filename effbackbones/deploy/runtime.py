"""Running exported ONNX files in onnxruntime or OpenVINO, and plugging them into mm models.

:class:`RuntimeSession` is a callable ``torch.Tensor -> list[torch.Tensor]`` over one ONNX file
in either runtime (CPU, float32; or bfloat16 inference in OpenVINO on a CPU with native bf16).
:func:`attach_runtime` makes an mmdet / mmseg model run the exported part of itself in the
runtime while everything after it (mmseg's resize of the logits, mmdet's box decoding + NMS for
a raw RetinaNet file, the Mask R-CNN RPN / RoI heads) stays in PyTorch; an end-to-end
RetinaNet / Mask R-CNN file only needs its boxes mapped back to the image (and its masks pasted
into it), so ``tools/test.py CONFIG MODEL.onnx --backend onnxruntime`` evaluates with the
config's own metric.
"""
import os
import types

import numpy as np
import torch

from .export import BACKENDS, END2END_PARTS, PART_KEY, PARTS, SIZE_DIVISOR_KEY

#: inference precisions of :class:`RuntimeSession` (the file and its inputs / outputs stay float32)
PRECISIONS = ('float32', 'bfloat16')


def read_metadata(path):
    if path.endswith('.xml'):
        return _read_ir_metadata(path)
    import onnx
    model = onnx.load(path, load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    inp = model.graph.input[0].type.tensor_type.shape.dim
    meta['_input_dims'] = tuple(d.dim_value if d.HasField('dim_value') else None for d in inp)
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
    return meta


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
        if precision == 'bfloat16' and backend != 'openvino':
            raise ValueError(f"precision='bfloat16' runs in OpenVINO only ({backend}'s CPU "
                             f"provider has no bfloat16 execution): use backend='openvino', "
                             f"or precision='float32'")
        if not os.path.isfile(path):
            raise FileNotFoundError(f'ONNX file not found: {path}')
        if path.endswith('.xml') and backend != 'openvino':
            raise ValueError(f'{path} is an OpenVINO IR: run it with backend openvino '
                             f'(tools/quantize.py --backend onnxruntime writes a QDQ .onnx for '
                             f'onnxruntime)')
        self.path, self.backend, self.precision = path, backend, precision
        self.metadata = read_metadata(path)
        self.input_dims = self.metadata.pop('_input_dims')
        if backend == 'onnxruntime':
            import onnxruntime as ort
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if threads:
                opts.intra_op_num_threads = int(threads)
                opts.inter_op_num_threads = 1
            self._sess = ort.InferenceSession(path, opts, providers=['CPUExecutionProvider'])
            self.output_names = [o.name for o in self._sess.get_outputs()]
            self._input_name = self._sess.get_inputs()[0].name
        else:
            import openvino as ov
            core = ov.Core()
            hint = {'float32': 'f32', 'bfloat16': 'bf16'}[precision]
            if hint == 'bf16':
                check_native_bf16(core)
            config = {'INFERENCE_PRECISION_HINT': hint, 'PERFORMANCE_HINT': 'LATENCY'}
            if threads:
                config['INFERENCE_NUM_THREADS'] = int(threads)
            self._compiled = core.compile_model(core.read_model(path), 'CPU', config)
            used = self._compiled.get_property('INFERENCE_PRECISION_HINT').get_type_name()
            # OpenVINO keeps its default when it cannot honour the hint: never run something
            # other than what was asked for
            if used != hint:
                raise ValueError(f'OpenVINO compiled {path} with inference precision {used}, '
                                 f'not the requested {hint} ({precision})')
            self._request = self._compiled.create_infer_request()
            self.output_names = [o.get_any_name() for o in self._compiled.outputs]

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
        if self.backend == 'onnxruntime':
            outs = self._sess.run(None, {self._input_name: arr})
        else:
            result = self._request.infer({0: arr})
            outs = [result[o] for o in self._compiled.outputs]
        return [torch.from_numpy(np.asarray(o)).to(x.device) for o in outs]


def check_native_bf16(core):
    """Raise a ValueError unless OpenVINO reports native bfloat16 on this CPU ('BF16' in the
    CPU's ``OPTIMIZATION_CAPABILITIES``, e.g. AVX512-BF16 or AMX)."""
    caps = list(core.get_property('CPU', 'OPTIMIZATION_CAPABILITIES'))
    if 'BF16' not in caps:
        name = core.get_property('CPU', 'FULL_DEVICE_NAME')
        raise ValueError(f"precision='bfloat16' needs a CPU with native bf16 (AVX512-BF16 or "
                         f"AMX); OpenVINO reports {caps} for {name}: run precision='float32'")


def attach_runtime(model, path, backend='onnxruntime', threads=None, torch_weights=None,
                   precision='float32'):
    """Make ``model`` (an mmdet / mmseg model built from the config the file was exported from)
    run the exported part of itself in ``backend``; returns the session.

    ``torch_weights`` says whether the parts left in PyTorch get trained weights: required for
    a two-stage detector (its RPN / RoI heads are not in the file). ``precision``: of the
    file's run (:class:`RuntimeSession`); the parts left in PyTorch stay float32.
    """
    session = RuntimeSession(path, backend, threads, precision)
    part = session.part
    if part not in PARTS or part == 'backbone':
        raise ValueError(f'{path} holds a {part!r} graph; tools/test.py needs a file exported '
                         f'with --config (a segmentor or detector)')
    if part == 'segmentor':
        if not hasattr(model, 'decode_head'):
            raise ValueError(f'{path} holds a segmentor but the config builds a '
                             f'{type(model).__name__}')
        model.extract_feat = types.MethodType(lambda self, inputs: session(inputs)[0], model)
        # the file already ends with the decode head: its forward passes the logits through
        model.decode_head.forward = lambda logits: logits
    elif part == 'single_stage_end2end':
        if not hasattr(model, 'bbox_head') or hasattr(model, 'roi_head'):
            raise ValueError(f'{path} holds an end-to-end single-stage detector but the config '
                             f'builds a {type(model).__name__}')
        model.extract_feat = types.MethodType(lambda self, inputs: session(inputs), model)
        model.bbox_head.predict = end2end_results
    elif part == 'two_stage_end2end':
        if not hasattr(model, 'roi_head') or not model.roi_head.with_mask:
            raise ValueError(f'{path} holds an end-to-end Mask R-CNN but the config builds a '
                             f'{type(model).__name__}')
        model.extract_feat = types.MethodType(lambda self, inputs: session(inputs), model)
        # the proposals are inside the file: the RoI head gets the file's outputs instead
        model.rpn_head.predict = lambda x, samples, rescale=False: [None] * len(samples)
        roi_head = model.roi_head
        model.roi_head.predict = lambda outs, _, samples, rescale=False: \
            end2end_mask_results(roi_head, outs, samples, rescale)
    elif part == 'single_stage':
        if not hasattr(model, 'bbox_head') or hasattr(model, 'roi_head'):
            raise ValueError(f'{path} holds a single-stage detector but the config builds a '
                             f'{type(model).__name__}')
        model.extract_feat = types.MethodType(lambda self, inputs: session(inputs), model)

        def head_outputs(outs):
            n = len(outs) // 2
            return list(outs[:n]), list(outs[n:])
        model.bbox_head.forward = head_outputs
    else:
        if not hasattr(model, 'roi_head'):
            raise ValueError(f'{path} holds two-stage detector features but the config builds '
                             f'a {type(model).__name__}')
        if not torch_weights:
            raise ValueError(f'{path} holds the backbone + neck only; the RPN and RoI heads run '
                             f'in PyTorch and need the trained checkpoint: pass --torch-weights '
                             f'CHECKPOINT.pth')
        model.extract_feat = types.MethodType(lambda self, inputs: tuple(session(inputs)), model)
    return session


def end2end_results(outs, batch_data_samples, rescale=True):
    """``bbox_head.predict`` for an end-to-end file: its ``dets`` / ``labels`` (exported input
    pixels) as mmdet's ``InstanceData``, boxes clamped to the sample's ``img_shape`` and, with
    ``rescale``, divided by its ``scale_factor`` (mmdet's ``scale_boxes``)."""
    from mmengine.structures import InstanceData
    dets, labels = outs     # (N, K, 5) / (N, K), or N per-image tensors (RuntimeSession)
    if len(batch_data_samples) != len(dets):
        raise ValueError(f'{len(batch_data_samples)} images in the batch, the file returned '
                         f'detections for {len(dets)}')
    results = []
    for i, sample in enumerate(batch_data_samples):
        meta = sample.metainfo
        boxes = dets[i][:, :4].clone()
        h, w = meta['img_shape'][:2]
        # the graph clamps to the (padded) input; mmdet clamps to the image inside it
        boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=h)
        if rescale:
            sw, sh = meta['scale_factor']
            boxes = boxes * boxes.new_tensor([1 / sw, 1 / sh]).repeat(2)
        results.append(InstanceData(bboxes=boxes, scores=dets[i][:, 4].clone(),
                                    labels=labels[i].clone()))
    return results


def end2end_mask_results(roi_head, outs, batch_data_samples, rescale=True):
    """``roi_head.predict`` for an end-to-end Mask R-CNN file: :func:`end2end_results` of its
    ``dets`` / ``labels``, and its ``masks`` (box-relative probabilities) pasted into the image
    by the mask head's own ``_predict_by_feat_single`` (which rescales the boxes in place, as
    in mmdet)."""
    from mmdet.models.utils import empty_instances
    dets, labels, masks = outs
    results = end2end_results([dets, labels], batch_data_samples, rescale=False)
    thr = roi_head.test_cfg.mask_thr_binary
    for i, (res, sample) in enumerate(zip(results, batch_data_samples)):
        if len(res) == 0:
            results[i] = empty_instances([sample.metainfo], dets[i].device, task_type='mask',
                                         instance_results=[res], mask_thr_binary=thr)[0]
            continue
        # the file already picked each box's class channel: index channel 0
        res.masks = roi_head.mask_head._predict_by_feat_single(
            mask_preds=masks[i][:, None], bboxes=res.bboxes,
            labels=torch.zeros_like(res.labels), img_meta=sample.metainfo,
            rcnn_test_cfg=roi_head.test_cfg, rescale=rescale, activate_map=True)
    return results


__all__ = ['BACKENDS', 'PRECISIONS', 'RuntimeSession', 'attach_runtime', 'check_native_bf16',
           'read_metadata']
