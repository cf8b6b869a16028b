"""Runner hooks."""
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

from ..checkpoint import effbackbones_modules
from ..registry import HOOKS


@HOOKS.register_module()
class DeployHook(Hook):
    """Switch every effbackbones backbone of the model to deploy mode before testing.

    Runs after the checkpoint is loaded (``before_test``), so the folded weights are the
    trained ones. ``tools/test.py --deploy`` adds it.
    """
    priority = 'VERY_HIGH'

    def before_test(self, runner):
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        backbones = effbackbones_modules(model)
        if not backbones:
            raise RuntimeError('DeployHook: the model has no effbackbones backbone to deploy')
        for _, backbone in backbones:
            backbone.switch_to_deploy()
        switched = [prefix[:-1] or type(model).__name__ for prefix, _ in backbones]
        runner.logger.info(f'deploy mode: BN and layer scales folded in {switched}')
