#!/usr/bin/env python
"""Post-training INT8 quantization (NNCF) of a trained config's exported part or of a backbone:
an OpenVINO IR (.xml + .bin) or, with --backend onnxruntime, a QDQ .onnx.

    # a trained Semantic FPN (image -> seg_logits), RetinaNet (raw head) or Mask R-CNN
    # (backbone + neck; RPN / RoI heads stay in PyTorch): calibration on the config's train
    # images through its test pipeline, the error checked on its first test images
    python tools/quantize.py configs/demo/semfpn_swiftformer_xs_shapes.py \\
        work_dirs/demo/semfpn/iter_120.pth --out semfpn_int8.xml [--calib 32] [--check 4]
    python tools/test.py configs/demo/semfpn_swiftformer_xs_shapes.py semfpn_int8.xml \
        --backend openvino
    # a backbone: calibration images from a folder (resized to --shape, ImageNet-normalised)
    python tools/quantize.py --model EfficientFormer --arch l1 --checkpoint l1.pth \\
        --shape 512 512 --calib-dir images/ --out efficientformer_l1_int8.xml
    # ... or synthetic shapes scenes (said so in the log), when no images are at hand
    python tools/quantize.py --model LeViT --arch 384 --shape 512 512 --synthetic-calib \\
        --out levit_384_int8.xml
    # onnxruntime: a QDQ ONNX file
    python tools/quantize.py CONFIG CKPT --backend onnxruntime --out semfpn_int8.onnx

The float32 graph is exported first (tools/export_onnx.py's exporter, deploy form, static at the
calibration images' size unless --dynamic, tuned for the --backend runtime, parity-checked); the
INT8 file is compared with it on held-out images, one line per output (max|int8-fp32|/max|fp32|,
mean|int8-fp32|/mean|fp32|), and not written when the worst mean-relative error is above the
family's bound (docs/int8.md; --bound to set another) unless --force. Exit status 2 for a request
that cannot be met, 3 when the bound refused the file, 1 when the float32 parity check failed.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))


def parse_args(argv=None):
    from mmengine.config import DictAction
    p = argparse.ArgumentParser(description='post-training INT8 quantization with NNCF')
    p.add_argument('config', nargs='?', help='a trained config of this project (with CHECKPOINT)')
    p.add_argument('config_checkpoint', nargs='?', metavar='CHECKPOINT',
                   help='a trained checkpoint of CONFIG')
    p.add_argument('--model', help='backbone class (instead of CONFIG), e.g. SwiftFormer')
    p.add_argument('--arch', help='backbone variant (with --model)')
    p.add_argument('--checkpoint', help='backbone weights (with --model; default random)')
    p.add_argument('--out-indices', type=int, nargs='+', help='maps to return (with --model)')
    p.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                   help='input size (required with --model; with CONFIG the test pipeline '
                        "gives it)")
    p.add_argument('--dynamic', action='store_true',
                   help='free batch / height / width (needed when the test pipeline gives '
                        'images of several sizes)')
    p.add_argument('--calib', type=int, default=32, help='calibration images (default 32)')
    p.add_argument('--check', type=int, default=4,
                   help='held-out images the INT8 file is compared on (default 4)')
    p.add_argument('--calib-dir', help='with --model: a folder of calibration images (the '
                                       'first --calib by name; the next --check held out)')
    p.add_argument('--synthetic-calib', action='store_true',
                   help='with --model and no --calib-dir: calibrate on synthetic shapes scenes')
    p.add_argument('--backend', choices=('openvino', 'onnxruntime'), default='openvino',
                   help='openvino: an IR .xml (+ .bin); onnxruntime: a QDQ .onnx')
    p.add_argument('--bound', type=float,
                   help="largest accepted mean|int8-fp32|/mean|fp32| of any output (default: "
                        "the family's, docs/int8.md)")
    p.add_argument('--force', action='store_true', help='write the file above the bound too')
    p.add_argument('--cpu', choices=('vnni', 'avx2'),
                   help='the CPUs the file is for: vnni (AVX512-VNNI / AVX-VNNI / AMX) or avx2 '
                        '(every x86 CPU: NNCF overflow fix, needed where there is no VNNI); '
                        "default: this CPU's kind")
    p.add_argument('--keep-float', metavar='FILE.onnx',
                   help='also write the float32 ONNX file the INT8 one was made from (the '
                        'graph form for int8 kernels; tools/export_onnx.py writes the fastest '
                        'float32 file)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                   help='with CONFIG: override settings, e.g. train_dataloader.dataset.data_root=D')
    p.add_argument('--out', required=True, help='the .xml (openvino) or .onnx (onnxruntime)')
    return p.parse_args(argv)


def backbone_request(args):
    """(model, shape, calibration, held-out, metadata) of a --model request."""
    from effbackbones.deploy.export import build_backbone
    from effbackbones.deploy.quantize import QuantizeError, images_from_dir, synthetic_images
    if args.config:
        raise QuantizeError('give either CONFIG CHECKPOINT or --model, not both')
    if not args.arch or not args.shape:
        raise QuantizeError('--model needs --arch and --shape H W')
    model = build_backbone(args.model, args.arch, args.checkpoint, args.out_indices)
    shape = tuple(args.shape)
    if args.calib_dir:
        calib = images_from_dir(args.calib_dir, args.calib, shape)
        check = images_from_dir(args.calib_dir, args.check, shape, skip=args.calib)
    elif args.synthetic_calib:
        print(f'calibration: {args.calib} SYNTHETIC shapes scenes (no --calib-dir); the INT8 '
              f'scales fit those scenes, not your data')
        calib = synthetic_images(args.calib, shape, seed=0)
        check = synthetic_images(args.check, shape, seed=1)
    else:
        raise QuantizeError('--model needs calibration images: --calib-dir DIR (a folder of '
                            'images like the ones the model will see), or --synthetic-calib '
                            '(synthetic shapes scenes: a smoke test, not a calibration for '
                            'real data)')
    return model, shape, calib, check, {'effbackbones.model': f'{args.model} {args.arch}'}


def config_request(args):
    """(model, shape, calibration, held-out, metadata) of a CONFIG CHECKPOINT request:
    calibration from the train set, held-out images from the test set, both through the
    config's test pipeline."""
    from effbackbones.deploy.export import build_from_config
    from effbackbones.deploy.quantize import QuantizeError, config_inputs
    if not args.config_checkpoint:
        raise QuantizeError('CONFIG needs CHECKPOINT (a trained checkpoint of it)')
    if args.model or args.out_indices or args.calib_dir or args.synthetic_calib:
        raise QuantizeError('--model / --out-indices / --calib-dir / --synthetic-calib apply to '
                            'a backbone; CONFIG calibrates on its own train images')
    model, cfg = build_from_config(args.config, args.config_checkpoint, args.cfg_options)
    calib = config_inputs(model, cfg, 'train', args.calib)
    check = config_inputs(model, cfg, 'test', args.check)
    sizes = sorted({tuple(x.shape[2:]) for x in calib + check})
    if args.shape:
        shape = tuple(args.shape)
    elif len(sizes) == 1 or args.dynamic:
        shape = sizes[0]
    if not args.dynamic and (len(sizes) > 1 or sizes[0] != shape):
        raise QuantizeError(f'the test pipeline gives inputs of {len(sizes)} size(s) '
                            f'{["x".join(map(str, s)) for s in sizes]} and the file would be '
                            f'static at {"x".join(map(str, shape))}: add --dynamic')
    return model, shape, calib, check, {'effbackbones.config': args.config}


def main(argv=None):
    args = parse_args(argv)
    from effbackbones.checkpoint import CheckpointError
    from effbackbones.deploy import ExportError, ParityError
    from effbackbones.deploy.quantize import BoundError, quantize
    try:
        if args.calib < 1 or args.check < 1:
            raise ExportError('--calib and --check must be at least 1')
        if args.model:
            model, shape, calib, check, meta = backbone_request(args)
        elif args.config:
            model, shape, calib, check, meta = config_request(args)
        else:
            raise ExportError('give CONFIG CHECKPOINT, or --model CLASS --arch A --shape H W')
        quantize(model, shape, args.out, calib, check, backend=args.backend,
                 dynamic=args.dynamic, bound=args.bound, force=args.force, metadata=meta,
                 keep_float=args.keep_float, cpu=args.cpu)
    except (ExportError, CheckpointError) as exc:
        print(f'quantize: {exc}', file=sys.stderr)
        return 2
    except BoundError as exc:
        print(f'quantize: REFUSED: {exc}', file=sys.stderr)
        return 3
    except ParityError as exc:
        print(f'quantize: float32 export PARITY FAILED: {exc}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
