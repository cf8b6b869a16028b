"""Data transforms the papers' recipes need and mmseg 1.x lacks."""
import numpy as np

from ..registry import TRANSFORMS


@TRANSFORMS.register_module()
class AlignResize:
    """Resize the image so both sides are multiples of ``size_divisor`` (rounding up).

    The EfficientFormer / SwiftFormer segmentation evaluations resize test images this way after
    the keep-ratio resize (their ``AlignResize``), instead of padding. Place it after mmseg's
    ``Resize``; ``img_shape`` and ``scale_factor`` are updated, so mmseg maps predictions back
    to the original size before the metric.
    """

    def __init__(self, size_divisor=32, interpolation='bilinear'):
        if int(size_divisor) <= 0:
            raise ValueError(f'size_divisor must be positive, got {size_divisor}')
        self.size_divisor = int(size_divisor)
        self.interpolation = interpolation

    def __call__(self, results):
        import cv2
        img = results['img']
        h, w = img.shape[:2]
        d = self.size_divisor
        new_h, new_w = int(np.ceil(h / d)) * d, int(np.ceil(w / d)) * d
        if (new_h, new_w) != (h, w):
            flag = {'bilinear': cv2.INTER_LINEAR, 'nearest': cv2.INTER_NEAREST,
                    'bicubic': cv2.INTER_CUBIC}[self.interpolation]
            results['img'] = cv2.resize(img, (new_w, new_h), interpolation=flag)
            sf = results.get('scale_factor', (1.0, 1.0))
            results['scale_factor'] = (sf[0] * new_w / w, sf[1] * new_h / h)
        results['img_shape'] = results['img'].shape[:2]
        return results

    transform = __call__

    def __repr__(self):
        return f'{type(self).__name__}(size_divisor={self.size_divisor})'
