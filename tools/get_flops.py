#!/usr/bin/env python
"""Parameters and FLOPs of a backbone (or of a config's backbone + neck) at a given input size.

    python tools/get_flops.py --model SwiftFormer --arch l1 --shape 224 224
    python tools/get_flops.py --config configs/maskrcnn_swiftformer_l1.py --shape 800 1344
    python tools/get_flops.py --all --shape 224 224          # every registered variant

FLOPs are counted by mmengine's analysis tool (fvcore convention: one multiply-add = one FLOP,
the convention of the papers' "GMACs"/"GFLOPs" tables), on a traced eval-mode forward.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import torch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Params / FLOPs report')
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument('--model', help='backbone class name, e.g. SwiftFormer')
    g.add_argument('--config', help='an mmdet/mmseg config: backbone and backbone+neck')
    g.add_argument('--all', action='store_true', help='every registered backbone variant')
    p.add_argument('--arch', help='variant (with --model)')
    p.add_argument('--shape', type=int, nargs=2, default=[224, 224], metavar=('H', 'W'))
    p.add_argument('--deploy', action='store_true', help='count after switch_to_deploy()')
    return p.parse_args(argv)


def flop_analyzer(module, inputs):
    """mmengine's FlopAnalyzer of ``module`` on ``inputs``, quiet about the ops and modules
    it does not count (the fvcore convention: one multiply-add = one FLOP)."""
    from mmengine.analysis import FlopAnalyzer
    fa = FlopAnalyzer(module, inputs)
    fa.unsupported_ops_warnings(False)
    fa.uncalled_modules_warnings(False)
    return fa


def count(module, inputs):
    from mmengine.analysis import parameter_count
    module.eval()
    with torch.no_grad():
        flops = flop_analyzer(module, inputs).total()
    return flops, parameter_count(module)['']


def backbone_rows(cls, archs, shape, deploy):
    rows = []
    for arch in archs:
        m = cls(arch=arch)
        if deploy:
            m.switch_to_deploy()
        flops, params = count(m, (torch.randn(1, 3, *shape),))
        rows.append((cls.__name__, arch, params, flops))
    return rows


def main(argv=None):
    args = parse_args(argv)
    from effbackbones.models import backbone_class, backbone_classes
    h, w = args.shape
    if args.config:
        from mmengine.config import Config
        from mmengine.registry import MODELS as ROOT
        from effbackbones.utils.launch import detect_toolbox, register_toolbox
        cfg = Config.fromfile(args.config)
        register_toolbox(detect_toolbox(cfg))
        cfg.model.backbone.init_cfg = None
        from mmengine.registry import DefaultScope
        with DefaultScope.overwrite_default_scope(cfg.get('default_scope')):
            model = ROOT.build(cfg.model)
        if args.deploy:
            model.backbone.switch_to_deploy()
        x = torch.randn(1, 3, h, w)
        bflops, bparams = count(model.backbone, (x,))

        class _Feat(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, x):
                return self.m.extract_feat(x)
        fflops, _ = count(_Feat(model), (x,))
        total_params = sum(p.numel() for p in model.parameters())
        print(f'config {args.config} at {h}x{w}')
        print(f'  backbone          : {bparams / 1e6:8.3f} M params  {bflops / 1e9:8.3f} GFLOPs')
        print(f'  backbone + neck   : {"":>8}            {fflops / 1e9:8.3f} GFLOPs')
        print(f'  whole model params: {total_params / 1e6:8.3f} M')
        return 0
    if args.model:
        try:
            cls = backbone_class(args.model)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        rows = backbone_rows(cls, [args.arch] if args.arch else list(cls.arch_zoo), (h, w),
                             args.deploy)
    else:
        rows = []
        for cls in backbone_classes().values():
            rows += backbone_rows(cls, list(cls.arch_zoo), (h, w), args.deploy)
    print(f'input 1x3x{h}x{w}{" (deploy)" if args.deploy else ""}')
    print(f'{"model":<20}{"arch":<8}{"params (M)":>12}{"GFLOPs":>10}')
    for name, arch, params, flops in rows:
        print(f'{name:<20}{arch:<8}{params / 1e6:>12.3f}{flops / 1e9:>10.3f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
