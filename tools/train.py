#!/usr/bin/env python
"""Train an mmdet 3.3 or mmseg 1.2.2 config that uses an effbackbones backbone.

    python tools/train.py configs/maskrcnn_swiftformer_l1.py [--work-dir DIR] [--amp]
        [--resume [CKPT]] [--auto-scale-lr] [--cfg-options k=v ...] [--launcher pytorch]

The toolbox (mmdet or mmseg) is picked from the config's ``default_scope``. Training is
crash-safe (docs/reliability.md): ``effbackbones.ExactResumeHook`` and
``effbackbones.DivergenceGuardHook`` are added when the config does not list them, checkpoints
are written atomically, ``--resume`` continues bit-identically and passes over a damaged latest
checkpoint; a diverged run exits with status 3. Several processes:
``bash tools/dist_train.sh CONFIG NUM_PROCS`` (torch.distributed through mmengine; nccl on GPUs,
gloo on CPU-only machines).
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmengine.config import Config  # noqa: E402

from effbackbones.utils.launch import (  # noqa: E402
    add_common_args, check_datasets, check_pretrained_files, detect_toolbox, ensure_custom_hook,
    main_guard, parse_common, prepare_config, register_toolbox)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Train a detector / segmentor with effbackbones')
    p.add_argument('config', help='train config file path')
    p.add_argument('--work-dir', help='the dir to save logs and models')
    p.add_argument('--amp', action='store_true', help='automatic mixed precision training')
    p.add_argument('--auto-scale-lr', action='store_true',
                   help='scale the lr linearly with the actual total batch size')
    p.add_argument('--resume', nargs='?', type=str, const='auto',
                   help='resume from CKPT, or from the latest checkpoint in the work dir '
                        'when no path is given')
    return parse_common(add_common_args(p), argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    toolbox = detect_toolbox(cfg)
    register_toolbox(toolbox)
    cfg = prepare_config(cfg, args, osp.join('./work_dirs',
                                             osp.splitext(osp.basename(args.config))[0]))

    if args.amp:
        import torch
        if not torch.cuda.is_available():
            raise SystemExit('--amp needs a CUDA GPU (mmengine AmpOptimWrapper); on CPU train '
                             'in float32 without --amp.')
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg or 'base_batch_size' not in cfg.auto_scale_lr:
            raise SystemExit('--auto-scale-lr needs auto_scale_lr.base_batch_size in the config')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        if not osp.isfile(args.resume):
            raise SystemExit(f'--resume: checkpoint not found: {args.resume}')
        cfg.resume = True
        cfg.load_from = args.resume

    check_datasets(cfg, ('train_dataloader', 'val_dataloader') if cfg.get('val_cfg')
                   else ('train_dataloader',))
    check_pretrained_files(cfg)

    add_reliability_hooks(cfg)

    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    from effbackbones.engine import TrainingDiverged
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    try:
        runner.train()
    except TrainingDiverged as exc:
        print(f'ERROR: {exc}', file=sys.stderr)
        sys.exit(3)


RELIABILITY_HOOKS = ('ExactResumeHook', 'DivergenceGuardHook')


def add_reliability_hooks(cfg):
    """Our configs list both hooks (configs/_base_); other configs get them here."""
    for name in RELIABILITY_HOOKS:
        ensure_custom_hook(cfg, name)


if __name__ == '__main__':
    main_guard(main)
