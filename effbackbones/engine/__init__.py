from .hooks import DeployHook
from .strict_load import StrictLoadHook

__all__ = ['DeployHook', 'StrictLoadHook']
