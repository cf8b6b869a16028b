#!/usr/bin/env python
"""Write the deterministic synthetic shapes dataset (COCO instances + semantic twin).

    python tools/make_synthetic_data.py data/shapes [--train 64 --val 16 --size 256 256]
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('root', nargs='?', default='data/shapes')
    p.add_argument('--train', type=int, default=64)
    p.add_argument('--val', type=int, default=16)
    p.add_argument('--size', type=int, nargs=2, default=[256, 256], metavar=('H', 'W'))
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--overwrite', action='store_true')
    a = p.parse_args(argv)
    from effbackbones.datasets.synthetic import make_shapes_dataset
    make_shapes_dataset(a.root, a.train, a.val, tuple(a.size), seed=a.seed, overwrite=a.overwrite)
    print(f'synthetic shapes dataset ready in {a.root} ({a.train} train / {a.val} val images, '
          f'{a.size[0]}x{a.size[1]}): {a.root}/coco (COCO instances), {a.root}/seg (semantic)')


if __name__ == '__main__':
    main()
