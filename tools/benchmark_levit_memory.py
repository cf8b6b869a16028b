"""Peak training memory of one LeViT backbone forward/backward at detection size (CPU).

    python tools/benchmark_levit_memory.py                      # 128s, 2x3x800x1344, 3 configs
    python tools/benchmark_levit_memory.py --arch 128s --size 800 1344 --batch 2 \
        --configs naive sdpa sdpa+cp naive+cp

Method: every configuration runs in its own fresh subprocess (``--child``), so one
configuration's allocations cannot hide inside another's high-water mark. The child imports
torch, builds the backbone in train mode with random weights and the input batch, records
``ru_maxrss`` (baseline: interpreter + torch + weights + input), runs
``sum(o.float().mean() for o in backbone(x)).backward()`` once and records ``ru_maxrss`` again
(``resource.getrusage(RUSAGE_SELF)``, the process's peak resident set size, kB on Linux).
The figure reported is the increase, i.e. the peak memory the forward/backward itself needed
(activations saved for backward, attention matrices, bias tensors, gradients). ``tracemalloc``
cannot see torch's allocations, hence RSS. The children run with glibc's
``MALLOC_MMAP_THRESHOLD_=65536`` (unless already set): every block above 64 KiB is mmapped and
returned on free, so the high-water mark follows live tensor bytes rather than heap
fragmentation (without it the figures are ~5-25% higher, same ranking). The parent prints one
markdown table plus the machine, and an analytic table of the eval-mode bias caches. Runs in
about 2 minutes on a 2-core CPU with OMP_NUM_THREADS=2.
"""
import argparse
import json
import os
import os.path as osp
import platform
import subprocess
import sys
import time

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))

CONFIGS = {
    'naive': dict(attn_impl='naive', with_cp=False),
    'sdpa': dict(attn_impl='sdpa', with_cp=False),
    'sdpa+cp': dict(attn_impl='sdpa', with_cp=True),
    'naive+cp': dict(attn_impl='naive', with_cp=True),
    'chunked': dict(attn_impl='chunked', with_cp=False),
    'chunked+cp': dict(attn_impl='chunked', with_cp=True),
}


def _rss_mib():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(args):
    import torch
    sys.path.insert(0, REPO)
    from effbackbones.models.levit import LeViT, _BiasAttention
    if args.chunk_elems:
        _BiasAttention.chunk_elems = args.chunk_elems
    torch.manual_seed(0)
    cfg = CONFIGS[args.child]
    model = LeViT(args.arch, out_indices=(0, 1, 2, 3), **cfg).train()
    x = torch.randn(args.batch, 3, *args.size)
    base = _rss_mib()
    t0 = time.perf_counter()
    outs = model(x)
    loss = sum(o.float().mean() for o in outs)
    loss.backward()
    secs = time.perf_counter() - t0
    peak = _rss_mib()
    # stages[2] (stride 64) is not run for out indices 0-3
    grads_ok = all(p.grad is not None and torch.isfinite(p.grad).all()
                   for n, p in model.named_parameters() if not n.startswith('stages.2.'))
    print(json.dumps(dict(config=args.child, baseline_mib=base, peak_mib=peak,
                          delta_mib=peak - base, seconds=secs, grads_ok=bool(grads_ok),
                          threads=torch.get_num_threads(), torch=torch.__version__)))


