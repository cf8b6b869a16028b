#!/usr/bin/env python
"""What a one-GPU machine must show (run through tools/gpu_check.sh; docs/install.md).

1. mmcv's ops hold CUDA kernels, and RoIAlign / NMS on the GPU agree with the CPU;
2. every family's reference pack (``shared/reference``): parity on the GPU in float32 (the packs'
   own tolerance), and under bf16 / fp16 autocast finite outputs within
   ``|out - ref| <= AUTOCAST_TOL * max|ref|`` per output map;
3. ``ITERS`` training iterations of each demo config (``configs/demo/``) with AMP
   (mmengine's ``AmpOptimWrapper``) on the synthetic shapes data: finite losses, images/s after
   the warm-up iterations, peak GPU memory;
4. a summary table; the exit status is 1 when any row failed.

``--dry-run`` runs the same steps on the CPU, small: one variant per family, bf16 autocast only
(CPU autocast), 2 iterations per demo config in float32 (AMP needs a GPU), mmcv's ops on the CPU
only. The suite runs it (tests/test_gpu_check.py).
"""
import argparse
import contextlib
import itertools
import math
import os
import os.path as osp
import sys
import tempfile
import time
import traceback

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import torch  # noqa: E402

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
ITERS, WARMUP = 20, 5
AUTOCAST_TOL = {torch.bfloat16: 0.1, torch.float16: 0.05}  # of max|ref|, per output map
FAMILIES = {  # family -> (class name, variants, extra kwargs); the first variant is the dry run's
    'swiftformer': ('SwiftFormer', ('xs', 's', 'l1', 'l3'), {}),
    'efficientformer': ('EfficientFormer', ('l1', 'l3', 'l7'), {}),
    'efficientformerv2': ('EfficientFormerV2', ('s0', 's1', 's2', 'l'), {}),
    'levit': ('LeViT', ('128s', '128', '192', '256', '384'), dict(out_indices=(0, 1, 2, 3, 4))),
    'mobileformer': ('MobileFormer', ('26m', '52m', '96m', '151m', '214m', '294m', '508m'), {}),
}
DEMOS = ('configs/demo/maskrcnn_swiftformer_xs_shapes.py',
         'configs/demo/semfpn_swiftformer_xs_shapes.py')


def reference_dir():
    for c in (os.environ.get('EFFB_REFERENCE_DIR', ''), osp.join(REPO, '..', 'shared', 'reference'),
              osp.join(REPO, 'shared', 'reference'), osp.join(REPO, 'tests', 'data', 'reference')):
        if c and osp.isfile(osp.join(c, 'make_weights.py')):
            return osp.abspath(c)
    raise SystemExit('reference packs not found: set EFFB_REFERENCE_DIR to the folder holding '
                     'make_weights.py')


class Rows:
    """The summary table: (check, result, status) rows."""

    def __init__(self):
        self.rows = []

    def add(self, check, result, ok):
        self.rows.append((check, result, 'ok' if ok else 'FAIL'))
        print(f'[gpu_check] {check}: {result} -> {"ok" if ok else "FAIL"}', flush=True)

    def table(self):
        w = max(len(r[0]) for r in self.rows)
        lines = [f'| {"check":<{w}} | status | result', f'|{"-" * (w + 2)}|--------|-------']
        lines += [f'| {c:<{w}} | {s:<6} | {r}' for c, r, s in self.rows]
        return '\n'.join(lines)

    @property
    def failed(self):
        return any(s == 'FAIL' for _, _, s in self.rows)


