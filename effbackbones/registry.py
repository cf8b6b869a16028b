"""The ``effbackbones`` registry scope.

Follows mmpretrain's pattern: our ``MODELS`` is a child of mmengine's root ``MODELS`` with its own
scope, so every OpenMMLab toolbox (whose registries are children of the same root) can build
``type='effbackbones.SwiftFormer'`` once ``effbackbones`` is imported (``custom_imports``).
"""
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import Registry

MODELS = Registry('model', parent=MMENGINE_MODELS, scope='effbackbones',
                  locations=['effbackbones.models'])

__all__ = ['MODELS']
