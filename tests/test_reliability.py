"""Crash-safe training (docs/reliability.md).

* kill -9 (the whole process group, data workers included) at a fixed point of a run, resume
  with ``tools/train.py --resume``, and every tensor of the final checkpoint (weights, BN
  buffers, optimizer state) equals the one of an uninterrupted run: mmdet epoch-based (resumed
  mid-epoch and at an epoch end) and mmseg iteration-based, ``num_workers`` 0 and 2, persistent
  workers or not. The uninterrupted reference of each loop type runs with ``num_workers=0`` and
  is shared by its tests, so the runs with workers also check that the data does not depend on
  the number of workers;
* a damaged latest checkpoint is passed over for the previous good one;
* a diverging run stops with a non-zero exit naming the iteration and loss terms, and writes no
  checkpoint holding NaN;
* the loaders name non-finite tensors and tell corrupt files from files with foreign objects;
* checkpoint writes are atomic.
"""
import glob
import os
import os.path as osp
import pickle
import random
import signal
import subprocess
import sys
import types

import pytest
import torch

from conftest import REPO, load_script

PY = sys.executable
DET = 'configs/demo/maskrcnn_swiftformer_xs_shapes.py'
SEG = 'configs/demo/semfpn_swiftformer_xs_shapes.py'
DET_ITERS_PER_EPOCH, DET_EPOCHS = 3, 2      # 6 images, batch 2
SEG_ITERS = 8


def _env():
    return dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1',
                PYTHONPATH=os.pathsep.join([REPO, osp.join(REPO, 'tests')]))


def run(args, check=True):
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=_env())
    if check and proc.returncode != 0:
        raise AssertionError(f'{" ".join(args)} failed ({proc.returncode}):\n'
                             f'{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}')
    return proc


def train_until_killed(args, stop_at, script='tools/train.py'):
    """Start training (``script``: ours, or mmdet's / mmseg's own), and kill -9 its whole
    process group once iteration ``stop_at`` is about to start (tests/killpoint_train.py)."""
    proc = subprocess.Popen([PY, 'tests/killpoint_train.py', str(stop_at), script] + args,
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith('KILLPOINT'):
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=120)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, ''.join(lines[-60:])


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    from effbackbones.datasets.synthetic import make_shapes_dataset
    root = str(tmp_path_factory.mktemp('data') / 'shapes')
    make_shapes_dataset(root, num_train=2 * DET_ITERS_PER_EPOCH, num_val=2, size=(64, 96),
                        max_objects=2)
    return root


def det_args(shapes, work_dir, workers=0, persistent=False, checkpoint=('by_epoch=False', 2)):
    r = shapes + '/coco/'
    by_epoch, interval = checkpoint
    return [DET, '--work-dir', work_dir, '--cfg-options',
            f'train_dataloader.dataset.data_root={r}', f'val_dataloader.dataset.data_root={r}',
            f'test_dataloader.dataset.data_root={r}',
            f'val_evaluator.ann_file={r}annotations/instances_val.json',
            f'test_evaluator.ann_file={r}annotations/instances_val.json',
            'train_dataloader.dataset.pipeline.2.scale=(96,96)',
            f'train_cfg.max_epochs={DET_EPOCHS}', 'train_cfg.val_interval=100',
            f'default_hooks.checkpoint.{by_epoch}', f'default_hooks.checkpoint.interval={interval}',
            'default_hooks.logger.interval=1', 'train_dataloader.batch_size=2',
            f'train_dataloader.num_workers={workers}',
            f'train_dataloader.persistent_workers={persistent}', 'randomness.seed=0']


