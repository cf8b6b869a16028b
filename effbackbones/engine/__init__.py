from .guard import DivergenceGuardHook, TrainingDiverged
from .hooks import DeployHook
from .resume import ExactResumeHook
from .strict_load import StrictLoadHook

__all__ = ['DeployHook', 'DivergenceGuardHook', 'ExactResumeHook', 'StrictLoadHook',
           'TrainingDiverged']
