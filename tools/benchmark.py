#!/usr/bin/env python
"""Latency of effbackbones backbones: eager vs deploy (and other implementations present), on
the same weights, side by side in one process.

    python tools/benchmark.py --model SwiftFormer --arch l1 --shape 512 512 --batch 1
    python tools/benchmark.py --all --shape 224 224 --repeats 20 --out docs/benchmark_cpu.md
    python tools/benchmark.py --model SwiftFormer --device cuda --dtype float16

For every variant: one model with random weights (BN statistics randomised so folding is not
trivial), then copies: eager, deploy (``switch_to_deploy()``), plus family-specific alternatives
(e.g. LeViT ``attn_impl``, EfficientFormer ``bias_mode``) when the class declares them in
``benchmark_variants``. Runs are interleaved round-robin so drifting clocks hit all alike;
reported: median and p90 of per-call wall time, and the ratio to eager. The max abs difference
of each variant's outputs to eager is printed too (deploy must match).
"""
import argparse
import copy
import os.path as osp
import platform
import statistics
import sys
import time

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import torch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='eager vs deploy latency')
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument('--model', help='backbone class name, e.g. SwiftFormer')
    g.add_argument('--all', action='store_true', help='every registered backbone variant')
    p.add_argument('--arch', help='variant (with --model); default: all of the model')
    p.add_argument('--shape', type=int, nargs=2, default=[224, 224], metavar=('H', 'W'))
    p.add_argument('--batch', type=int, default=1)
    p.add_argument('--repeats', type=int, default=20)
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--device', default='cpu')
    p.add_argument('--dtype', default='float32', choices=['float32', 'float16', 'bfloat16'])
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    p.add_argument('--out', help='append the markdown table to this file')
    return p.parse_args(argv)


def _randomise_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


def build_variants(cls, arch):
    torch.manual_seed(0)
    base = cls(arch=arch)
    _randomise_bn(base)
    base.eval()
    variants = [('eager', base)]
    dep = copy.deepcopy(base).switch_to_deploy()
    variants.append(('deploy', dep))
    for name, kwargs in getattr(cls, 'benchmark_variants', {}).items():
        alt = cls(arch=arch, **kwargs)
        alt.load_state_dict(base.state_dict(), strict=False)
        alt.eval()
        variants.append((name, alt))
        variants.append((name + '+deploy', copy.deepcopy(alt).switch_to_deploy()))
    return variants


def _sync(device):
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def time_variants(variants, x, repeats, warmup, device, dtype):
    times = {n: [] for n, _ in variants}
    ref = None
    diffs = {}
    with torch.inference_mode():
        for n, m in variants:
            m.to(device=device, dtype=dtype)
            for _ in range(warmup):
                outs = m(x)
            _sync(device)
            out = torch.cat([o.float().flatten() for o in outs])
            if ref is None:
                ref = out
            diffs[n] = (out - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)
        for _ in range(repeats):
            for n, m in variants:
                _sync(device)
                t = time.perf_counter()
                m(x)
                _sync(device)
                times[n].append(time.perf_counter() - t)
    return times, diffs


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import effbackbones  # noqa: F401
    from effbackbones.registry import MODELS
    if args.all:
        jobs = [(cls, a) for _, cls in sorted(MODELS.module_dict.items())
                if getattr(cls, 'arch_zoo', None) for a in cls.arch_zoo]
    else:
        cls = MODELS.get(args.model)
        if cls is None:
            raise SystemExit(f'unknown model {args.model!r}; known: {sorted(MODELS.module_dict)}')
        jobs = [(cls, a) for a in ([args.arch] if args.arch else list(cls.arch_zoo))]
    dtype = getattr(torch, args.dtype)
    h, w = args.shape
    machine = (f'{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads'
               if args.device == 'cpu' else torch.cuda.get_device_name())
    header = (f'backbone latency, input {args.batch}x3x{h}x{w}, {args.dtype}, {args.device} '
              f'({machine}), torch {torch.__version__}, median of {args.repeats} '
              f'(p90 in brackets), interleaved runs')
    lines = [header, '', '| model | arch | variant | median ms | p90 ms | vs eager | '
             'max rel diff |', '|---|---|---|---|---|---|---|']
    print(header)
    for cls, arch in jobs:
        variants = build_variants(cls, arch)
        x = torch.randn(args.batch, 3, h, w, device=args.device, dtype=dtype)
        times, diffs = time_variants(variants, x, args.repeats, args.warmup, args.device, dtype)
        eager = statistics.median(times['eager'])
        for n, _ in variants:
            med = statistics.median(times[n])
            p90 = sorted(times[n])[max(0, int(0.9 * len(times[n])) - 1)]
            row = (f'| {cls.__name__} | {arch} | {n} | {med * 1e3:.2f} | {p90 * 1e3:.2f} | '
                   f'{eager / med:.2f}x | {diffs[n]:.1e} |')
            lines.append(row)
            print(row, flush=True)
    if args.out:
        with open(args.out, 'a') as f:
            f.write('\n'.join(lines) + '\n\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
