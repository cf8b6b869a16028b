"""Running a config: picking the toolbox (mmdet or mmseg) from it and building its model (the
tools and the library's whole-model export use these), checking that datasets and checkpoints
exist before a long start-up, the flags and exit handling tools/train.py and tools/test.py
share, and torch.distributed on CPU machines (gloo) as well as GPUs (nccl)."""
import os
import os.path as osp
import sys

import torch

DATASET_HELP = {
    'CocoDataset': (
        'COCO 2017 is expected under {root} (annotations/instances_train2017.json, '
        'annotations/instances_val2017.json, train2017/, val2017/). Download it from '
        'https://cocodataset.org/#download (2017 Train/Val images + annotations) and unpack it '
        'there, or link it: ln -s /path/to/coco data/coco.'),
    'ADE20KDataset': (
        'ADE20K (SceneParsing, ADEChallengeData2016) is expected under {root} '
        '(images/training, images/validation, annotations/training, annotations/validation). '
        'Download ADEChallengeData2016.zip from http://sceneparsing.csail.mit.edu/ and unzip it '
        'there, or link it: ln -s /path/to/ADEChallengeData2016 data/ade/ADEChallengeData2016.'),
}


class DatasetNotFound(SystemExit):
    pass


def detect_toolbox(cfg):
    """'mmdet' or 'mmseg', from ``default_scope`` (or the model type as a fallback)."""
    scope = cfg.get('default_scope')
    if scope in ('mmdet', 'mmseg'):
        return scope
    model_type = str(cfg.get('model', {}).get('type', ''))
    if model_type in ('EncoderDecoder', 'CascadeEncoderDecoder') or 'decode_head' in cfg.get(
            'model', {}):
        return 'mmseg'
    if model_type:
        return 'mmdet'
    raise ValueError('cannot tell whether this config is for mmdet or mmseg: set '
                     "default_scope='mmdet' or 'mmseg' (our configs inherit it from their bases)")


def register_toolbox(toolbox):
    import effbackbones  # noqa: F401  (registers our scope and the torch.load allow-list)
    if toolbox == 'mmdet':
        from mmdet.utils import register_all_modules
    else:
        from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)


def build_model(cfg):
    """The (detector / segmentor) model of a config, without loading any weights."""
    from mmengine.registry import MODELS, DefaultScope
    register_toolbox(detect_toolbox(cfg))
    model_cfg = cfg.model.copy()
    if model_cfg.get('backbone', {}).get('init_cfg') is not None:
        model_cfg.backbone.init_cfg = None
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope')):
        return MODELS.build(model_cfg)


def _dataset_cfgs(cfg, which):
    for name in which:
        loader = cfg.get(name)
        if not loader:
            continue
        ds = loader.get('dataset')
        stack = [ds]
        while stack:
            d = stack.pop()
            if d is None:
                continue
            if isinstance(d, (list, tuple)):
                stack.extend(d)
                continue
            if 'datasets' in d:
                stack.extend(d['datasets'])
            elif 'dataset' in d:
                stack.append(d['dataset'])
            else:
                yield name, d


def check_datasets(cfg, which=('train_dataloader', 'val_dataloader', 'test_dataloader')):
    """Exit with a message saying where the data must be (and how to get it) if it is absent."""
    problems = []
    for loader, ds in _dataset_cfgs(cfg, which):
        root = ds.get('data_root', '') or ''
        paths = []
        ann = ds.get('ann_file')
        if ann:
            paths.append(('ann_file', osp.join(root, ann)))
        for key, sub in (ds.get('data_prefix') or {}).items():
            if isinstance(sub, str) and sub:
                paths.append((f'data_prefix.{key}', osp.join(root, sub)))
        if not paths and root:
            paths.append(('data_root', root))
        missing = [(k, p) for k, p in paths if not osp.exists(p)]
        if missing:
            kind = ds.get('type', 'dataset')
            how = DATASET_HELP.get(kind, 'Put the data there or change data_root.').format(
                root=root or '.')
            problems.append(
                f'{loader} ({kind}): missing ' + ', '.join(f'{p} ({k})' for k, p in missing) +
                f'\n  {how}\n  Or point the config elsewhere: --cfg-options '
                f'{loader}.dataset.data_root=/path/to/data/')
    if problems:
        msg = ('Dataset not found.\n' + '\n'.join(problems) +
               '\nTo try the whole pipeline without downloads: bash tools/run_demo.sh '
               '(synthetic shapes data).')
        raise DatasetNotFound(msg)