def seg_args(shapes, work_dir, workers=0, persistent=False, lr=None):
    r = shapes + '/seg/'
    return [SEG, '--work-dir', work_dir, '--cfg-options',
            f'train_dataloader.dataset.data_root={r}', f'val_dataloader.dataset.data_root={r}',
            f'test_dataloader.dataset.data_root={r}',
            'train_dataloader.dataset.pipeline.2.scale=(64,64)',
            'train_dataloader.dataset.pipeline.3.crop_size=(64,64)',
            'model.data_preprocessor.size=(64,64)',
            f'train_cfg.max_iters={SEG_ITERS}', 'train_cfg.val_interval=100',
            'default_hooks.checkpoint.interval=2', 'default_hooks.logger.interval=1',
            'train_dataloader.batch_size=2', f'train_dataloader.num_workers={workers}',
            f'train_dataloader.persistent_workers={persistent}', 'randomness.seed=0'] + (
                [f'optim_wrapper.optimizer.lr={lr}'] if lr else [])


def load(path):
    """One of our runs' checkpoints (our reader allow-lists mmengine's objects in its call)."""
    from effbackbones.checkpoint import load_checkpoint_file
    return load_checkpoint_file(path, check_nonfinite=False)


def tensors(obj, prefix=''):
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f'{prefix}.{k}')
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f'{prefix}.{i}')


def assert_same_training_state(path, reference):
    """Every tensor of the model (weights and buffers) and of the optimizer state is equal."""
    got, ref = load(path), load(reference)
    assert got['meta']['iter'] == ref['meta']['iter']
    a = dict(tensors({k: got[k] for k in ('state_dict', 'optimizer')}))
    b = dict(tensors({k: ref[k] for k in ('state_dict', 'optimizer')}))
    assert a.keys() == b.keys()
    assert any('running_var' in k for k in a)          # BN buffers are compared too
    differ = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a
              if not torch.equal(a[k], b[k])}
    assert not differ, (f'{len(differ)}/{len(a)} tensors differ from the uninterrupted run, '
                        f'e.g. {sorted(differ.items(), key=lambda kv: -kv[1])[:5]}')


def final_checkpoint(work_dir, iters):
    found = [p for p in glob.glob(osp.join(work_dir, '*.pth'))
             if load(p)['meta']['iter'] == iters]
    assert found, os.listdir(work_dir)
    return found[0]


# -- kill -9 and resume: iteration-based (mmseg) ---------------------------------------------
@pytest.fixture(scope='module')
def seg_reference(shapes, tmp_path_factory):
    wd = str(tmp_path_factory.mktemp('seg_ref'))
    run([PY, 'tools/train.py'] + seg_args(shapes, wd))
    return osp.join(wd, f'iter_{SEG_ITERS}.pth')