def check_mmcv_ops(rows, device):
    try:
        from mmcv.ops import get_compiling_cuda_version, nms, roi_align
    except Exception as err:  # noqa: BLE001
        rows.add('mmcv ops', f'do not load ({type(err).__name__}: {err})', False)
        return
    compiled = get_compiling_cuda_version()
    if device == 'cuda':
        rows.add('mmcv ops CUDA kernels', f'compiled with CUDA {compiled}',
                 compiled != 'not available')
        if compiled == 'not available':
            return
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 8, 32, 32, generator=g)
    xy = torch.rand(16, 2, generator=g) * 20
    rois = torch.cat([torch.randint(0, 2, (16, 1), generator=g).float(), xy, xy + 8], 1)
    boxes = torch.cat([xy, xy + 6], 1)
    scores = torch.rand(16, generator=g)
    ref_roi = roi_align(feats, rois, (7, 7), 1.0, 2, 'avg', True)
    ref_keep = nms(boxes, scores, 0.5)[1]
    if device == 'cpu':
        rows.add('mmcv ops (CPU)', f'RoIAlign {tuple(ref_roi.shape)}, NMS kept {len(ref_keep)}',
                 bool(torch.isfinite(ref_roi).all()) and len(ref_keep) > 0)
        return
    got_roi = roi_align(feats.cuda(), rois.cuda(), (7, 7), 1.0, 2, 'avg', True).cpu()
    got_keep = nms(boxes.cuda(), scores.cuda(), 0.5)[1].cpu()
    err = float((got_roi - ref_roi).abs().max())
    rows.add('mmcv RoIAlign / NMS on GPU vs CPU', f'RoIAlign max err {err:.1e}, NMS same '
             f'{torch.equal(got_keep, ref_keep)}', err < 1e-4 and torch.equal(got_keep, ref_keep))


def _pack_model(mw, family, variant, device):
    import effbackbones.models as models
    from effbackbones.checkpoint import load_pretrained
    cls_name, _, kwargs = FAMILIES[family]
    pack = mw.load_pack(osp.join(reference_dir(), family, f'{variant}.pt'))
    model = getattr(models, cls_name)(variant, **kwargs)
    load_pretrained(model, mw.state_dict_from_pack(pack), logger='silent')
    return model.eval().to(device), pack


def check_parity(rows, device, dry_run):
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        'effb_make_weights', osp.join(reference_dir(), 'make_weights.py'))
    mw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mw)
    dtypes = (torch.bfloat16,) if dry_run else (torch.bfloat16, torch.float16)
    for family, (_, variants, _) in FAMILIES.items():
        for variant in variants[:1] if dry_run else variants:
            with guarded(rows, f'{family} {variant} parity ({device})'):
                check_pack(rows, mw, family, variant, device, dtypes)


def check_pack(rows, mw, family, variant, device, dtypes):
    model, pack = _pack_model(mw, family, variant, device)
    x = mw.input_from_pack(pack).to(device)
    with torch.no_grad():
        outs = [o.float().cpu() for o in model(x)]
    ok, report = mw.compare_outputs(outs, pack)
    rows.add(f'{family} {variant} float32 parity ({device})',
             'pack tolerance' if ok else report.replace('\n', '; ')[:200], ok)
    for dtype in dtypes:
        with torch.no_grad(), torch.autocast(device, dtype=dtype):
            outs = [o.float().cpu() for o in model(x)]
        errs = [float((o - r).abs().max() / r.abs().max()) for o, r in zip(outs, pack['outputs'])]
        finite = all(bool(torch.isfinite(o).all()) for o in outs)
        name = str(dtype).replace('torch.', '')
        rows.add(f'{family} {variant} {name} autocast', f'finite {finite}, max err '
                 f'{max(errs):.3f} x max|ref| (limit {AUTOCAST_TOL[dtype]})',
                 finite and max(errs) <= AUTOCAST_TOL[dtype])


@contextlib.contextmanager
def guarded(rows, check):
    """A step that raises becomes a FAIL row (the table is always printed)."""
    try:
        yield
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        rows.add(check, f'raised {type(err).__name__}: {str(err).splitlines()[0][:160]}', False)


