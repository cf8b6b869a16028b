#!/usr/bin/env python
"""Where the float32 time of a backbone goes, per stage: PyTorch eager and the float32 ONNX
files in OpenVINO / onnxruntime, side by side with each stage's multiply-adds and the share of
the machine's float32 GEMM peak that the stage reaches.

    python tools/profile_stages.py --model EfficientFormer --arch l1 --shape 512 512 --threads 2
    python tools/profile_stages.py --model MobileFormer --arch 294m --shape 512 512 --threads 2 \\
        --runtimes eager openvino onnxruntime --repeats 10 --out docs/benchmarks/<machine>.md

The stages are the backbone's own ``stage_groups()`` (the units ``frozen_stages`` freezes: the
stem, then each stage with its downsampling and its output norm; Mobile-Former: the blocks of
each output stride, the bridges inside them), found by one rule in every runtime:

* MACs: mmengine's ``FlopAnalyzer.by_module()`` on the eager model (tools/get_flops.py's count,
  one multiply-add = one FLOP), summed over each stage's modules;
* eager (the plain eval model, the ``eager`` column of tools/benchmark.py): forward pre-hooks on
  the stages' modules stamp ``time.perf_counter()``; the time from a stage's first module
  starting to the next stage's starting is that stage's (the glue between them included);
* OpenVINO / onnxruntime: the static float32 file tuned for that runtime (exported as
  tools/benchmark.py exports it), compiled with per-node profiling (OpenVINO ``PERF_COUNT``,
  ``real_time`` of the EXECUTED nodes; onnxruntime ``enable_profiling``, the nodes'
  ``kernel_time``); a node belongs to the stage whose ONNX scope (``/model/stages.0/...``) its
  name starts with (:func:`assign_stages`).

Each row is the median over ``--repeats`` runs; ``total`` is the sum of the rows, ``whole call``
the median wall time of a call (the runtime's own overhead and the numpy conversions included).
``% peak`` is ``2 * MACs / time`` over the best float32 matrix-multiply rate that PyTorch or a
profiled runtime reaches here with the same threads (tools/benchmark.py's ``gemm_rate`` /
``runtime_gemm_rates``). After the table: the ten slowest layers of each runtime with their op
type (OpenVINO: node type / kernel, e.g. ``Convolution / brgconv_avx512_1x1_f32``; eager: leaf
modules timed by hooks in separate runs).
"""
import argparse
import copy
import json
import os
import os.path as osp
import statistics
import sys
import tempfile
import time

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

import torch  # noqa: E402

from benchmark import (randomise_bn, cpu_description, gemm_rate,  # noqa: E402
                       runtime_gemm_rates)
from effbackbones.deploy.contract import BACKENDS  # noqa: E402

RUNTIMES = ('eager',) + BACKENDS
#: the row of the nodes no stage holds: reorders of the graph's input / outputs, the export
#: wrapper's own ops, anything before the first stage
OTHER = 'other (layout / outputs)'
#: the export wrapper's attribute holding the backbone (``BackboneMaps.model``): the scope of
#: the backbone's nodes in the ONNX graph
ROOT = '/model/'


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='per-stage time of eager / OpenVINO / onnxruntime')
    p.add_argument('--model', required=True, help='backbone class name, e.g. EfficientFormer')
    p.add_argument('--arch', required=True, help='variant, e.g. l1')
    p.add_argument('--shape', type=int, nargs=2, default=[512, 512], metavar=('H', 'W'))
    p.add_argument('--threads', type=int, default=None,
                   help='CPU threads of torch and of the runtimes')
    p.add_argument('--runtimes', nargs='+', choices=RUNTIMES, default=list(RUNTIMES))
    p.add_argument('--repeats', type=int, default=10, help='profiled runs per runtime')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--top', type=int, default=10, help='slowest layers listed per runtime')
    p.add_argument('--gemm-size', type=int, default=2048,
                   help='side of the matrix multiply that measures the GEMM peak')
    p.add_argument('--out', help='append the tables to this file')
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------
# the stages and the names of their nodes
# --------------------------------------------------------------------------------------------
def called_modules(model, x):
    """The qualified names of the modules of ``model`` that a forward on ``x`` calls (a
    container the forward only indexes, as ``stages[i]``, is not called)."""
    called, handles = set(), []
    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(lambda mod, args, n=name: called.add(n)))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return called


