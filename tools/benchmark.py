#!/usr/bin/env python
"""Latency of effbackbones backbones in every runtime, on the same weights, side by side in one
process: PyTorch eager, deploy (``switch_to_deploy()``), ``torch.compile`` of the deploy model,
and the deploy model exported to ONNX and run in onnxruntime and OpenVINO, each runtime the
static file tuned for it (``tools/export_onnx.py --runtime``: a file for onnxruntime, one for
OpenVINO).

    python tools/benchmark.py --model SwiftFormer --arch l1 --shape 512 512 --threads 2
    python tools/benchmark.py --model LeViT --arch 128s --shape 800 1344 --runtimes eager onnxruntime
    python tools/benchmark.py --all --shape 224 224 --repeats 20 --out docs/benchmarks/<machine>.md
    python tools/benchmark.py --model SwiftFormer --device cuda --dtype float16   # eager / deploy / compile
    python tools/benchmark.py --model SwiftFormer --arch l1 --dtype bfloat16 --threads 2

For every variant: one model with random weights (BN statistics randomised so folding is not
trivial), then copies: eager, deploy, plus family-specific alternatives (e.g. LeViT ``attn_impl``)
when the class declares them in ``benchmark_variants`` (skip with ``--no-alternatives``), then
the runtimes. Runs are interleaved so drifting clocks hit all alike: in each round every
variant, in a new random order, gets a turn after ``--pause-ms`` idle, one untimed call and
``--burst`` timed calls back to back (steady-state latency, as a runtime serving a stream of
images runs; ``--burst 1`` times only calls that follow the idle pause, which is slower for
every runtime); reported: median
and p90 of per-call wall time (the runtimes' numpy conversions included), the speed-up over
eager, the max abs difference of the outputs to eager relative to max|eager|, and the share of
the machine's peak: ``2 * MACs / latency`` over the best rate of a large matrix multiply in
``--dtype`` that PyTorch or one of the timed ONNX runtimes reaches in this process with the
same threads, measured at start and after each model (MACs counted as
tools/get_flops.py counts them, on the eager model). A runtime that fails to build or run (e.g.
``torch.compile`` without a working compiler) is reported in its row, not fatal.

``--dtype bfloat16`` on the CPU: eager / deploy / compile run the model converted to bfloat16;
OpenVINO runs the float32 ONNX file with bfloat16 inference (``RuntimeSession(...,
precision='bfloat16')``, CPUs with native bf16 only: elsewhere its row says why it did not run),
fed the same bfloat16-rounded input as float32; onnxruntime has no bfloat16 CPU execution and
its row says so. ``max rel diff`` is then to eager *bfloat16*; an extra last column gives each
runtime's max abs difference to the float32 eager model on that input, relative to its max (what
a user comparing with the float32 model sees).
"""
import argparse
import copy
import os
import os.path as osp
import platform
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import torch  # noqa: E402

from effbackbones.deploy.contract import BACKENDS  # noqa: E402

