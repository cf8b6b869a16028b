from ..checkpoint import is_effbackbones_backbone
from ..registry import MODELS
from .base import BaseDenseBackbone
from .efficientformer import EfficientFormer
from .efficientformer_v2 import EfficientFormerV2
from .levit import LeViT
from .mobileformer import MobileFormer
from .swiftformer import SwiftFormer


def backbone_classes():
    """``{name: class}`` of every registered effbackbones backbone family, sorted by name."""
    return {name: cls for name, cls in sorted(MODELS.module_dict.items())
            if is_effbackbones_backbone(cls)}


def backbone_class(name):
    """The backbone family registered as ``name``; a ``ValueError`` naming the known ones."""
    families = backbone_classes()
    if name not in families:
        raise ValueError(f'unknown backbone class {name!r}; choose one of {sorted(families)}')
    return families[name]


__all__ = ['BaseDenseBackbone', 'EfficientFormer', 'EfficientFormerV2', 'LeViT', 'MobileFormer',
           'SwiftFormer', 'backbone_class', 'backbone_classes']
