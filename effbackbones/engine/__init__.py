from .guard import DivergenceGuardHook, TrainingDiverged
from .hooks import DeployHook
from .resume import ExactResumeHook

__all__ = ['DeployHook', 'DivergenceGuardHook', 'ExactResumeHook', 'TrainingDiverged']