def bias_cache_mib(arch, size, out_last=3):
    """Eval-mode memory held by the cached gathered biases ('naive'/'sdpa': one
    (heads, Nq, Nk) float32 tensor per attention for the latest input size; 'chunked' caches
    only the (heads, H, W) tables). Analytic: no forward needed."""
    sys.path.insert(0, REPO)
    from effbackbones.models.levit import LeViT, _BiasAttention
    model = LeViT(arch, out_indices=tuple(range(out_last + 1)))
    hw = (size[0] // 16, size[1] // 16)
    full = tables = 0
    for i, stage in enumerate(model.stages):
        if i + 2 > out_last:
            break
        mods = ([stage.downsample.attn_downsample] if stage.downsample is not None else []) + [
            b.attn for b in stage.blocks]
        for m in mods:
            assert isinstance(m, _BiasAttention)
            heads = m.attention_biases.shape[0]
            q_hw = tuple((s - 1) // m.q_stride + 1 for s in hw)
            full += heads * q_hw[0] * q_hw[1] * hw[0] * hw[1] * 4
            tables += heads * hw[0] * hw[1] * 4
            hw = q_hw
    return full / 2 ** 20, tables / 2 ** 20


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ''
    try:
        with open('/proc/meminfo') as f:
            mem = f'{int(f.readline().split()[1]) / 2 ** 20:.0f} GiB RAM'
    except (OSError, ValueError, IndexError):
        pass
    return f'{cpu}, {os.cpu_count()} logical cores, {mem}, {platform.system()}'


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--arch', default='128s')
    p.add_argument('--size', type=int, nargs=2, default=(800, 1344))
    p.add_argument('--batch', type=int, default=2)
    p.add_argument('--configs', nargs='+', default=['naive', 'sdpa', 'sdpa+cp', 'chunked'],
                   choices=sorted(CONFIGS))
    p.add_argument('--chunk-elems', type=int, default=0,
                   help="score elements per query chunk of attn_impl='chunked' (default: the "
                        "class value, 2**24)")
    p.add_argument('--child', choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    rows = []
    for name in args.configs:
        cmd = [sys.executable, osp.abspath(__file__), '--child', name, '--arch', args.arch,
               '--batch', str(args.batch), '--chunk-elems', str(args.chunk_elems),
               '--size', *map(str, args.size)]
        env = dict(os.environ)
        # glibc: serve every allocation > 64 KiB with its own mmap and give it back on free, so
        # RSS follows live tensor bytes instead of heap fragmentation (set it yourself to override)
        env.setdefault('MALLOC_MMAP_THRESHOLD_', '65536')
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith('{')]
        if res.returncode or not lines:
            print(f'{name}: failed (rc {res.returncode})\n{res.stderr[-2000:]}', file=sys.stderr)
            rows.append(dict(config=name, failed=True))
            continue
        rows.append(json.loads(lines[-1]))
        r = rows[-1]
        print(f'  {name}: +{r["delta_mib"]:.0f} MiB in {r["seconds"]:.1f} s', file=sys.stderr)

    ok = [r for r in rows if not r.get('failed')]
    print(f'LeViT-{args.arch} backbone, train mode, input {args.batch}x3x{args.size[0]}x'
          f'{args.size[1]}, one forward + backward (out indices 0-3)')
    print(f'machine: {machine()}; torch {ok[0]["torch"] if ok else "?"}, '
          f'{ok[0]["threads"] if ok else "?"} threads, '
          f'MALLOC_MMAP_THRESHOLD_={os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")}')
    ref = next((r['delta_mib'] for r in ok if r['config'] == 'naive'), None)
    print('\n| config | peak RSS increase (MiB) | vs naive | process peak RSS (MiB) | time (s) |')
    print('| --- | ---: | ---: | ---: | ---: |')
    for r in rows:
        if r.get('failed'):
            print(f'| {r["config"]} | failed | | | |')
            continue
        rel = f'{r["delta_mib"] / ref:.2f}x' if ref else '-'
        print(f'| {r["config"]} | {r["delta_mib"]:.0f} | {rel} | {r["peak_mib"]:.0f} | '
              f'{r["seconds"]:.1f} |')
    print(f'\nEval-mode bias cache at {args.size[0]}x{args.size[1]} (out indices 0-3, analytic):')
    print('\n| arch | naive / sdpa: gathered biases (MiB) | chunked: tables only (MiB) |')
    print('| --- | ---: | ---: |')
    for arch in ('128s', '128', '192', '256', '384'):
        full, tables = bias_cache_mib(arch, args.size)
        print(f'| {arch} | {full:.0f} | {tables:.1f} |')
    if any(not r.get('grads_ok', True) for r in ok):
        print('WARNING: some gradients were missing or not finite')
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
