#!/usr/bin/env python
"""Convert a released ImageNet checkpoint (official or timm layout, any wrapper) into a clean
effbackbones backbone state_dict.

    python tools/convert_checkpoint.py SRC DST --model SwiftFormer --arch l1 [--mmdet]
    python tools/convert_checkpoint.py SRC DST            # family and arch detected

The file is loaded through the same checked path as init_cfg (report printed; a wrong or partial
file is an error), and only the tensors that came from the file are written, in our key layout:
use DST with ``init_cfg=dict(type='Pretrained', checkpoint=DST)``. ``--mmdet`` writes
``{'state_dict': {'backbone.<key>': ...}}`` instead, for ``load_from=DST`` in mmdet/mmseg.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import torch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('src', help='released checkpoint (.pth)')
    p.add_argument('dst', help='output file')
    p.add_argument('--model', help='backbone class, e.g. SwiftFormer, EfficientFormer, LeViT')
    p.add_argument('--arch', help='variant, e.g. l1 (with --model)')
    p.add_argument('--mmdet', action='store_true',
                   help="write {'state_dict': {'backbone.'+key}} for load_from")
    p.add_argument('--allow-unsafe', action='store_true',
                   help='load a trusted file that holds objects outside the weights-only '
                        'allow-list (weights_only=False)')
    p.add_argument('--not-strict', action='store_true',
                   help='accept a partial match (missing / unexpected tensors)')
    return p.parse_args(argv)


def _candidates(args):
    from effbackbones.registry import MODELS
    import effbackbones  # noqa: F401
    if args.model:
        cls = MODELS.get(args.model)
        if cls is None:
            raise SystemExit(f'unknown model {args.model!r}; known: {sorted(MODELS.module_dict)}')
        archs = [args.arch] if args.arch else sorted(cls.arch_zoo)
        return [(cls, a) for a in archs]
    if args.arch:
        raise SystemExit('--arch needs --model')
    return [(cls, a) for name, cls in sorted(MODELS.module_dict.items())
            if getattr(cls, 'arch_zoo', None) for a in sorted(cls.arch_zoo)]


def main(argv=None):
    args = parse_args(argv)
    from effbackbones.checkpoint import CheckpointError, load_checkpoint_file, load_pretrained
    ckpt = load_checkpoint_file(args.src, allow_unsafe=args.allow_unsafe)
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