#: PyTorch forms, then every ONNX runtime (each runs the static file exported for it)
RUNTIMES = ('eager', 'deploy', 'compile') + BACKENDS
#: opt-in columns on the OpenVINO-tuned float32 file's weights: that file with bfloat16
#: inference, the NNCF INT8 quantization of those weights' graph for int8 kernels
#: (effbackbones.deploy.quantize; docs/int8.md) with the layers left in float run in float32
#: (what a CPU without native bf16 does) or in bfloat16 (OpenVINO's default on CPUs with AMX /
#: AVX512-BF16)
LOW_PRECISION = ('openvino-bf16', 'openvino-int8', 'openvino-int8-bf16')
INT8_COLUMNS = {'openvino-int8': 'float32', 'openvino-int8-bf16': 'bfloat16'}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='latency of eager / deploy / compile / ONNX runtimes')
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument('--model', help='backbone class name, e.g. SwiftFormer')
    g.add_argument('--all', action='store_true', help='every registered backbone variant')
    p.add_argument('--arch', help='variant (with --model); default: all of the model')
    p.add_argument('--shape', type=int, nargs=2, default=[224, 224], metavar=('H', 'W'))
    p.add_argument('--batch', type=int, default=1)
    p.add_argument('--repeats', type=int, default=20,
                   help='timed calls per runtime (in bursts of --burst)')
    p.add_argument('--burst', type=int, default=5,
                   help='back-to-back timed calls per runtime and round (after one untimed '
                        'call): steady-state latency, as a runtime serving a stream runs; 1 = '
                        'every timed call after --pause-ms idle')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--device', default='cpu')
    p.add_argument('--dtype', default='float32', choices=['float32', 'float16', 'bfloat16'])
    p.add_argument('--threads', type=int, default=None,
                   help='CPU threads of torch and of the runtimes')
    p.add_argument('--runtimes', nargs='+', choices=RUNTIMES + LOW_PRECISION,
                   default=list(RUNTIMES),
                   help='columns to measure (eager is always measured: the baseline); '
                        'openvino-bf16 / openvino-int8 (float32 runs only): the OpenVINO file '
                        'in bfloat16 / quantized to INT8 by NNCF, next to openvino; '
                        'openvino-int8-bf16: the INT8 file, its float layers in bfloat16')
    p.add_argument('--no-alternatives', action='store_true',
                   help="skip the family's alternative implementations (benchmark_variants)")
    p.add_argument('--pause-ms', type=float, default=200,
                   help="idle time before each runtime's turn (lets the previous runtime's "
                        'spinning worker threads stop)')
    p.add_argument('--out', help='append the markdown table to this file')
    return p.parse_args(argv)


def randomise_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


def _as_tuple(outs):
    return tuple(outs) if isinstance(outs, (list, tuple)) else (outs,)


def build_variants(cls, arch, x, runtimes=RUNTIMES, alternatives=True, threads=None,
                   tmpdir=None):
    """``[(name, callable or None, error or None)]``: eager first (the baseline)."""
    torch.manual_seed(0)
    base = cls(arch=arch)
    randomise_bn(base)
    base.eval()
    variants = [('eager', base, None)]
    # deploy as it is meant to run: folded, and the attention biases of this size pinned
    dep = copy.deepcopy(base).switch_to_deploy(input_size=tuple(x.shape[2:]))
    if 'deploy' in runtimes:
        variants.append(('deploy', dep, None))
    if alternatives:
        for name, kwargs in getattr(cls, 'benchmark_variants', {}).items():
            alt = cls(arch=arch, **kwargs)
            alt.load_state_dict(base.state_dict(), strict=False)
            alt.eval()
            variants.append((name, alt, None))
            variants.append((name + '+deploy', copy.deepcopy(alt).switch_to_deploy(
                input_size=tuple(x.shape[2:])), None))
    if 'compile' in runtimes:
        try:
            variants.append(('torch.compile', torch.compile(copy.deepcopy(dep)), None))
        except Exception as exc:     # noqa: BLE001 - reported in the table
            variants.append(('torch.compile', None, f'failed: {_short(exc)}'))
    onnx_runtimes = [r for r in BACKENDS if r in runtimes]
    if onnx_runtimes and x.device.type == 'cpu' and x.dtype in (torch.float32, torch.bfloat16):
        from effbackbones.deploy import RuntimeSession, export_module, exportable_part
        precision = 'bfloat16' if x.dtype == torch.bfloat16 else 'float32'
        tmpdir = tmpdir or tempfile.mkdtemp()
        for rt in onnx_runtimes:
            # each runtime runs the static file tuned for it (export_onnx.py --runtime)
            path = osp.join(tmpdir, f'{cls.__name__}_{arch}_{rt}.onnx')
            try:
                # the file is float32 in any case (bfloat16 is an inference setting of OpenVINO)
                export_module(exportable_part(copy.deepcopy(dep)), x.float(), path, runtime=rt)
            except Exception as exc:     # noqa: BLE001
                variants.append((rt, None, f'export failed: {_short(exc)}'))
                continue
            try:
                # onnxruntime's default spinning, as deployed: the pause before each turn
                # lets its threads stop before the next variant runs (measured: eager times
                # the same after an onnxruntime burst as after idling)
                variants.append((rt, RuntimeSession(path, rt, threads=threads,
                                                    precision=precision), None))
            except ValueError as exc:
                # a precision this runtime / CPU cannot run: the session says why
                variants.append((rt, None, f'not run: {str(exc).splitlines()[0]}'))
            except Exception as exc:     # noqa: BLE001
                variants.append((rt, None, f'failed: {_short(exc)}'))
    low = [r for r in LOW_PRECISION if r in runtimes]
    if low and x.device.type == 'cpu' and x.dtype == torch.float32:
        variants += low_precision_variants(cls, arch, dep, x, low, threads,
                                           tmpdir or tempfile.mkdtemp())
    return variants


