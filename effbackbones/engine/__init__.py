from .hooks import DeployHook

__all__ = ['DeployHook']
