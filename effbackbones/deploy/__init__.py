"""Deployment: ONNX export (:mod:`.export`) and the onnxruntime / OpenVINO runtimes
(:mod:`.runtime`). See docs/deploy.md."""
from .export import (OPSET, ExportError, ParityError, build_backbone, build_from_config,
                     check_onnx_parity, check_request, compare, export, export_module,
                     exportable_part)
from .runtime import BACKENDS, PRECISIONS, RuntimeSession, attach_runtime

__all__ = ['OPSET', 'BACKENDS', 'PRECISIONS', 'ExportError', 'ParityError', 'RuntimeSession',
           'attach_runtime', 'build_backbone', 'build_from_config', 'check_onnx_parity',
           'check_request', 'compare', 'export', 'export_module', 'exportable_part']
