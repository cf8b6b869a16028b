# What every effbackbones task base adds to mmdet's / mmseg's default runtime:
# - our registry scope;
# - crash-safe training (docs/reliability.md): --resume continues bit-identically, and the first
#   non-finite loss / gradient norm stops the run (AMP users: DivergenceGuardHook action='skip');
# - strict loading: every checkpoint the runner loads (load_from, tools/test.py CHECKPOINT,
#   resume) is converted from the official dense layout where needed and must fit the model
#   completely; missing, unexpected or shape-mismatched tensors are an error naming them
#   (opt out: StrictLoadHook strict=False).
# A config that sets its own custom_hooks replaces this list: keep these three in it.
custom_imports = dict(imports=['effbackbones'], allow_failed_imports=False)
custom_hooks = [dict(type='effbackbones.ExactResumeHook'),
                dict(type='effbackbones.DivergenceGuardHook', action='stop'),
                dict(type='effbackbones.StrictLoadHook')]