def low_precision_variants(cls, arch, dep, x, runtimes, threads, tmpdir):
    """The OpenVINO-tuned float32 file of ``dep`` run with bfloat16 inference, and its graph for
    int8 kernels (``form='int8'``) quantized to INT8 (NNCF, the family's recipe), calibrated on
    8 random inputs drawn like the timed one (their scales then fit it, so the rel diff column
    means something), for this CPU's int8 kernels (``cpu_int8_kind``: the overflow fix where it
    has no VNNI)."""
    from effbackbones.deploy.contract import cpu_int8_kind
    from effbackbones.deploy.export import BackboneMaps, export_module
    from effbackbones.deploy.quantize import quantize_file, recipe_for
    from effbackbones.deploy.runtime import RuntimeSession
    path = osp.join(tmpdir, f'{cls.__name__}_{arch}_openvino.onnx')
    out = []
    try:
        if not osp.isfile(path):
            export_module(BackboneMaps(copy.deepcopy(dep)), x, path, runtime='openvino')
        if set(INT8_COLUMNS) & set(runtimes):
            int8_form = osp.join(tmpdir, f'{cls.__name__}_{arch}_openvino_int8_form.onnx')
            export_module(BackboneMaps(copy.deepcopy(dep)), x, int8_form, runtime='openvino',
                          form='int8')
            g = torch.Generator().manual_seed(1)
            calib = [torch.randn(x.shape, generator=g) for _ in range(8)]
            int8 = quantize_file(int8_form, osp.join(tmpdir, f'{cls.__name__}_{arch}_int8.xml'),
                                 calib, recipe_for(dep), cpu=cpu_int8_kind() or 'vnni')
    except Exception as exc:     # noqa: BLE001 - reported in the table
        return [(rt, None, f'failed: {_short(exc)}') for rt in runtimes]
    for rt in runtimes:
        try:
            if rt == 'openvino-bf16':
                out.append((rt, RuntimeSession(path, 'openvino', threads=threads,
                                               precision='bfloat16'), None))
            else:
                out.append((rt, RuntimeSession(int8, 'openvino', threads=threads,
                                               precision=INT8_COLUMNS[rt]), None))
        except ValueError as exc:
            out.append((rt, None, f'not run: {str(exc).splitlines()[0]}'))
    return out


def _short(exc):
    msg = str(exc).strip().splitlines()
    return f'{type(exc).__name__}: {msg[0][:120] if msg else ""}'


def _sync(device):
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def reference_outputs(model, x):
    """The outputs of ``model`` (float32) on ``x`` converted to float32, flattened into one
    vector: the float32 baseline of a reduced-precision run."""
    with torch.inference_mode():
        outs = _as_tuple(model.to(device=x.device, dtype=torch.float32)(x.float()))
    return torch.cat([o.float().flatten() for o in outs])


def _rel_diff(out, ref):
    return (out - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)


