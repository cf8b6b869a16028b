from .base import BaseDenseBackbone
from .efficientformer import EfficientFormer
from .efficientformer_v2 import EfficientFormerV2
from .levit import LeViT
from .mobileformer import MobileFormer
from .swiftformer import SwiftFormer

__all__ = ['BaseDenseBackbone', 'EfficientFormer', 'EfficientFormerV2', 'LeViT', 'MobileFormer',
           'SwiftFormer']
