from .synthetic import make_shapes_dataset
from .transforms import AlignResize

__all__ = ['AlignResize', 'make_shapes_dataset']
