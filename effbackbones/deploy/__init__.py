"""Deployment: ONNX export (:mod:`.export`), the runtimes (:mod:`.runtime`, one module per
runtime in :mod:`.runtimes`), the exportable parts (:mod:`.parts`) and what they all agree on
(:mod:`.contract`). See docs/deploy.md.

Imports go one way: ``contract`` <- ``detection`` <- ``parts`` <- ``runtimes`` <- ``runtime``
<- ``export`` (``substitution`` is used by ``runtimes`` and ``export``).
"""
from .contract import BACKENDS, OPSET, PRECISIONS, ExportError, ParityError, compare
from .export import (build_backbone, build_from_config, check_onnx_parity, check_request,
                     export, export_module)
from .parts import PARTS, exportable_part
from .runtime import RuntimeSession, attach_runtime

__all__ = ['OPSET', 'BACKENDS', 'PRECISIONS', 'PARTS', 'ExportError', 'ParityError',
           'RuntimeSession', 'attach_runtime', 'build_backbone', 'build_from_config',
           'check_onnx_parity', 'check_request', 'compare', 'export', 'export_module',
           'exportable_part']
