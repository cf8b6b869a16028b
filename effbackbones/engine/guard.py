"""Divergence guard: the first non-finite loss or gradient norm stops training loudly.

Without it a diverged run keeps going and its checkpoints fill with NaN. With it:

* the loss is checked before its backward pass and the gradient norm before the optimizer step,
  so a non-finite step is never applied to the weights;
* ``action='stop'`` (default) ends training with :class:`TrainingDiverged` naming the iteration
  and the loss terms; ``action='skip'`` drops that step and goes on, and stops after
  ``max_consecutive_skips`` non-finite steps in a row. With ``AmpOptimWrapper`` the gradient
  check is left to its loss scaler (which skips inf/NaN steps and lowers the scale), and under
  ``'skip'`` a non-finite loss is also passed to it, so that it can lower the scale;
* a checkpoint holding non-finite tensors is never written.
"""
import functools
import math

import torch
import torch.distributed as dist
from mmengine.hooks import Hook
from mmengine.optim import AmpOptimWrapper, OptimWrapperDict

from ..checkpoint import nonfinite_tensors
from ..registry import HOOKS


class TrainingDiverged(RuntimeError):
    """Training produced a non-finite loss or gradient (see :class:`DivergenceGuardHook`)."""


def _agreed(finite, device):
    """All ranks decide together whether a step is applied (DDP would hang otherwise)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor(float(finite), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())
    return finite


def _grad_norm(optim_wrapper):
    grads = [p.grad.detach() for group in optim_wrapper.optimizer.param_groups
             for p in group['params'] if p.grad is not None]
    if not grads:
        return 0.0
    norms = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
    return float(torch.linalg.vector_norm(norms))


def _fmt(value):
    value = float(value.detach().float().mean()) if torch.is_tensor(value) else float(value)
    return f'{value:.4g}'


@HOOKS.register_module()
class DivergenceGuardHook(Hook):
    """Stop (or skip) the first training step whose loss or gradient norm is not finite.

    Args:
        action (str): ``'stop'`` ends training with :class:`TrainingDiverged`; ``'skip'`` drops
            the step (for AMP runs, where an overflowing step now and then is expected).
        check_grad_norm (bool): also check the gradient norm before each optimizer step
            (plain ``OptimWrapper``; AMP's loss scaler does its own check).
        max_consecutive_skips (int): with ``action='skip'``, stop after this many non-finite
            steps in a row.
    """
    # before the logger, param scheduler and checkpoint hooks see the iteration
    priority = 'ABOVE_NORMAL'

    def __init__(self, action='stop', check_grad_norm=True, max_consecutive_skips=20):
        if action not in ('stop', 'skip'):
            raise ValueError(f"DivergenceGuardHook: action must be 'stop' or 'skip', "
                             f'got {action!r}')
        if int(max_consecutive_skips) < 1:
            raise ValueError('DivergenceGuardHook: max_consecutive_skips must be >= 1, got '
                             f'{max_consecutive_skips}')
        self.action = action
        self.check_grad_norm = check_grad_norm
        self.max_consecutive_skips = int(max_consecutive_skips)
        self._problem = None        # what was not finite in the current iteration
        self._skipped_in_a_row = 0

    def before_train(self, runner):
        wrappers = runner.optim_wrapper
        wrappers = wrappers.values() if isinstance(wrappers, OptimWrapperDict) else [wrappers]
        for wrapper in wrappers:
            self._guard(wrapper)

    def _guard(self, wrapper):
        if getattr(wrapper, '_effb_guarded', False):
            return
        hook = self
        amp = isinstance(wrapper, AmpOptimWrapper)
        backward, step = wrapper.backward, wrapper.step

        @functools.wraps(backward)
        def guarded_backward(loss, **kwargs):
            finite = _agreed(bool(torch.isfinite(loss.detach()).all()), loss.device)
            if finite:
                return backward(loss, **kwargs)
            hook._problem = hook._problem or 'loss'
            if amp and hook.action == 'skip':
                return backward(loss, **kwargs)  # the loss scaler skips it, lowers the scale

        # wraps: keeps the mark of mmengine's scheduler step counter (else it warns)
        @functools.wraps(step)
        def guarded_step(**kwargs):
            if hook._problem is not None and not (amp and hook.action == 'skip'):
                return None                      # not applied; update_params zeroes the grads
            if hook.check_grad_norm and not amp:
                norm = _grad_norm(wrapper)
                if not math.isfinite(norm):
                    hook._problem = f'gradient norm ({norm})'
                    return None
            return step(**kwargs)

        wrapper.backward = guarded_backward
        wrapper.step = guarded_step
        wrapper._effb_guarded = True

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        problem, self._problem = self._problem, None
        losses = {k: v for k, v in (outputs or {}).items() if 'loss' in k}
        bad = [k for k, v in losses.items() if not bool(torch.isfinite(torch.as_tensor(v)).all())]
        if problem is None and not bad:
            self._skipped_in_a_row = 0
            return
        # a loss term outside the summed loss can only be seen after the step
        applied = problem is None
        terms = ', '.join(f'{k}={_fmt(v)}' for k, v in losses.items()) or 'none logged'
        what = (f'non-finite {problem or "logged loss term"} at iteration {runner.iter + 1} '
                f'(epoch {runner.epoch + 1}); loss terms: {terms}' +
                (f'; not finite: {", ".join(bad)}' if bad else ''))
        step = 'The step was applied' if applied else 'The step was not applied'
        self._skipped_in_a_row += 1
        if self.action == 'skip' and self._skipped_in_a_row <= self.max_consecutive_skips:
            skipped = 'The step was applied' if applied else 'The step was skipped'
            runner.logger.warning(f'DivergenceGuardHook: {what}. {skipped} '
                                  f'({self._skipped_in_a_row} in a row).')
            return
        last = runner.message_hub.get_info('last_ckpt')
        why = ('' if self.action == 'stop' else
               f'{self._skipped_in_a_row} non-finite steps in a row (max_consecutive_skips='
               f'{self.max_consecutive_skips}); ')
        raise TrainingDiverged(
            f'training diverged: {why}{what}. {step} and no checkpoint was written after it '
            f'(last checkpoint: {last or "none"}). Lower the learning rate, clip gradients '
            f'(optim_wrapper.clip_grad) or check the data, then resume; AMP runs can use '
            f"DivergenceGuardHook(action='skip').")

    def before_save_checkpoint(self, runner, checkpoint):
        bad = nonfinite_tensors({k: checkpoint[k] for k in ('state_dict', 'optimizer')
                                 if k in checkpoint})
        if bad:
            raise TrainingDiverged(
                f'refusing to write a checkpoint at iteration {runner.iter}: non-finite tensors '
                f'in {", ".join(bad[:8])}' + (f' (+{len(bad) - 8} more)' if len(bad) > 8 else ''))
