from .base import BaseDenseBackbone
from .swiftformer import SwiftFormer

__all__ = ['BaseDenseBackbone', 'SwiftFormer']
