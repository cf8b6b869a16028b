#!/usr/bin/env python
"""Summarise a tools/train.py + tools/test.py run: training loss at the start and the end,
the test metrics, and a copy of one prediction picture. Exits non-zero if the run did not learn
(loss not down, or the main metric is zero).

    python tools/summarize_run.py WORK_DIR --metric coco/bbox_mAP --picture outputs/x.png
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


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument('work_dir')
    p.add_argument('--metric', required=True, help='e.g. coco/bbox_mAP or mIoU')
    p.add_argument('--picture', help='copy one saved prediction picture here')
    a = p.parse_args(argv)
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
