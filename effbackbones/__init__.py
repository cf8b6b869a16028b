"""effbackbones: efficient mobile vision transformers as OpenMMLab dense-prediction backbones.

Importing the package registers every backbone in the ``effbackbones`` registry scope, so
mmdet/mmseg configs can use ``custom_imports=dict(imports=['effbackbones'])`` and
``backbone=dict(type='effbackbones.SwiftFormer', arch='l1', ...)``. Importing changes nothing
else in the process: what a training / test run needs from mmengine is installed by our hooks
for that run (:mod:`effbackbones.engine.run_patches`).
"""
from .checkpoint import CheckpointError, load_checkpoint_file, load_pretrained, partial_loads
from . import datasets, engine  # noqa: F401  (transforms and hooks registered)
from .models import *  # noqa: F401,F403
from .models import __all__ as _model_names
from .registry import MODELS

__version__ = '0.1.0'

__all__ = ['MODELS', 'CheckpointError', 'load_checkpoint_file', 'load_pretrained', 'partial_loads',
           '__version__'] + list(_model_names)