def time_variants(variants, x, repeats, warmup, device, dtype, pause=0.2, burst=1,
                  ref32=None):
    """Warm every variant up (failures recorded), then time them interleaved: rounds in
    which each variant (in a new random order), after ``pause`` idle, makes ``burst`` timed
    calls back to back (with ``burst > 1`` one untimed call first, so a burst times the steady
    state). Returns the times, each variant's max rel diff to the first (eager), its max rel
    diff to ``ref32`` (:func:`reference_outputs`; empty without it) and the errors."""
    times, diffs, diffs32, errors = {}, {}, {}, {}
    ref = None
    runnable = []
    with torch.inference_mode():
        for n, m, err in variants:
            if err is not None:
                errors[n] = err
                continue
            try:
                if isinstance(m, torch.nn.Module):
                    m.to(device=device, dtype=dtype)
                for _ in range(warmup):
                    outs = _as_tuple(m(x))
                _sync(device)
            except Exception as exc:     # noqa: BLE001 - reported in the table
                errors[n] = f'failed: {_short(exc)}'
                continue
            out = torch.cat([o.float().flatten() for o in outs])
            if ref is None:
                ref = out
            diffs[n] = _rel_diff(out, ref)
            if ref32 is not None:
                diffs32[n] = _rel_diff(out, ref32)
            times[n] = []
            runnable.append((n, m))
        order_rng = random.Random(0)
        while any(len(t) < repeats for t in times.values()):
            # a new order every round: no variant always follows the same one
            for n, m in order_rng.sample(runnable, len(runnable)):
                # a pause first: the previous runtime's worker threads spin a while after a
                # run, and would take the cores of the variant timed next
                time.sleep(pause)
                if burst > 1:
                    m(x)
                for _ in range(min(burst, repeats - len(times[n]))):
                    _sync(device)
                    t = time.perf_counter()
                    m(x)
                    _sync(device)
                    times[n].append(time.perf_counter() - t)
    return times, diffs, diffs32, errors


def gemm_rate(device='cpu', dtype=torch.float32, n=2048, repeats=10, budget_s=1.0):
    """PyTorch's matrix-multiply rate in ``dtype`` (FLOP/s, 2 n^3 per product; best of
    ``repeats`` after a warm-up), one candidate for the peak the % column refers to. ``n``
    shrinks (a multiple of 64, at least 256) so one product takes about ``budget_s`` at the rate
    of a 256 probe: a dtype the CPU only emulates (bfloat16 without native support: ~1 GFLOP/s on
    an AVX2 CPU) would otherwise take minutes at 2048."""

    def product_times(size, count):
        """Times of ``count`` products of the same two ``size x size`` matrices."""
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        times = []
        for _ in range(count):
            _sync(device)
            t = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            times.append(time.perf_counter() - t)
        return times

    with torch.inference_mode():
        probe = 2 * 256 ** 3 / product_times(256, 2)[1]
        n = min(n, max(256, int((probe * budget_s / 2) ** (1 / 3)) // 64 * 64))
        best = min(product_times(n, repeats + 2)[2:])
    return 2 * n ** 3 / best


def runtime_gemm_rates(runtimes, threads, precision, tmpdir, n=2048, repeats=10):
    """``{runtime: FLOP/s}``: an ``n x n`` matrix multiply (a float32 ONNX ``MatMul``, second
    operand a constant as a layer's weights) in each ONNX runtime of ``runtimes`` that runs
    ``precision`` (:class:`RuntimeSession`; best of ``repeats`` after a warm-up). The
    machine's peak is the best rate any of its libraries reaches: PyTorch's BLAS alone can be
    far below it (MKL on an AMD EPYC with AVX-512: 202 GFLOP/s, onnxruntime 438, OpenVINO 420;
    docs/benchmarks/amd-epyc-avx512.md), and a % of peak above 100 says nothing."""
    names = [r for r in BACKENDS if r in runtimes]
    if not names:
        return {}
    from effbackbones.deploy.runtime import RuntimeSession
    path = osp.join(tmpdir, f'gemm_{n}.onnx')
    if not osp.isfile(path):     # measured again after each model: one file per run
        import numpy as np
        import onnx
        from onnx import TensorProto, helper, numpy_helper
        rng = np.random.default_rng(0)
        weight = numpy_helper.from_array(rng.standard_normal((n, n), dtype=np.float32), 'weight')
        graph = helper.make_graph(
            [helper.make_node('MatMul', ['a', 'weight'], ['out'])], 'gemm',
            [helper.make_tensor_value_info('a', TensorProto.FLOAT, [n, n])],
            [helper.make_tensor_value_info('out', TensorProto.FLOAT, [n, n])], [weight])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)]), path)
    a = torch.randn(n, n)
    rates = {}
    for name in names:
        try:
            session = RuntimeSession(path, name, threads=threads, precision=precision)
        except ValueError:
            continue     # a precision this runtime / CPU does not run: no rate
        times = []
        for _ in range(repeats + 1):
            t = time.perf_counter()
            session(a)
            times.append(time.perf_counter() - t)
        rates[name] = 2 * n ** 3 / min(times[1:])
    return rates