def _demo_cfg(config, data_root, device, amp):
    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(REPO, config))
    sub = 'coco/' if 'maskrcnn' in config else 'seg/'
    cfg.train_dataloader.dataset.data_root = osp.join(data_root, sub)
    cfg.train_dataloader.num_workers = 0
    cfg.optim_wrapper.type = 'AmpOptimWrapper' if amp else 'OptimWrapper'
    if amp:
        cfg.optim_wrapper.loss_scale = 'dynamic'
    return cfg


def train_demo(rows, config, data_root, device, iters, amp):
    """``iters`` optimizer steps of a demo config: (losses, images/s, peak MB)."""
    from mmengine.logging import MMLogger
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DefaultScope
    from mmengine.runner import Runner

    from effbackbones.utils.launch import build_model
    MMLogger.get_instance('effb_gpu_check', log_level='WARNING')  # no line per initialised tensor
    cfg = _demo_cfg(config, data_root, device, amp)
    model = build_model(cfg)
    model.init_weights()
    model.to(device).train()
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope')):
        loader = Runner.build_dataloader(cfg.train_dataloader)
        wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    if device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    losses, images, start = [], 0, None
    warmup = min(WARMUP, iters - 1)
    for i, batch in zip(range(iters), itertools.cycle(loader)):
        if i == warmup:
            if device == 'cuda':
                torch.cuda.synchronize()
            start = time.perf_counter()
        log_vars = model.train_step(batch, wrapper)
        losses.append(float(log_vars['loss']))
        if i >= warmup:
            images += len(batch['inputs'])
    if device == 'cuda':
        torch.cuda.synchronize()
    speed = images / (time.perf_counter() - start)
    peak = (f'{torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MB' if device == 'cuda'
            else 'n/a on the CPU')
    finite = all(math.isfinite(v) for v in losses)
    name = osp.basename(config).replace('.py', '')
    rows.add(f'{name} {iters} iters{" AMP" if amp else ""} ({device})',
             f'loss {losses[0]:.3f} -> {losses[-1]:.3f}, {speed:.1f} images/s, peak memory '
             f'{peak}', finite)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--dry-run', action='store_true',
                   default=os.environ.get('EFFB_GPU_CHECK_DRY_RUN') == '1',
                   help='on the CPU, small (EFFB_GPU_CHECK_DRY_RUN=1)')
    p.add_argument('--iters', type=int, help=f'training iterations per demo (default {ITERS}, '
                                             'dry run 2)')
    p.add_argument('--skip', nargs='*', default=[], choices=['ops', 'parity', 'train'])
    args = p.parse_args(argv)
    device = 'cpu' if args.dry_run else 'cuda'
    if device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit(f'no CUDA GPU visible to torch (torch {torch.__version__}, CUDA build '
                         f'{torch.version.cuda}): run on a GPU machine, or --dry-run on the CPU')
    import effbackbones  # noqa: F401
    rows = Rows()
    where = torch.cuda.get_device_name(0) if device == 'cuda' else 'CPU (dry run)'
    print(f'[gpu_check] {where}; torch {torch.__version__} (CUDA {torch.version.cuda})', flush=True)
    t0 = time.time()
    if 'ops' not in args.skip:
        with guarded(rows, 'mmcv ops'):
            check_mmcv_ops(rows, device)
    if 'parity' not in args.skip:
        check_parity(rows, device, args.dry_run)
    if 'train' not in args.skip:
        from effbackbones.datasets.synthetic import make_shapes_dataset
        with tempfile.TemporaryDirectory() as data_root:
            make_shapes_dataset(data_root, 8 if args.dry_run else 32, 2, (256, 256), seed=0)
            for config in DEMOS:
                with guarded(rows, f'{osp.basename(config)} training ({device})'):
                    train_demo(rows, config, data_root, device,
                               args.iters or (2 if args.dry_run else ITERS), amp=not args.dry_run)
    print(f'\n[gpu_check] summary ({where}, {time.time() - t0:.0f} s)\n{rows.table()}')
    return 1 if rows.failed else 0


if __name__ == '__main__':
    sys.exit(main())
