"""Loading foreign checkpoints into effbackbones backbones and the models that hold them, loudly.

The package is split by job:

* :mod:`.files` -- reading a file safely (weights-only, the allow-list widened inside our own
  load calls only) and saying what is wrong with a damaged, hostile or non-finite one;
* :mod:`.layouts` -- unwrapping, prefixes, the renaming rules every family's
  ``checkpoint_filter_fn`` is built on (:func:`rename_keys`), which modules are backbones;
* :mod:`.report` -- the one compare-and-report step of every loader;
* :mod:`.loading` -- loading into a backbone (``init_cfg``), into a whole model (runner files),
  and the ``load_state_dict`` pre-hook every backbone registers, so mmengine's / mmdet's /
  mmseg's own loading APIs convert and check the backbone part too.
"""
from .errors import CheckpointError
from .files import (SAFE_CHECKPOINT_GLOBALS, UNREADABLE_ERRORS, check_finite, diagnose_unreadable,
                    holds_foreign_objects, load_checkpoint_file, nonfinite_tensors,
                    refused_globals)
from .layouts import (LayoutDict, dataset_meta_from, effbackbones_modules,
                      is_effbackbones_backbone, reject_dense_tables, rename_keys, strip_prefix,
                      unwrap_state_dict)
from .loading import (convert_backbone_part, convert_model_checkpoint, load_pretrained,
                      load_state_dict_pre_hook, partial_loads)
from .report import Comparison, compare_state_dicts

__all__ = ['CheckpointError', 'SAFE_CHECKPOINT_GLOBALS', 'UNREADABLE_ERRORS',
           'load_checkpoint_file', 'check_finite', 'nonfinite_tensors', 'diagnose_unreadable',
           'holds_foreign_objects', 'refused_globals', 'unwrap_state_dict', 'strip_prefix',
           'load_pretrained', 'LayoutDict', 'rename_keys', 'reject_dense_tables',
           'is_effbackbones_backbone', 'effbackbones_modules', 'dataset_meta_from',
           'convert_model_checkpoint', 'convert_backbone_part', 'load_state_dict_pre_hook',
           'partial_loads', 'Comparison', 'compare_state_dicts']
