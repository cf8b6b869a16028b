"""Run a training script, stopping at a known point so that a test can kill -9 it there.

    python tests/killpoint_train.py ITER tools/train.py CONFIG [ARGS...]

When training iteration ITER is about to start (ITER iterations done, its batch loaded, data
workers running ahead), the process prints ``KILLPOINT iter=ITER`` and waits to be killed.
"""
import runpy
import sys
import time

from mmengine.runner import Runner

stop_at = int(sys.argv[1])
script = sys.argv[2]
sys.argv = sys.argv[2:]
call_hook = Runner.call_hook


def call_hook_or_wait(self, fn_name, **kwargs):
    if fn_name == 'before_train_iter' and self.iter == stop_at:
        print(f'KILLPOINT iter={stop_at}', flush=True)
        while True:
            time.sleep(1)
    return call_hook(self, fn_name, **kwargs)


Runner.call_hook = call_hook_or_wait
runpy.run_path(script, run_name='__main__')
