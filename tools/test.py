#!/usr/bin/env python
"""Evaluate a checkpoint of an mmdet 3.3 / mmseg 1.2.2 config that uses an effbackbones backbone.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out FILE] [--show-dir DIR]
        [--deploy] [--cfg-options k=v ...] [--launcher pytorch]
    python tools/test.py CONFIG MODEL.onnx --backend onnxruntime|openvino [--torch-weights CKPT]
    python tools/test.py CONFIG MODEL.onnx --backend openvino --precision bfloat16
    python tools/test.py CONFIG MODEL_INT8.xml --backend openvino    # tools/quantize.py's IR

``--deploy`` switches the backbone to deploy form (BatchNorms and layer scales folded) before
testing: the same predictions. ``--show-dir`` saves pictures of the predictions.

CHECKPOINT may be one of our training checkpoints or an official released dense file
(EfficientFormer / EfficientFormerV2 COCO Mask R-CNN, ADE20K Semantic FPN: mmdet 2.x / mmseg 0.x
runner files): ``effbackbones.StrictLoadHook`` converts it in memory, logs the load report and
stops with an error naming every missing, unexpected or shape-mismatched tensor, so nothing is
evaluated with partly random weights (``--load-not-strict`` opts out).

``--backend`` runs a file of tools/export_onnx.py --config in that runtime, the post-processing
in PyTorch (effbackbones.deploy.attach_runtime; docs/deploy.md); an ``--end2end`` RetinaNet
or Mask R-CNN file holds its post-processing too (PyTorch only maps the boxes back to the image
and pastes the masks). ``--precision bfloat16`` runs the (float32) file in bfloat16 in OpenVINO
on a CPU with native bf16 (AVX512-BF16 / AMX), for its metric next to the float32 run's.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmengine.config import Config  # noqa: E402

from effbackbones.deploy.contract import BACKENDS  # noqa: E402
from effbackbones.utils.launch import (  # noqa: E402
    add_common_args, check_datasets, detect_toolbox, ensure_custom_hook, main_guard, parse_common,
    prepare_config, register_toolbox)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Test a detector / segmentor with effbackbones')
    p.add_argument('config', help='test config file path')
    p.add_argument('checkpoint', help='checkpoint file')
    p.add_argument('--work-dir', help='the dir to save logs and metrics')
    p.add_argument('--out', help='mmdet: dump predictions to this .pkl; mmseg: save '
                                 'prediction maps in this directory')
    p.add_argument('--show', action='store_true', help='show predictions in a window')
    p.add_argument('--show-dir', help='save pictures of the predictions in this directory, '
                                      'inside the work dir')
    p.add_argument('--wait-time', type=float, default=2, help='interval of --show (s)')
    p.add_argument('--deploy', action='store_true',
                   help='switch the backbone to deploy mode (BN folded) before testing')
    p.add_argument('--backend', choices=BACKENDS,
                   help='CHECKPOINT is an ONNX file of tools/export_onnx.py: run it here')
    p.add_argument('--precision', default='float32',
                   help="with --backend: inference precision of the file's run, float32 "
                        '(default) or bfloat16 (OpenVINO on a CPU with native bf16)')
    p.add_argument('--torch-weights', help='with --backend: checkpoint for the parts left in '
                                           'PyTorch (Mask R-CNN RPN / RoI heads)')
    return parse_common(add_common_args(p), argv)


def main(argv=None):
    args = parse_args(argv)
    if args.precision != 'float32' and not args.backend:
        raise SystemExit(f'--precision {args.precision} applies to an ONNX file run with '
                         f'--backend openvino; a PyTorch checkpoint is tested in float32')
    cfg = Config.fromfile(args.config)
    toolbox = detect_toolbox(cfg)
    register_toolbox(toolbox)
    cfg = prepare_config(cfg, args, osp.join('./work_dirs',
                                             osp.splitext(osp.basename(args.config))[0]))
    if not osp.isfile(args.checkpoint) and '://' not in args.checkpoint:
        raise SystemExit(f'checkpoint not found: {args.checkpoint}')
    # with --backend the ONNX file carries the exported part; --torch-weights the rest
    cfg.load_from = args.torch_weights if args.backend else args.checkpoint
    # the trained weights replace the ImageNet init: do not require the ImageNet file
    if cfg.model.get('backbone', {}).get('init_cfg') is not None:
        cfg.model.backbone.init_cfg = None
    check_datasets(cfg, ('test_dataloader',))

    if args.show or args.show_dir:
        hooks = cfg.default_hooks
        if 'visualization' not in hooks:
            raise SystemExit('--show/--show-dir need default_hooks.visualization in the config')
        hooks.visualization.draw = True
        if args.show:
            hooks.visualization.show = True
            hooks.visualization.wait_time = args.wait_time
        if args.show_dir:
            if toolbox == 'mmdet':
                # DetVisualizationHook: <work_dir>/<timestamp>/<show_dir>/
                hooks.visualization.test_out_dir = args.show_dir
            else:
                # mmseg draws through the visualizer: <work_dir>/<show_dir>/vis_data/vis_image/;
                # its hook draws only every 50th batch by default: draw them all
                cfg.visualizer.save_dir = osp.join(cfg.work_dir, args.show_dir)
                hooks.visualization.interval = 1
    if args.out:
        if toolbox == 'mmdet':
            dump = dict(type='DumpDetResults', out_file_path=args.out)
            ev = cfg.test_evaluator
            cfg.test_evaluator = (list(ev) if isinstance(ev, (list, tuple)) else [ev]) + [dump]
        else:
            cfg.test_evaluator['output_dir'] = args.out
            cfg.test_evaluator['keep_results'] = True
    if args.deploy:
        ensure_custom_hook(cfg, 'DeployHook')

    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    if args.backend:
        from effbackbones.deploy import attach_runtime
        try:
            session = attach_runtime(runner.model, args.checkpoint, args.backend,
                                     torch_weights=args.torch_weights, precision=args.precision)
        except (ValueError, FileNotFoundError) as exc:
            raise SystemExit(str(exc)) from None
        stored = session.metadata.get('effbackbones.precision', 'float32')
        runner.logger.info(f'{args.checkpoint} ({session.part}, {stored} file) runs in '
                           f'{args.backend}, {session.precision} inference')
    runner.test()


if __name__ == '__main__':
    main_guard(main)