def _iter_init_cfgs(node):
    if isinstance(node, dict):
        init_cfg = node.get('init_cfg')
        if isinstance(init_cfg, dict):
            yield init_cfg
        for v in node.values():
            yield from _iter_init_cfgs(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            yield from _iter_init_cfgs(v)


def check_pretrained_files(cfg):
    """Exit early, with the fix, when an ImageNet checkpoint named in the config is missing.

    With ``resume`` / ``load_from`` the checkpoint provides every weight (StrictLoadHook), so
    the backbone's ImageNet ``init_cfg`` is dropped instead: its file need not exist."""
    if cfg.get('resume') or cfg.get('load_from'):
        backbone = cfg.get('model', {}).get('backbone')
        if backbone is not None and backbone.get('init_cfg') is not None:
            backbone.init_cfg = None
        return
    for init_cfg in _iter_init_cfgs(cfg.get('model', {})):
        ckpt = init_cfg.get('checkpoint')
        if init_cfg.get('type') == 'Pretrained' and isinstance(ckpt, str) and \
                '://' not in ckpt and not osp.isfile(ckpt):
            raise SystemExit(
                f'ImageNet checkpoint not found: {ckpt}\n  Download the released weights of the '
                f'backbone (official repository or timm) to that path, or set another path with '
                f'--cfg-options model.backbone.init_cfg.checkpoint=/path/to/file.pth, or train '
                f'from scratch with --cfg-options model.backbone.init_cfg=None.')


def prepare_config(cfg, args, work_dir_default):
    """Apply the command-line flags mmdet/mmseg's tools accept, plus CPU-distributed fixes."""
    cfg.launcher = args.launcher
    if getattr(args, 'cfg_options', None):
        cfg.merge_from_dict(args.cfg_options)
    if getattr(args, 'work_dir', None):
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = work_dir_default
    if args.launcher != 'none' and not torch.cuda.is_available():
        # torch.distributed on CPU: gloo, and DDP must not get CUDA device ids
        cfg.setdefault('env_cfg', {})
        cfg.env_cfg.setdefault('dist_cfg', {})
        cfg.env_cfg.dist_cfg['backend'] = 'gloo'
        wrapper = cfg.get('model_wrapper_cfg') or dict(type='MMDistributedDataParallel')
        wrapper['device_ids'] = None
        wrapper.setdefault('broadcast_buffers', False)
        cfg.model_wrapper_cfg = wrapper
        _init_cpu_process_group()
    add_strict_load_hook(cfg, strict=not getattr(args, 'load_not_strict', False))
    return cfg


def _hook_name(hook):
    """``'StrictLoadHook'`` for ``dict(type='effbackbones.StrictLoadHook')``, ``'StrictLoadHook'``
    or the class itself, and for a built hook object."""
    kind = hook.get('type', '') if isinstance(hook, dict) else type(hook)
    return (kind.__name__ if isinstance(kind, type) else str(kind)).rpartition('.')[2]


def ensure_custom_hook(cfg, hook_type, **settings):
    """Add ``dict(type='effbackbones.<hook_type>')`` to ``cfg.custom_hooks`` unless the config
    lists a hook of that type already (with or without a scope, or built), then set
    ``settings`` on every dict entry of that type (a built hook object is kept as it is)."""
    hooks = list(cfg.get('custom_hooks') or [])
    mine = [h for h in hooks if _hook_name(h) == hook_type]
    if not mine:
        mine = [dict(type=f'effbackbones.{hook_type}')]
        hooks += mine
    for hook in mine:
        if isinstance(hook, dict):
            hook.update(settings)
    cfg.custom_hooks = hooks


def add_strict_load_hook(cfg, strict=True):
    """Make every checkpoint the runner loads go through ``effbackbones.StrictLoadHook``
    (official dense layouts converted, partial loads refused); ``strict=False`` overrides the
    config's own setting of the hook."""
    ensure_custom_hook(cfg, 'StrictLoadHook', **({} if strict else dict(strict=False)))


def _init_cpu_process_group():
    """mmengine's init_dist calls torch.cuda.set_device: initialise gloo ourselves on CPU."""
    import torch.distributed as dist
    if dist.is_available() and not dist.is_initialized() and 'RANK' in os.environ:
        dist.init_process_group(backend='gloo')


def add_common_args(parser):
    """Flags tools/train.py and tools/test.py share with mmdet's and mmseg's own tools."""
    from mmengine.config import DictAction
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, xxx=yyy format')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher (dist_train.sh uses pytorch)')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    parser.add_argument('--load-not-strict', action='store_true',
                        help='accept a checkpoint (load_from / tools/test.py CHECKPOINT) that '
                             'fits the model only partly: missing, unexpected and '
                             'shape-mismatched tensors become warnings instead of errors')
    return parser


def parse_common(parser, argv=None):
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def main_guard(fn):
    """Run ``fn`` and turn our SystemExit messages and checkpoint errors (the load report
    naming what does not fit) into a clean exit with status 2; the run patches of our hooks
    are undone however ``fn`` ends."""
    from effbackbones.checkpoint import CheckpointError
    from effbackbones.engine.run_patches import released_after
    try:
        with released_after():
            fn()
    except CheckpointError as exc:
        print(f'CheckpointError: {exc}', file=sys.stderr)
        sys.exit(2)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            sys.exit(2)
        raise