#: CPU flags (``/proc/cpuinfo``) -> what the header calls them, widest first: the runtimes'
#: kernels (and whether bfloat16 is native) depend on them, so a table names them
CPU_FEATURES = (('amx_tile', 'AMX'), ('avx512_bf16', 'AVX512-BF16'), ('avx512f', 'AVX-512'),
                ('avx2', 'AVX2'))


def cpu_description(cpuinfo='/proc/cpuinfo'):
    """``'<model name> (<features>)'`` from ``cpuinfo``, e.g. ``'AMD EPYC (AVX512-BF16,
    AVX-512, AVX2)'``; the platform's processor string where there is no such file."""
    try:
        with open(cpuinfo) as f:
            fields = dict(line.split(':', 1) for line in f.read().split('\n\n')[0].splitlines()
                          if ':' in line)
    except OSError:
        return platform.processor() or platform.machine()
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get('flags', '').split())
    name = fields.get('model name') or platform.processor() or platform.machine()
    features = [label for flag, label in CPU_FEATURES if flag in flags]
    description = f'{name} ({", ".join(features)})' if features else name
    # oneDNN (OpenVINO's and PyTorch's kernels) honours this cap: the figures are then those of
    # a lesser CPU emulated on this one (docs/benchmarks/README.md), which the header must say
    cap = os.environ.get('ONEDNN_MAX_CPU_ISA')
    return f'{description}, oneDNN capped to {cap} (ONEDNN_MAX_CPU_ISA)' if cap else description


def machine_gemm_rates(args, dtype, tmpdir):
    """PyTorch's :func:`gemm_rate` and, on the CPU, :func:`runtime_gemm_rates` of the runtimes
    this run times: ``{library: FLOP/s}``."""
    rates = {'torch': gemm_rate(args.device, dtype)}
    if args.device == 'cpu' and dtype in (torch.float32, torch.bfloat16):
        rates.update(runtime_gemm_rates(args.runtimes, args.threads, str(dtype).split('.')[-1],
                                        tmpdir))
    return rates


