"""The ``effbackbones`` registry scope.

Follows mmpretrain's pattern: our ``MODELS`` is a child of mmengine's root ``MODELS`` with its own
scope, so every OpenMMLab toolbox (whose registries are children of the same root) can build
``type='effbackbones.SwiftFormer'`` once ``effbackbones`` is imported (``custom_imports``).
"""
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import TRANSFORMS as MMENGINE_TRANSFORMS
from mmengine.registry import Registry

MODELS = Registry('model', parent=MMENGINE_MODELS, scope='effbackbones',
                  locations=['effbackbones.models'])
TRANSFORMS = Registry('transform', parent=MMENGINE_TRANSFORMS, scope='effbackbones',
                      locations=['effbackbones.datasets'])

HOOKS = Registry('hook', parent=MMENGINE_HOOKS, scope='effbackbones',
                 locations=['effbackbones.engine'])

__all__ = ['MODELS', 'TRANSFORMS', 'HOOKS']