def stage_modules(backbone, called):
    """``[(label, [qualified module names])]`` of ``backbone.stage_groups()``: ``stem``, then
    ``stage 0``, ``stage 1``..., each with the modules a forward calls (``called``; a group none
    of whose modules runs, e.g. a stage after the last of ``out_indices``, is left out)."""
    names = {id(m): n for n, m in backbone.named_modules()}
    out = []
    for i, group in enumerate(backbone.stage_groups()):
        qualnames = [names[id(m)] for m in group if names[id(m)] in called]
        if qualnames:
            out.append(('stem' if i == 0 else f'stage {i - 1}', qualnames))
    return out


def onnx_scope(qualname, called, root=ROOT):
    """The prefix of the ONNX node names of the module ``qualname`` (TorchScript exporter):
    one part per module on the way that is called (``called``), the attribute's name, or for a
    container's item ``<container>.<index>``: ``stages.0.blocks.1`` (``stages`` and ``blocks``
    only indexed) -> ``/model/stages.0/blocks.1/``; ``features.2`` (``features`` called) ->
    ``/model/features/features.2/``."""
    parts, scope = qualname.split('.'), []
    for i, p in enumerate(parts):
        if '.'.join(parts[:i + 1]) in called:
            scope.append(f'{parts[i - 1]}.{p}' if p.isdigit() and i else p)
    return root + '/'.join(scope) + '/'


def scopes_of(stages, called, root=ROOT):
    """One list of ONNX scopes (:func:`onnx_scope`) per stage."""
    return [[onnx_scope(q, called, root) for q in qs] for _, qs in stages]


def compact(qualnames):
    """``['features.1', 'features.2', 'features.3']`` -> ``'features.1-3'``; others joined."""
    out, run = [], None
    for q in qualnames + [None]:
        head, _, idx = (q or '').rpartition('.')
        if run and q and idx.isdigit() and head == run[0] and int(idx) == run[2] + 1:
            run[2] = int(idx)
            continue
        if run:
            out.append(f'{run[0]}.{run[1]}' + (f'-{run[2]}' if run[2] > run[1] else ''))
            run = None
        if q and idx.isdigit():
            run = [head, int(idx), int(idx)]
        elif q:
            out.append(q)
    return ', '.join(out)


#: op types that only move data between layouts (OpenVINO, onnxruntime's NCHWc reorders)
LAYOUT_OPS = ('Reorder', 'ReorderInput', 'ReorderOutput', 'Transpose', 'Reshape')


def assign_stages(nodes, scopes, io_names=(), root=ROOT):
    """The stage index of each node (``None``: the ``other`` row); ``nodes``: ``(name, op
    type)`` in execution order (OpenVINO's type: ``'Reorder / jit_uni_f32'``), ``scopes``: one
    list of name prefixes per stage (:func:`scopes_of`).

    A name under a stage's scope is that stage's (the longest scope wins). ``None``: a layout
    op named after a graph input / output (OpenVINO's reorders ``<io name>_<layouts>_<next>``),
    a node of the export wrapper outside the backbone's ``root`` (``/Transpose_1``: the maps
    handed over channels-first) and anything before the first stage. Any other node (named by
    a runtime's graph transformation: ``MVN_811``, ``Gelu_token_4``; the backbone's glue
    between stages: ``/model/Transpose``; an output's producer, named after it) belongs to the
    stage running: that of the last node matched before it."""
    flat = sorted(((s, i) for i, ss in enumerate(scopes) for s in ss), key=lambda t: -len(t[0]))
    current, out = None, []
    for name, kind in nodes:
        stage = next((i for s, i in flat if name.startswith(s) or name == s[:-1]), None)
        if stage is not None:
            current = stage
        elif kind.split(' /')[0] in LAYOUT_OPS and any(
                name == io or name.startswith((io + '_', io + '/')) for io in io_names):
            stage = None
        elif name.startswith('/') and not name.startswith(root):
            stage = None
        else:
            stage = current
        out.append(stage)
    return out


# --------------------------------------------------------------------------------------------
# MACs and eager times
# --------------------------------------------------------------------------------------------
def stage_macs(model, x, stages):
    """``([MACs per stage], total MACs)`` of one forward (FlopAnalyzer, as tools/get_flops.py
    counts: the rest of the total is outside every stage)."""
    from get_flops import flop_analyzer
    model = copy.deepcopy(model).float().eval()
    with torch.no_grad():
        counts = flop_analyzer(model, (x,)).by_module()
    return [sum(counts.get(q, 0) for q in qs) for _, qs in stages], counts['']


