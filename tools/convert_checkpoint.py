#!/usr/bin/env python
"""Convert a released checkpoint into an effbackbones checkpoint, loudly.

Whole model (official EfficientFormer / EfficientFormerV2 COCO Mask R-CNN or ADE20K Semantic FPN
releases, mmdet 2.x / mmseg 0.x runner files with ``meta``, ``state_dict``, ``optimizer``):

    python tools/convert_checkpoint.py efficientformer_l1_coco.pth OUT.pth \\
        --config configs/maskrcnn_efficientformer_l1.py

builds the config's model, converts the backbone part from the official dense layout
(``backbone.patch_embed``/``network``/``norm0..6``, ``attention_biases_seg``; the
``attention_bias_idxs*`` buffers are dropped, ours are computed), keeps the neck and heads
(mmdet 3 / mmseg 1 use the mmdet 2 / mmseg 0 names), checks that the result loads into the
model with ``strict=True`` (missing, unexpected or shape-mismatched tensors are an error naming
them) and writes ``{'meta': {..., 'dataset_meta': {'classes': ...}}, 'state_dict': ...}`` for
``tools/test.py CONFIG OUT.pth`` / ``load_from``. The mmcv 1.x ``optimizer`` state is dropped.
``tools/test.py`` and ``load_from`` also take the released file directly (same conversion in
memory), so this step is only needed to store a clean file.

Backbone only (released ImageNet checkpoints, official or timm layout, any wrapper):

    python tools/convert_checkpoint.py SRC DST --model SwiftFormer --arch l1 [--mmdet]
    python tools/convert_checkpoint.py SRC DST            # family and arch detected

The file is loaded through the same checked path as init_cfg (report printed; a wrong or partial
file is an error), and only the tensors that came from the file are written, in our key layout:
use DST with ``init_cfg=dict(type='Pretrained', checkpoint=DST)``. ``--mmdet`` writes
``{'state_dict': {'backbone.<key>': ...}}`` instead; as ``load_from`` it fits only partly (no
neck / heads), so it needs ``--load-not-strict``: prefer ``init_cfg`` for backbone weights.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import torch  # noqa: E402


def parse_args(argv=None):
    from mmengine.config import DictAction
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('src', help='released checkpoint (.pth, .pth.tar or .safetensors)')
    p.add_argument('dst', help='output file')
    p.add_argument('--config', help='mmdet/mmseg config: convert the whole model for it')
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='override config settings (with --config), key=value')
    p.add_argument('--model', help='backbone class, e.g. SwiftFormer, EfficientFormer, LeViT')
    p.add_argument('--arch', help='variant, e.g. l1 (with --model)')
    p.add_argument('--mmdet', action='store_true',
                   help="write {'state_dict': {'backbone.'+key}} (backbone only)")
    p.add_argument('--allow-unsafe', action='store_true',
                   help='load a trusted file that holds objects outside the weights-only '
                        'allow-list (weights_only=False)')
    p.add_argument('--not-strict', action='store_true',
                   help='accept a partial match (missing / unexpected tensors)')
    return p.parse_args(argv)


def _candidates(args):
    from effbackbones.models import backbone_class, backbone_classes
    if args.model:
        try:
            cls = backbone_class(args.model)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        archs = [args.arch] if args.arch else sorted(cls.arch_zoo)
        return [(cls, a) for a in archs]
    if args.arch:
        raise SystemExit('--arch needs --model')
    return [(cls, a) for cls in backbone_classes().values() for a in sorted(cls.arch_zoo)]


def convert_whole_model(args, ckpt):
    from mmengine.config import Config
    from effbackbones.checkpoint import convert_model_checkpoint
    from effbackbones.utils.launch import build_model
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    model = build_model(cfg)
    new, report = convert_model_checkpoint(model, ckpt, strict=not args.not_strict,
                                           name=args.src, logger='silent')
    print(report['text'])
    meta = new['meta']
    meta['effbackbones'] = dict(source=osp.basename(args.src), config=osp.basename(args.config))
    torch.save(dict(meta=meta, state_dict=new['state_dict']), args.dst)
    classes = (meta.get('dataset_meta') or {}).get('classes')
    print(f'{type(model).__name__} of {args.config}: wrote {len(new["state_dict"])} tensors to '
          f'{args.dst}' + (f' (dataset_meta: {len(classes)} classes)' if classes else
                           ' (the file names no classes)'))
    return 0


def main(argv=None):
    args = parse_args(argv)
    from effbackbones.checkpoint import CheckpointError, load_checkpoint_file, load_pretrained
    ckpt = load_checkpoint_file(args.src, allow_unsafe=args.allow_unsafe)
    if args.config:
        if args.model or args.arch or args.mmdet:
            raise SystemExit('--config converts the whole model: drop --model/--arch/--mmdet')
        try:
            return convert_whole_model(args, ckpt)
        except CheckpointError as exc:
            raise SystemExit(str(exc)) from None
    errors = []
    for cls, arch in _candidates(args):
        model = cls(arch=arch)
        try:
            report = load_pretrained(model, ckpt, strict=not args.not_strict)
        except CheckpointError as exc:
            errors.append((cls.__name__, arch, str(exc).splitlines()[-1]))
            continue
        own = model.state_dict()
        out = {k: own[k] for k in report['matched']}
        if args.mmdet:
            obj = {'state_dict': {'backbone.' + k: v for k, v in out.items()},
                   'meta': dict(effbackbones=dict(model=cls.__name__, arch=arch,
                                                  source=osp.basename(args.src)))}
        else:
            obj = out
        torch.save(obj, args.dst)
        print(f'{cls.__name__}(arch={arch!r}): wrote {len(out)} tensors to {args.dst} '
              f"(source layout {report['layout']}, wrapper {report['wrapper']!r})")
        return 0
    lines = '\n'.join(f'  {m} {a}: {e}' for m, a, e in errors[:12])
    raise SystemExit(f'{args.src} fits none of the tried backbones:\n{lines}')


if __name__ == '__main__':
    sys.exit(main())
