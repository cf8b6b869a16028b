#!/usr/bin/env python
"""Summarise a tools/train.py + tools/test.py run: training loss at the start and the end,
the test metrics, and a copy of one prediction picture. Exits non-zero if the run did not learn
(loss not down, or the main metric is zero).

With ``--reference``, WORK_DIR is the evaluation of an exported file (tools/test.py --backend):
its metric is compared to that of the last tools/test.py run in the reference work dir (the
PyTorch checkpoint's); exits non-zero when they differ by more than ``--tolerance``.

    python tools/summarize_run.py WORK_DIR --metric coco/bbox_mAP --picture outputs/x.png
    python tools/summarize_run.py DEPLOY_DIR --metric mIoU --reference WORK_DIR
    python tools/summarize_run.py INT8_DIR --metric mIoU --reference WORK_DIR --tolerance 1.0
"""
import argparse
import glob
import json
import os
import os.path as osp
import shutil
import sys


def _records(work_dir):
    recs = []
    for f in sorted(glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json'))):
        with open(f) as fh:
            recs += [json.loads(line) for line in fh if line.strip()]
    return recs


def _last_test_metric(work_dir, metric):
    """``metric`` of the last tools/test.py run in ``work_dir`` (``<stamp>/<stamp>.json``)."""
    values = []
    for f in sorted(glob.glob(osp.join(work_dir, '*', '*.json'))):
        if osp.basename(f) == osp.basename(osp.dirname(f)) + '.json':
            with open(f) as fh:
                records = [json.loads(line) for line in fh if line.strip()]
            values += [r[metric] for r in records if metric in r]
    return float(values[-1]) if values else None


def compare_to_reference(work_dir, reference, metric, tolerance):
    got, ref = _last_test_metric(work_dir, metric), _last_test_metric(reference, metric)
    if got is None or ref is None:
        missing = work_dir if got is None else reference
        print(f'[summary] no {metric} in {missing}', file=sys.stderr)
        return 1
    same = abs(got - ref) <= tolerance
    print(f'[summary] {work_dir}')
    print(f'[summary]   {metric}: {round(got, 4)} (PyTorch {round(ref, 4)}, {reference}) -> '
          f'{"same" if got == ref else "within" if same else "DIFFERENT"} (tolerance '
          f'{tolerance})')
    return 0 if same else 4


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument('work_dir')
    p.add_argument('--metric', required=True, help='e.g. coco/bbox_mAP or mIoU')
    p.add_argument('--picture', help='copy one saved prediction picture here')
    p.add_argument('--reference', help='WORK_DIR evaluated an exported file: compare its metric '
                                       'to the last tools/test.py metric in this work dir')
    p.add_argument('--tolerance', type=float, default=0.005,
                   help='with --reference: largest accepted |metric - reference metric|')
    a = p.parse_args(argv)
    if a.reference:
        return compare_to_reference(a.work_dir, a.reference, a.metric, a.tolerance)
    recs = _records(a.work_dir)
    losses = [r['loss'] for r in recs if 'loss' in r]
    metrics = [r for r in recs if a.metric in r]
    if len(losses) < 4 or not metrics:
        print(f'[summary] no training log or no {a.metric} in {a.work_dir}', file=sys.stderr)
        return 1
    k = max(1, len(losses) // 5)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    final = metrics[-1]
    shown = {key: v for key, v in final.items() if '/' in key or key in ('mIoU', 'aAcc', 'mAcc')}
    print(f'[summary] {a.work_dir}')
    print(f'[summary]   training loss: {first:.3f} (first {k} logs) -> {last:.3f} (last {k} logs)')
    print('[summary]   test metrics : ' + ', '.join(f'{key}={v}' for key, v in shown.items()))
    if a.picture:
        pics = sorted(p for ext in ('png', 'jpg') for p in glob.glob(
            osp.join(a.work_dir, '**', f'*.{ext}'), recursive=True)
            if f'{os.sep}vis{os.sep}' in p)
        if pics:
            best = pics[0]   # the first validation image: no cherry-picking
            os.makedirs(osp.dirname(a.picture) or '.', exist_ok=True)
            shutil.copy(best, a.picture)
            print(f'[summary]   predictions  : {a.picture} (all: {osp.dirname(pics[0])})')
    learned = last < first and float(final[a.metric]) > 0
    print(f'[summary]   learned      : {"yes" if learned else "NO"} '
          f'(loss down and {a.metric} > 0)')
    return 0 if learned else 3


if __name__ == '__main__':
    sys.exit(main())