def _eager_runs(model, x, hooked, repeats, warmup):
    """Run ``model`` ``warmup + repeats`` times with a pre-hook stamping ``(time, key)`` on each
    module of ``hooked`` (``{module: key}``); returns per timed run ``(start, stamps, end)``."""
    stamps = []
    handles = [m.register_forward_pre_hook(
        lambda mod, args, key=key: stamps.append((time.perf_counter(), key)))
        for m, key in hooked.items()]
    runs = []
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                stamps.clear()
                start = time.perf_counter()
                model(x)
                end = time.perf_counter()
                if i >= warmup:
                    runs.append((start, list(stamps), end))
    finally:
        for h in handles:
            h.remove()
    return runs


def time_eager(model, x, stages, repeats, warmup):
    """Per timed run ``({stage index or None: seconds}, wall seconds)``: each stage from its
    first module's start to the next stage's start (:func:`_eager_runs`)."""
    modules = dict(model.named_modules())
    hooked = {modules[q]: i for i, (_, qs) in enumerate(stages) for q in qs}
    out = []
    for start, stamps, end in _eager_runs(model, x, hooked, repeats, warmup):
        times, prev, key = {}, start, None
        for t, k in stamps + [(end, None)]:
            times[key] = times.get(key, 0.0) + t - prev
            prev, key = t, k
        out.append((times, end - start))
    return out


def eager_layers(model, x, repeats, warmup):
    """``{qualified name: (type, [seconds per run])}`` of every leaf module, each timed by a
    pre- and a post-hook (separate runs: the hooks of every layer slow the model down)."""
    leaves = {m: n for n, m in model.named_modules() if n and not list(m.children())}
    acc, layers = {}, {n: (type(m).__name__, []) for m, n in leaves.items()}
    begin = {}
    handles = []
    for m, n in leaves.items():
        handles.append(m.register_forward_pre_hook(
            lambda mod, args, n=n: begin.__setitem__(n, time.perf_counter())))
        handles.append(m.register_forward_hook(
            lambda mod, args, out, n=n: acc.__setitem__(
                n, acc.get(n, 0.0) + time.perf_counter() - begin[n])))
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                acc.clear()
                model(x)
                if i >= warmup:
                    for n, t in acc.items():
                        layers[n][1].append(t)
    finally:
        for h in handles:
            h.remove()
    return {n: v for n, v in layers.items() if v[1]}


# --------------------------------------------------------------------------------------------
# the runtimes' per-node profiles
# --------------------------------------------------------------------------------------------
def openvino_runs(path, x, threads, repeats, warmup):
    """OpenVINO's profile of ``path`` (float32 inference pinned, latency hint, as
    :class:`~effbackbones.deploy.runtime.RuntimeSession` compiles it, plus ``PERF_COUNT``):
    per timed run ``[(node name, 'node type / kernel', seconds)]`` of the EXECUTED nodes in
    execution order; the wall times of the calls; the graph's input / output names."""
    import openvino as ov

    from effbackbones.deploy.runtimes.openvino import compile_config
    core = ov.Core()
    config = dict(compile_config(threads), PERF_COUNT=True)
    compiled = core.compile_model(core.read_model(path), 'CPU', config)
    request = compiled.create_infer_request()
    arr = x.numpy()
    runs, walls = [], []
    for i in range(warmup + repeats):
        t = time.perf_counter()
        request.infer({0: arr})
        wall = time.perf_counter() - t
        if i >= warmup:
            walls.append(wall)
            runs.append([(p.node_name, f'{p.node_type} / {p.exec_type}',
                          p.real_time.total_seconds()) for p in request.profiling_info
                         if p.status == ov.ProfilingInfo.Status.EXECUTED])
    io = [p.get_any_name() for p in list(compiled.inputs) + list(compiled.outputs)]
    return runs, walls, io


def onnxruntime_runs(path, x, threads, repeats, warmup, tmpdir):
    """onnxruntime's profile of ``path`` (all graph optimisations, as
    :class:`~effbackbones.deploy.runtime.RuntimeSession`, plus ``enable_profiling``): per timed
    run ``[(node name, op type, seconds of its kernel)]`` in execution order (the trace's
    ``Node`` events inside each ``model_run``); the wall times; the input / output names."""
    import onnxruntime as ort

    from effbackbones.deploy.runtimes.onnxruntime import session_options
    opts = session_options(threads)
    opts.enable_profiling = True
    opts.profile_file_prefix = osp.join(tmpdir, 'ort_profile')
    sess = ort.InferenceSession(path, opts, providers=['CPUExecutionProvider'])
    feed = {sess.get_inputs()[0].name: x.numpy()}
    walls = []
    for _ in range(warmup + repeats):
        t = time.perf_counter()
        sess.run(None, feed)
        walls.append(time.perf_counter() - t)
    with open(sess.end_profiling()) as f:
        trace = json.load(f)
    calls = sorted((e['ts'], e['ts'] + e['dur']) for e in trace
                   if e.get('cat') == 'Session' and e.get('name') == 'model_run')
    nodes = sorted((e['ts'], e['name'][:-len('_kernel_time')], e['args'].get('op_name', '?'),
                    e['dur'] / 1e6) for e in trace
                   if e.get('cat') == 'Node' and e['name'].endswith('_kernel_time'))
    runs = [[(n, op, s) for ts, n, op, s in nodes if begin <= ts <= end]
            for begin, end in calls[warmup:]]
    io = [a.name for a in list(sess.get_inputs()) + list(sess.get_outputs())]
    return runs, walls[warmup:], io