def model_macs(model, x):
    """Multiply-adds of one forward (mmengine's FlopAnalyzer, the fvcore convention of
    tools/get_flops.py); ``None`` if it cannot count the model."""
    sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
    try:
        from get_flops import count
        return count(copy.deepcopy(model).float().cpu(), (x.float().cpu(),))[0]
    except Exception:     # noqa: BLE001 - the column then reads n/a
        return None


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from effbackbones.models import backbone_class, backbone_classes
    if args.all:
        jobs = [(cls, a) for cls in backbone_classes().values() for a in cls.arch_zoo]
    else:
        try:
            cls = backbone_class(args.model)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        jobs = [(cls, a) for a in ([args.arch] if args.arch else list(cls.arch_zoo))]
    dtype = getattr(torch, args.dtype)
    h, w = args.shape
    threads = torch.get_num_threads()
    machine = (f'{cpu_description()}, {threads} thread{"s" if threads > 1 else ""}'
               if args.device == 'cpu' else torch.cuda.get_device_name())
    tmpdir = tempfile.TemporaryDirectory()
    rates = machine_gemm_rates(args, dtype, tmpdir.name)
    peak = max(rates.values())
    versions = [f'torch {torch.__version__}']
    for mod in BACKENDS + ('nncf',):  # each runtime's Python package has its name
        if any(r.split('-')[0] == mod for r in args.runtimes) or \
                (mod == 'nncf' and set(INT8_COLUMNS) & set(args.runtimes)):
            try:
                versions.append(f'{mod} {__import__(mod).__version__}')
            except ImportError:
                versions.append(f'{mod} not installed')
    header = (f'backbone latency, input {args.batch}x3x{h}x{w}, {args.dtype}, {args.device} '
              f'({machine}), {", ".join(versions)}, median of {args.repeats} (p90), interleaved'
              f'{f" in bursts of {args.burst} back-to-back calls" if args.burst > 1 else ""}; '
              f'{args.dtype} GEMM rate {peak / 1e9:.0f} GFLOP/s (best of '
              f'{", ".join(f"{k} {v / 1e9:.0f}" for k, v in rates.items())}); '
              f'load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; '
              f'max rel diff: max|out - eager| / max|eager|, eager in {args.dtype}')
    reduced = dtype != torch.float32
    if reduced:
        header += (f'; to float32 eager: the same against the float32 eager model on the same '
                   f'({args.dtype}-rounded) input')
        if args.device == 'cpu' and dtype == torch.bfloat16:
            header += ('; openvino: the float32 ONNX file with bfloat16 inference '
                       '(INFERENCE_PRECISION_HINT bf16)')
    columns = ['model', 'arch', 'runtime', 'median ms', 'p90 ms', 'vs eager', '% of GEMM peak',
               'max rel diff'] + (['max rel diff to float32 eager'] if reduced else [])
    empty = ' |' * (len(columns) - 4)
    lines = [header, '', '| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
    print(header, flush=True)
    with tmpdir:
        for cls, arch in jobs:
            x = torch.randn(args.batch, 3, h, w, device=args.device, dtype=dtype)
            variants = build_variants(cls, arch, x, args.runtimes, not args.no_alternatives,
                                      args.threads, tmpdir.name)
            macs = model_macs(variants[0][1], x)
            # before time_variants converts the eager model to the dtype
            ref32 = reference_outputs(variants[0][1], x) if reduced else None
            times, diffs, diffs32, errors = time_variants(
                variants, x, args.repeats, args.warmup, args.device, dtype,
                args.pause_ms / 1e3, args.burst, ref32)
            # the best GEMM rate seen (before and after each model): on a shared machine one
            # measurement can land in a busy moment
            peak = max(peak, *machine_gemm_rates(args, dtype, tmpdir.name).values())
            eager = statistics.median(times['eager'])
            lines.append(f'| (GEMM peak so far: {peak / 1e9:.0f} GFLOP/s) |' + ' |' * (
                len(columns) - 1))
            for n, _, _ in variants:
                if n in errors:
                    row = f'| {cls.__name__} | {arch} | {n} | {errors[n]} |{empty}'
                else:
                    med = statistics.median(times[n])
                    p90 = sorted(times[n])[max(0, int(0.9 * len(times[n])) - 1)]
                    pct = f'{100 * 2 * macs / med / peak:.1f}%' if macs else 'n/a'
                    row = (f'| {cls.__name__} | {arch} | {n} | {med * 1e3:.2f} | '
                           f'{p90 * 1e3:.2f} | {eager / med:.2f}x | {pct} | {diffs[n]:.1e} |')
                    if reduced:
                        row += f' {diffs32[n]:.1e} |'
                lines.append(row)
                print(row, flush=True)
    if args.out:
        with open(args.out, 'a') as f:
            f.write('\n'.join(lines) + '\n\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
