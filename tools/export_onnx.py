#!/usr/bin/env python
"""Export an effbackbones backbone, a whole Semantic FPN, or a detector (whole with --end2end, else
its exportable part) to ONNX, then check the file in onnxruntime against PyTorch (fails above the
tolerance).

    # a backbone in deploy form (BN folded), outputs out_<i> in out_indices order
    python tools/export_onnx.py --model SwiftFormer --arch l1 --checkpoint SwiftFormer_L1.pth \\
        --shape 512 512 [--out-indices 0 1 2 3] [--batch 1] [--dynamic] --out swiftformer_l1.onnx
    # a trained config: Semantic FPN -> seg logits; RetinaNet -> raw head outputs;
    # Mask R-CNN -> backbone + neck features (post-processing runs in PyTorch, tools/test.py)
    python tools/export_onnx.py --config configs/semfpn_swiftformer_l1.py \\
        --checkpoint work_dirs/semfpn_swiftformer_l1/iter_40000.pth --shape 512 512 --out semfpn.onnx
    # a whole detector: RetinaNet -> dets (1, K, 5) [x1, y1, x2, y2, score], labels (1, K);
    # Mask R-CNN -> dets, labels, masks (1, K, 28, 28);
    # NMS / RoIAlign in the graph (ONNX NonMaxSuppression / RoiAlign); batch 1, static size
    # unless --dynamic (free height / width)
    python tools/export_onnx.py --config configs/retinanet_mobileformer_26m.py \\
        --checkpoint epoch_12.pth --shape 800 1344 --end2end --out retinanet_end2end.onnx

``--dynamic`` makes batch, height and width free (every backbone family; the attention biases
of EfficientFormer v1 / V2 and LeViT are then computed in the graph from the input's size; an
``--end2end`` detector gets free height and width, its anchors computed from them, batch 1).
``--runtime openvino`` tunes a static graph for OpenVINO: maps with 16-64 channels reach the
consumers that need them channels-first (graph outputs, EfficientFormer's output GroupNorms,
SwiftFormer's global query, Mobile-Former's bridges) without OpenVINO's scalar reorder
(0.82-0.98x of OpenVINO's time at 512x512; Mobile-Former's file is slower in onnxruntime, the
others the same); the file runs in both runtimes with the same outputs and is checked in both.
Exit status 2 with a message for a request that cannot be met, 1 when the parity check fails.
See docs/deploy.md.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='ONNX export with an onnxruntime parity check')
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument('--model', help='backbone class, e.g. SwiftFormer, EfficientFormer, LeViT')
    g.add_argument('--config', help='an mmdet / mmseg config of this project (with --checkpoint)')
    p.add_argument('--arch', help='backbone variant (with --model), e.g. l1, s0, 128s, 294m')
    p.add_argument('--checkpoint', help='with --model: backbone weights (.pth or .safetensors; '
                                        'official, timm or ours; the init_cfg loader); with '
                                        '--config: a trained '
                                        'checkpoint of the config (required)')
    p.add_argument('--out-indices', type=int, nargs='+', help='maps to return (with --model)')
    p.add_argument('--shape', type=int, nargs=2, required=True, metavar=('H', 'W'))
    p.add_argument('--batch', type=int, default=1)
    p.add_argument('--dynamic', action='store_true',
                   help='free batch / height / width (--end2end: height / width)')
    p.add_argument('--end2end', action='store_true',
                   help='with --config of a detector (RetinaNet, Mask R-CNN): the whole model '
                        'with its post-processing, image -> dets, labels (, masks); batch 1, '
                        'static unless --dynamic (free height / width)')
    from effbackbones.deploy.contract import BACKENDS
    p.add_argument('--runtime', choices=BACKENDS, default='onnxruntime',
                   help='the runtime a static graph is tuned for (default onnxruntime); the file '
                        'runs in both')
    p.add_argument('--no-deploy', action='store_true',
                   help='export the eager backbone (BN not folded)')
    p.add_argument('--no-check', action='store_true', help='skip the onnxruntime parity check')
    p.add_argument('--opset', type=int, default=None, help='ONNX opset (default 17)')
    p.add_argument('--out', required=True, help='the .onnx file to write')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from effbackbones.checkpoint import CheckpointError
    from effbackbones.deploy import OPSET, ExportError, ParityError, export
    from effbackbones.deploy.export import build_backbone, build_from_config
    try:
        if args.model:
            if not args.arch:
                raise ExportError('--model needs --arch (e.g. --model SwiftFormer --arch l1)')
            model = build_backbone(args.model, args.arch, args.checkpoint, args.out_indices)
            meta = {'effbackbones.model': f'{args.model} {args.arch}'}
        else:
            if not args.checkpoint:
                raise ExportError('--config needs --checkpoint (a trained checkpoint of it)')
            if args.out_indices:
                raise ExportError('--out-indices applies to --model; a config fixes its own')
            model, _ = build_from_config(args.config, args.checkpoint)
            meta = {'effbackbones.config': args.config}
        export(model, args.shape, args.out, batch=args.batch, dynamic=args.dynamic,
               deploy=not args.no_deploy, check=not args.no_check, opset=args.opset or OPSET,
               metadata=meta, end2end=args.end2end, runtime=args.runtime)
    except (ExportError, CheckpointError) as exc:
        print(f'export_onnx: {exc}', file=sys.stderr)
        return 2
    except ParityError as exc:
        print(f'export_onnx: PARITY FAILED: {exc}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