def export_for(runtime, model, x, tmpdir):
    """The static float32 file of ``model``'s deploy form tuned for ``runtime``, exported as
    tools/benchmark.py exports it."""
    from effbackbones.deploy.export import BackboneMaps, export_module
    dep = copy.deepcopy(model).switch_to_deploy(input_size=tuple(x.shape[2:]))
    path = osp.join(tmpdir, f'{type(model).__name__}_{runtime}.onnx')
    export_module(BackboneMaps(copy.deepcopy(dep)), x, path, runtime=runtime)
    return path


def profile_runtime(runtime, model, x, stages, scopes, args, tmpdir):
    """``(stage runs, wall times, layers)`` of ``runtime``: per timed run ``{stage index or
    None: seconds}``; ``{layer: (type, stage index or None, [seconds per run])}``."""
    if runtime == 'eager':
        runs = time_eager(model, x, stages, args.repeats, args.warmup)
        layers = eager_layers(model, x, args.repeats, args.warmup)
        names = list(layers)
        of = assign_stages([(n + '.', layers[n][0]) for n in names],
                           [[q + '.' for q in qs] for _, qs in stages])
        return ([r for r, _ in runs], [w for _, w in runs],
                {n: (layers[n][0], s, layers[n][1]) for n, s in zip(names, of)})
    path = export_for(runtime, model, x, tmpdir)
    if runtime == 'openvino':
        runs, walls, io = openvino_runs(path, x, args.threads, args.repeats, args.warmup)
    else:
        runs, walls, io = onnxruntime_runs(path, x, args.threads, args.repeats, args.warmup,
                                           tmpdir)
    stage_runs, layers = [], {}
    for run in runs:
        of = assign_stages([(n, kind) for n, kind, _ in run], scopes, io)
        times = {}
        for (name, kind, s), stage in zip(run, of):
            times[stage] = times.get(stage, 0.0) + s
            layers.setdefault(name, (kind, stage, []))[2].append(s)
        stage_runs.append(times)
    return stage_runs, walls, layers


# --------------------------------------------------------------------------------------------
# the tables
# --------------------------------------------------------------------------------------------
def stage_medians(stage_runs, num_stages):
    """``{stage index or None: median seconds over the runs}``."""
    return {k: statistics.median(r.get(k, 0.0) for r in stage_runs)
            for k in list(range(num_stages)) + [None]}


def _pct(macs, seconds, peak):
    return f'{100 * 2 * macs / seconds / peak:.1f}%' if macs > 0 and seconds > 0 else '-'


def stage_table(stages, macs, total_macs, profiles, peak):
    """The markdown lines of the per-stage table (one row per stage, ``other``, ``total`` = the
    sum of the rows, ``whole call`` = median wall time of a call)."""
    cols = ['stage', 'modules', 'GMAC'] + [f'{rt} {c}' for rt in profiles
                                           for c in ('ms', 'share', '% peak')]
    lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
    medians = {rt: stage_medians(p[0], len(stages)) for rt, p in profiles.items()}
    totals = {rt: sum(m.values()) for rt, m in medians.items()}
    rows = [(i, label, compact(qs), m) for i, ((label, qs), m) in enumerate(zip(stages, macs))]
    rows.append((None, OTHER, '', total_macs - sum(macs)))
    for key, label, modules, m in rows:
        cells = [label, modules, f'{m / 1e9:.4g}']
        for rt, med in medians.items():
            t = med[key]
            cells += [f'{t * 1e3:.2f}', f'{100 * t / totals[rt]:.1f}%', _pct(m, t, peak)]
        lines.append('| ' + ' | '.join(cells) + ' |')
    total = ['total', '', f'{total_macs / 1e9:.4g}']
    wall = ['whole call (wall)', '', '']
    for rt, (_, walls, _) in profiles.items():
        total += [f'{totals[rt] * 1e3:.2f}', '100.0%', _pct(total_macs, totals[rt], peak)]
        w = statistics.median(walls)
        wall += [f'{w * 1e3:.2f}', '', _pct(total_macs, w, peak)]
    return lines + ['| ' + ' | '.join(total) + ' |', '| ' + ' | '.join(wall) + ' |']


