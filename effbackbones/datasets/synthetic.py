"""A small deterministic dataset of coloured shapes, made on the fly (no download).

``make_shapes_dataset(root)`` writes two twins of the same scenes:

* ``root/coco``: COCO-format instance segmentation (``annotations/instances_{train,val}.json``
  with polygon masks, images in ``train/`` and ``val/``) for mmdet's ``CocoDataset`` +
  ``CocoMetric``;
* ``root/seg``: semantic segmentation (``img_dir/{train,val}/*.jpg`` and
  ``ann_dir/{train,val}/*.png``, label 0 = background) for mmseg's ``BaseSegDataset`` +
  ``IoUMetric``.

Classes: circle, square, triangle. Each class has its own hue band (with jitter), shapes have
random size / position / rotation and may overlap, backgrounds are smooth random gradients with
noise: easy enough to show learning within minutes on a CPU, not trivial.
Everything is a pure function of ``seed``: two calls write identical files.
"""
import json
import math
import os
import os.path as osp

import numpy as np

CLASSES = ('circle', 'square', 'triangle')
PALETTE = [(220, 20, 60), (0, 160, 80), (30, 80, 230)]
_HUES = {'circle': (0, 20), 'square': (50, 80), 'triangle': (100, 130)}   # OpenCV hue (0-180)


def _polygon(kind, cx, cy, r, angle):
    if kind == 'circle':
        n = 32
        t = np.linspace(0, 2 * math.pi, n, endpoint=False)
        return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)
    n = 4 if kind == 'square' else 3
    t = angle + np.arange(n) * 2 * math.pi / n
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


def _colour(rs, kind):
    import cv2
    lo, hi = _HUES[kind]
    hsv = np.uint8([[[rs.randint(lo, hi), rs.randint(150, 256), rs.randint(150, 256)]]])
    return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])


def draw_scene(rs, h, w, max_objects):
    """One shapes scene drawn from the ``numpy.random.RandomState`` ``rs``: ``(image, semantic
    map, objects)`` of ``h`` x ``w`` with up to ``max_objects`` shapes (also the synthetic
    calibration images of :mod:`effbackbones.deploy.quantize`)."""
    import cv2
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rs.randint(40, 120, size=3).astype(np.float32)
    grad = rs.uniform(-40, 40, size=(2, 3)).astype(np.float32)
    img = base + xx[..., None] / w * grad[0] + yy[..., None] / h * grad[1]
    img += rs.normal(0, 6, size=img.shape).astype(np.float32)
    img = np.clip(img, 0, 255).astype(np.uint8)
    semantic = np.zeros((h, w), np.uint8)
    objects = []
    for _ in range(rs.randint(1, max_objects + 1)):
        label = rs.randint(len(CLASSES))
        kind = CLASSES[label]
        r = rs.uniform(0.08, 0.22) * min(h, w)
        cx, cy = rs.uniform(r, w - r), rs.uniform(r, h - r)
        poly = _polygon(kind, cx, cy, r, rs.uniform(0, 2 * math.pi))
        mask = np.zeros((h, w), np.uint8)
        cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], 1)
        cv2.fillPoly(img, [np.round(poly).astype(np.int32)], _colour(rs, kind))
        semantic[mask > 0] = label + 1
        # later shapes occlude earlier ones: cut their visible masks
        for o in objects:
            o['mask'][mask > 0] = 0
        objects.append(dict(label=label, mask=mask))
    objects = [o for o in objects if o['mask'].sum() >= 30]
    return img, semantic, objects


def _mask_to_coco(mask):
    import cv2
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    return polys, [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], float(mask.sum())


def make_shapes_dataset(root, num_train=64, num_val=16, size=(256, 256), max_objects=4,
                        seed=0, overwrite=False):
    """Write the dataset under ``root`` (see module doc). Returns ``root``.

    ``size`` is (height, width); it may be non-square. Skips the work if a complete dataset with
    the same parameters is already there (``overwrite=True`` forces a rewrite).
    """
    import cv2
    params = dict(num_train=num_train, num_val=num_val, size=list(size),
                  max_objects=max_objects, seed=seed, version=1)
    stamp = osp.join(root, 'dataset.json')
    if not overwrite and osp.isfile(stamp):
        with open(stamp) as f:
            if json.load(f) == params:
                return root
    h, w = size
    for split, n, split_seed in (('train', num_train, seed), ('val', num_val, seed + 10007)):
        rs = np.random.RandomState(split_seed)
        img_dir = osp.join(root, 'coco', split)
        seg_img_dir = osp.join(root, 'seg', 'img_dir', split)
        seg_ann_dir = osp.join(root, 'seg', 'ann_dir', split)
        for d in (img_dir, seg_img_dir, seg_ann_dir, osp.join(root, 'coco', 'annotations')):
            os.makedirs(d, exist_ok=True)
        images, annotations = [], []
        for i in range(n):
            img, semantic, objects = draw_scene(rs, h, w, max_objects)
            name = f'{split}_{i:05d}'
            cv2.imwrite(osp.join(img_dir, name + '.png'), img)
            cv2.imwrite(osp.join(seg_img_dir, name + '.jpg'), img,
                        [cv2.IMWRITE_JPEG_QUALITY, 95])
            cv2.imwrite(osp.join(seg_ann_dir, name + '.png'), semantic)
            images.append(dict(id=i + 1, file_name=name + '.png', height=h, width=w))
            for o in objects:
                polys, bbox, area = _mask_to_coco(o['mask'])
                if not polys:
                    continue
                annotations.append(dict(id=len(annotations) + 1, image_id=i + 1,
                                        category_id=o['label'] + 1, segmentation=polys,
                                        bbox=bbox, area=area, iscrowd=0))
        coco = dict(images=images, annotations=annotations,
                    categories=[dict(id=k + 1, name=c) for k, c in enumerate(CLASSES)])
        with open(osp.join(root, 'coco', 'annotations', f'instances_{split}.json'), 'w') as f:
            json.dump(coco, f)
    with open(stamp, 'w') as f:
        json.dump(params, f)
    return root