@pytest.mark.slow
def test_seg_kill_resume_past_damaged_latest_checkpoint(shapes, seg_reference, tmp_path):
    wd = str(tmp_path)
    train_until_killed(seg_args(shapes, wd), stop_at=7)        # checkpoints at 2, 4, 6
    latest = osp.join(wd, 'iter_6.pth')
    with open(latest, 'r+b') as f:                              # as if the disk lost its end
        f.truncate(os.path.getsize(latest) // 2)
    proc = run([PY, 'tools/train.py'] + seg_args(shapes, wd) + ['--resume'])
    log = proc.stdout + proc.stderr
    assert f'cannot resume from {latest}' in log and 'truncated' in log, log[-3000:]
    assert f'resuming from {osp.join(wd, "iter_4.pth")}' in log, log[-3000:]
    assert 'resuming at iteration 4' in log
    assert_same_training_state(osp.join(wd, f'iter_{SEG_ITERS}.pth'), seg_reference)


@pytest.mark.slow
def test_seg_kill_resume_persistent_workers(shapes, seg_reference, tmp_path):
    wd = str(tmp_path)
    opts = dict(workers=2, persistent=True)
    train_until_killed(seg_args(shapes, wd, **opts), stop_at=5)
    run([PY, 'tools/train.py'] + seg_args(shapes, wd, **opts) + ['--resume'])
    assert_same_training_state(osp.join(wd, f'iter_{SEG_ITERS}.pth'), seg_reference)


# -- kill -9 and resume: epoch-based (mmdet) --------------------------------------------------
@pytest.fixture(scope='module')
def det_reference(shapes, tmp_path_factory):
    wd = str(tmp_path_factory.mktemp('det_ref'))
    run([PY, 'tools/train.py'] + det_args(shapes, wd))
    return final_checkpoint(wd, DET_EPOCHS * DET_ITERS_PER_EPOCH)


@pytest.mark.slow
def test_det_kill_resume_mid_epoch(shapes, det_reference, tmp_path):
    wd = str(tmp_path)
    # checkpoints every 2 iterations: iter_2 is in the middle of epoch 1 (3 iterations each)
    train_until_killed(det_args(shapes, wd), stop_at=3)
    proc = run([PY, 'tools/train.py'] + det_args(shapes, wd) + ['--resume'])
    log = proc.stdout + proc.stderr
    assert 'resuming at iteration 2 (epoch 1, batch 2 of 3)' in log, log[-3000:]
    assert_same_training_state(final_checkpoint(wd, DET_EPOCHS * DET_ITERS_PER_EPOCH),
                               det_reference)


@pytest.mark.slow
def test_det_kill_resume_epoch_end_workers(shapes, det_reference, tmp_path):
    wd = str(tmp_path)
    args = det_args(shapes, wd, workers=2, checkpoint=('by_epoch=True', 1))
    train_until_killed(args, stop_at=DET_ITERS_PER_EPOCH + 1)   # epoch_1.pth written
    run([PY, 'tools/train.py'] + args + ['--resume'])
    assert_same_training_state(osp.join(wd, f'epoch_{DET_EPOCHS}.pth'), det_reference)


# -- divergence ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_diverging_run_stops_loudly_without_nan_checkpoints(shapes, tmp_path):
    from effbackbones.checkpoint import load_checkpoint_file
    wd = str(tmp_path)
    proc = run([PY, 'tools/train.py'] + seg_args(shapes, wd, lr=1e8) +
               ['default_hooks.checkpoint.interval=1'], check=False)
    err = proc.stderr
    assert proc.returncode == 3, (proc.stdout[-2000:], err[-3000:])
    assert 'training diverged: non-finite loss at iteration' in err, err[-3000:]
    assert 'decode.loss_ce=' in err and 'not finite: ' in err
    stopped_at = int(err.split('at iteration ')[1].split()[0])
    assert stopped_at < SEG_ITERS
    written = glob.glob(osp.join(wd, '*.pth'))
    assert len(written) == stopped_at - 1          # one per finite iteration, none after
    for path in written:
        load_checkpoint_file(path)                  # raises on NaN / Inf


class _Runner(types.SimpleNamespace):
    pass


def _guarded_step(action, loss_value, **hook_args):
    """One optimizer step of a tiny model through DivergenceGuardHook's guarded OptimWrapper."""
    from mmengine.logging import MessageHub
    from mmengine.optim import OptimWrapper
    from effbackbones.engine import DivergenceGuardHook
    model = torch.nn.Linear(3, 2)
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    hook = DivergenceGuardHook(action=action, **hook_args)
    warnings = []
    runner = _Runner(optim_wrapper=wrapper, iter=6, epoch=0,
                     logger=types.SimpleNamespace(warning=warnings.append),
                     message_hub=MessageHub.get_instance('effb_guard_test'))
    hook.before_train(runner)
    before = model.weight.detach().clone()
    loss = model(torch.ones(1, 3)).sum() * loss_value
    wrapper.update_params(loss)
    return hook, runner, model, before, loss, warnings


def test_guard_stop_names_iteration_and_terms_and_leaves_weights():
    from effbackbones.engine import TrainingDiverged
    hook, runner, model, before, loss, _ = _guarded_step('stop', float('nan'))
    assert torch.equal(model.weight, before)          # the NaN step was not applied
    with pytest.raises(TrainingDiverged, match=r'non-finite loss at iteration 7 .*'
                                               r'loss_a=1.*loss_b=nan; not finite: loss, loss_b'):
        hook.after_train_iter(runner, 0, outputs=dict(loss=loss, loss_a=torch.tensor(1.0),
                                                      loss_b=torch.tensor(float('nan'))))


def test_guard_skip_and_finite_steps():
    from effbackbones.engine import TrainingDiverged
    hook, runner, model, before, loss, warnings = _guarded_step('skip', float('inf'),
                                                                max_consecutive_skips=1)
    assert torch.equal(model.weight, before)
    hook.after_train_iter(runner, 0, outputs=dict(loss=loss))
    assert 'The step was skipped (1 in a row)' in warnings[0]
    model.weight.grad = torch.full_like(model.weight, float('nan'))    # gradient norm check
    runner.optim_wrapper.step()
    assert torch.equal(model.weight, before)
    with pytest.raises(TrainingDiverged, match=r'2 non-finite steps in a row.*gradient norm'):
        hook.after_train_iter(runner, 0, outputs=dict(loss=torch.tensor(1.0)))
    hook, runner, model, before, loss, _ = _guarded_step('stop', 1.0)
    assert not torch.equal(model.weight, before)      # finite steps are applied
    hook.after_train_iter(runner, 0, outputs=dict(loss=loss))


def test_guard_refuses_to_write_nonfinite_checkpoint():
    from effbackbones.engine import DivergenceGuardHook, TrainingDiverged
    ckpt = dict(state_dict={'backbone.w': torch.tensor([1.0, float('inf')])}, optimizer={})
    with pytest.raises(TrainingDiverged, match=r'backbone.w \(1/2 values NaN/Inf\)'):
        DivergenceGuardHook().before_save_checkpoint(_Runner(iter=4), ckpt)
    with pytest.raises(ValueError, match='action'):
        DivergenceGuardHook(action='ignore')


# -- loaders ------------------------------------------------------------------------------------
class ForeignObject:
    """Pickled by reference: a weights-only load must refuse it."""


def _bad_files(tmp_path):
    good = {'state_dict': {'backbone.w': torch.arange(6.0).view(2, 3)}}
    torch.save(good, tmp_path / 'good.pth')
    data = (tmp_path / 'good.pth').read_bytes()
    nan = {'state_dict': {'backbone.w': torch.tensor([[1.0, float('nan')], [0.0, 1.0]]),
                          'backbone.b': torch.zeros(2)}}
    torch.save(nan, tmp_path / 'nan.pth')
    inf = {'state_dict': {'backbone.w': torch.tensor([float('-inf'), 0.0, float('inf')])}}
    torch.save(inf, tmp_path / 'inf.pth')
    (tmp_path / 'random.pth').write_bytes(random.Random(0).randbytes(4096))
    (tmp_path / 'truncated.pth').write_bytes(data[:len(data) // 2])
    (tmp_path / 'empty.pth').write_bytes(b'')
    torch.save({'state_dict': good['state_dict'], 'extra': ForeignObject()},
               tmp_path / 'foreign.pth')
    with open(tmp_path / 'plain_pickle.pth', 'wb') as f:
        pickle.dump({'w': [1.0, 2.0]}, f)
    return {
        'nan': r'non-finite values \(NaN/Inf\) in 1 tensors: state_dict.backbone.w \(1/4',
        'inf': r'non-finite values \(NaN/Inf\) in 1 tensors: state_dict.backbone.w \(2/3',
        'random': 'not a PyTorch checkpoint',
        'truncated': 'the file is truncated',
        'empty': 'the file is empty',
        'foreign': 'outside the weights-only allow-list',
        'plain_pickle': 'not a PyTorch checkpoint',
    }


def _mmengine_load(path):
    """mmengine's loader as it is during a run with our hooks (the run patches)."""
    from mmengine.runner.checkpoint import CheckpointLoader
    from effbackbones.engine.run_patches import run_patches
    with run_patches():
        return CheckpointLoader.load_checkpoint(str(path), map_location='cpu')


def _effb_load(path):
    from effbackbones.checkpoint import load_checkpoint_file
    return load_checkpoint_file(path)


@pytest.mark.parametrize('loader', [_effb_load, _mmengine_load], ids=['effbackbones', 'mmengine'])
def test_bad_checkpoints_are_named(loader, tmp_path):
    from effbackbones.checkpoint import CheckpointError
    cases = _bad_files(tmp_path)
    assert torch.equal(loader(tmp_path / 'good.pth')['state_dict']['backbone.w'],
                       torch.arange(6.0).view(2, 3))
    torch.save({'w': torch.ones(2)}, tmp_path / 'legacy.pth', _use_new_zipfile_serialization=False)
    assert torch.equal(loader(tmp_path / 'legacy.pth')['w'], torch.ones(2))
    for name, message in cases.items():
        with pytest.raises((CheckpointError, pickle.UnpicklingError), match=message) as info:
            loader(tmp_path / f'{name}.pth')
        assert str(tmp_path / f'{name}.pth') in str(info.value)
        if name != 'foreign':
            assert 'allow-list' not in str(info.value), (name, str(info.value))
        if name not in ('foreign', 'nan', 'inf'):
            assert 'corrupt checkpoint' in str(info.value), (name, str(info.value))


def test_foreign_objects_load_only_when_trusted(tmp_path, monkeypatch):
    """One loader, two ways to opt in: mmengine's (``load_from`` / ``--resume``) names
    ``EFFB_TRUST_CHECKPOINTS``, ``load_checkpoint_file`` its ``allow_unsafe`` argument."""
    from effbackbones.checkpoint import CheckpointError, load_checkpoint_file
    _bad_files(tmp_path)
    path = tmp_path / 'foreign.pth'
    monkeypatch.delenv('EFFB_TRUST_CHECKPOINTS', raising=False)
    with pytest.raises(CheckpointError, match=r'allow-list.*: .*ForeignObject.*Nothing of the '
                                              r'file was run.*EFFB_TRUST_CHECKPOINTS=1'):
        _mmengine_load(path)
    with pytest.raises(CheckpointError, match=r'allow-list.*: .*ForeignObject.*allow_unsafe=True'):
        load_checkpoint_file(path)
    assert isinstance(load_checkpoint_file(path, allow_unsafe=True)['extra'], ForeignObject)
    monkeypatch.setenv('EFFB_TRUST_CHECKPOINTS', '1')
    assert isinstance(_mmengine_load(path)['extra'], ForeignObject)


# -- atomic writes and the resume fallback ------------------------------------------------------
def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    from mmengine.runner.checkpoint import save_checkpoint
    from effbackbones.engine.run_patches import run_patches
    with run_patches():
        _check_atomic_writes(tmp_path, monkeypatch, save_checkpoint)


def _check_atomic_writes(tmp_path, monkeypatch, save_checkpoint):
    path = str(tmp_path / 'iter_4.pth')
    save_checkpoint({'state_dict': {'w': torch.ones(3)}}, path)
    assert sorted(os.listdir(tmp_path)) == ['iter_4.pth']

    def killed_before_rename(src, dst):
        raise KeyboardInterrupt('killed')

    monkeypatch.setattr(os, 'replace', killed_before_rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({'state_dict': {'w': torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ['iter_4.pth']          # no partial file left
    assert torch.equal(load(path)['state_dict']['w'], torch.ones(3))   # old one intact


def test_auto_resume_falls_back_to_previous_good_checkpoint(tmp_path):
    from effbackbones.engine.run_patches import run_patches
    with run_patches():
        _check_auto_resume_fallback(tmp_path)


def _check_auto_resume_fallback(tmp_path):
    from mmengine.runner import runner as mm_runner
    from effbackbones.checkpoint import CheckpointError
    wd = tmp_path
    assert mm_runner.find_latest_checkpoint(str(wd)) is None            # nothing yet
    for i in (2, 4):
        torch.save({'state_dict': {'w': torch.full((2,), float(i))}}, wd / f'iter_{i}.pth')
    torch.save({'state_dict': {'w': torch.tensor([float('nan'), 0.0])}}, wd / 'iter_6.pth')
    (wd / 'iter_8.pth').write_bytes(b'')
    (wd / '.iter_10.pth.effb-partial-123-abcd1234').write_bytes(b'PK\x03\x04')
    (wd / 'last_checkpoint').write_text(str(wd / 'iter_8.pth'))
    assert mm_runner.find_latest_checkpoint(str(wd)) == str(wd / 'iter_4.pth')
    assert not (wd / '.iter_10.pth.effb-partial-123-abcd1234').exists()
    (wd / 'last_checkpoint').write_text('')            # torn write of the record itself
    assert mm_runner.find_latest_checkpoint(str(wd)) == str(wd / 'iter_4.pth')
    for i in (2, 4):
        (wd / f'iter_{i}.pth').write_bytes(b'garbage')
    with pytest.raises(CheckpointError, match=r'(?s)no checkpoint in .* can be resumed.*'
                                              r'iter_8.pth: .*empty.*iter_6.pth: .*NaN'):
        mm_runner.find_latest_checkpoint(str(wd))


# -- on by default ------------------------------------------------------------------------------
def test_hooks_on_by_default_in_configs_and_train_tool():
    from mmengine.config import Config
    train_tool = load_script(osp.join(REPO, 'tools', 'train.py'), 'effb_train_tool')
    add_reliability_hooks = train_tool.add_reliability_hooks
    # every task base inherits the shared runtime base, which lists the hooks
    expected = ['effbackbones.ExactResumeHook', 'effbackbones.DivergenceGuardHook',
                'effbackbones.StrictLoadHook']
    for base in ('maskrcnn_fpn_1x_coco_adamw', 'retinanet_fpn_1x_coco_adamw',
                 'semfpn_ade20k_40k_adamw'):
        cfg = Config.fromfile(osp.join(REPO, 'configs', '_base_', base + '.py'))
        assert [h['type'] for h in cfg.custom_hooks] == expected, base
        assert cfg.custom_hooks[1]['action'] == 'stop'
    # no paper or demo config replaces the task bases' custom_hooks
    for path in glob.glob(osp.join(REPO, 'configs', '*.py')) + \
            glob.glob(osp.join(REPO, 'configs', '*', '*.py')):
        if '_base_' not in path:
            assert 'custom_hooks' not in open(path).read(), path
    cfg = Config.fromfile(osp.join(REPO, SEG))
    assert [h['type'] for h in cfg.custom_hooks] == expected
    plain = Config(dict(custom_hooks=[dict(type='EMAHook'),
                                      dict(type='DivergenceGuardHook', action='skip')]))
    add_reliability_hooks(plain)
    assert plain.custom_hooks == [dict(type='EMAHook'),
                                  dict(type='DivergenceGuardHook', action='skip'),
                                  dict(type='effbackbones.ExactResumeHook')]


def test_ensure_custom_hook_adds_once_and_keeps_other_entries():
    from mmengine.config import Config
    from effbackbones.engine import DeployHook, StrictLoadHook
    from effbackbones.utils.launch import add_strict_load_hook, ensure_custom_hook
    built = DeployHook()        # a built hook object, not a config dict
    cfg = Config(dict(custom_hooks=[built, dict(type=StrictLoadHook, priority='LOW')]))
    ensure_custom_hook(cfg, 'DeployHook')
    add_strict_load_hook(cfg, strict=False)
    ensure_custom_hook(cfg, 'ExactResumeHook')
    ensure_custom_hook(cfg, 'ExactResumeHook')
    assert cfg.custom_hooks == [built, dict(type=StrictLoadHook, priority='LOW', strict=False),
                                dict(type='effbackbones.ExactResumeHook')]
