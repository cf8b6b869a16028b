#!/usr/bin/env python
"""Train an mmdet 3.3 or mmseg 1.2.2 config that uses an effbackbones backbone.

    python tools/train.py configs/maskrcnn_swiftformer_l1.py [--work-dir DIR] [--amp]
        [--resume [CKPT]] [--auto-scale-lr] [--cfg-options k=v ...] [--launcher pytorch]

The toolbox (mmdet or mmseg) is picked from the config's ``default_scope``. Several processes:
``bash tools/dist_train.sh CONFIG NUM_PROCS`` (torch.distributed through mmengine; nccl on GPUs,
gloo on CPU-only machines).
"""
import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmengine.config import Config, DictAction  # noqa: E402

from effbackbones.utils.launch import (check_datasets, check_pretrained_files,  # noqa: E402
                                       detect_toolbox, main_guard, prepare_config,
                                       register_toolbox)


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
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='override config settings, xxx=yyy format')
    p.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    p.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = p.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


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

    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    runner.train()


if __name__ == '__main__':
    main_guard(main)