def top_layers(runtime, layers, stages, total, top):
    """The markdown lines of ``runtime``'s ``top`` slowest layers (median per run)."""
    rows = sorted(((statistics.median(ts), n, kind, st) for n, (kind, st, ts) in layers.items()),
                  key=lambda r: -r[0])[:top]
    what = 'leaf modules, hooks' if runtime == 'eager' else 'nodes of the compiled graph'
    lines = [f'{runtime}: the {len(rows)} slowest layers ({what}; median ms per run, share of '
             f'the {runtime} total)', '', '| layer | type | stage | ms | share |',
             '|---|---|---|---|---|']
    for t, name, kind, st in rows:
        stage = OTHER if st is None else stages[st][0]
        lines.append(f'| `{name}` | {kind} | {stage} | {t * 1e3:.3f} | {100 * t / total:.1f}% |')
    return lines


def machine_line(args, rates):
    """What the tables were measured on: CPU, threads, versions, GEMM peak, load."""
    threads = torch.get_num_threads()
    versions = [f'torch {torch.__version__}']
    for rt in BACKENDS:
        if rt in args.runtimes:
            try:
                versions.append(f'{rt} {__import__(rt).__version__}')
            except ImportError:
                versions.append(f'{rt} not installed')
    peak = max(rates.values())
    return (f'cpu ({cpu_description()}, {threads} thread{"s" if threads > 1 else ""}), '
            f'{", ".join(versions)}; float32 GEMM rate {peak / 1e9:.0f} GFLOP/s (best of '
            f'{", ".join(f"{k} {v / 1e9:.0f}" for k, v in rates.items())}); '
            f'load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs')


def profile(args):
    """Count and time everything ``args`` asks for; returns what :func:`render` writes:
    ``dict(stages, macs, total_macs, profiles={runtime: (stage runs, walls, layers)}, rates)``.
    """
    from effbackbones.models import backbone_class
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cls = backbone_class(args.model)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    torch.manual_seed(0)
    model = cls(arch=args.arch)
    randomise_bn(model)
    model.eval()
    x = torch.randn(1, 3, *args.shape)
    called = called_modules(model, x)
    stages = stage_modules(model, called)
    scopes = scopes_of(stages, called)
    macs, total_macs = stage_macs(model, x, stages)
    with tempfile.TemporaryDirectory() as tmp:
        rates = {'torch': gemm_rate(n=args.gemm_size)}
        rates.update(runtime_gemm_rates(args.runtimes, args.threads, 'float32', tmp,
                                        n=args.gemm_size))
        profiles = {}
        for rt in args.runtimes:
            time.sleep(0.2)     # the previous runtime's worker threads stop spinning
            profiles[rt] = profile_runtime(rt, model, x, stages, scopes, args, tmp)
    return dict(stages=stages, scopes=scopes, macs=macs, total_macs=total_macs,
                profiles=profiles, rates=rates)


def render(args, result):
    """The header line, the per-stage table and the slowest layers of each runtime."""
    h, w = args.shape
    peak = max(result['rates'].values())
    header = (f'per-stage time, {args.model} {args.arch}, input 1x3x{h}x{w}, float32, '
              f'{machine_line(args, result["rates"])}; median of {args.repeats} runs per row; '
              f'eager: the eval model (not the deploy form), stages timed by forward pre-hooks; '
              f'{" / ".join(rt for rt in result["profiles"] if rt != "eager") or "no runtime"}: '
              f'the static float32 file tuned for each, summed per-node profile (OpenVINO '
              f'PERF_COUNT real_time, onnxruntime kernel_time); total: the sum of the rows; '
              f'% peak: 2 x MACs / time / GEMM rate')
    lines = [header, ''] + stage_table(result['stages'], result['macs'], result['total_macs'],
                                       result['profiles'], peak)
    for rt, (stage_runs, _, layers) in result['profiles'].items():
        total = sum(stage_medians(stage_runs, len(result['stages'])).values())
        lines += [''] + top_layers(rt, layers, result['stages'], total, args.top)
    return lines


def main(argv=None):
    args = parse_args(argv)
    lines = render(args, profile(args))
    print('\n'.join(lines), flush=True)
    if args.out:
        with open(args.out, 'a') as f:
            f.write('\n'.join(lines) + '\n\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
