"""Runner hooks."""
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

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
        switched = [name for name, m in model.named_modules()
                    if hasattr(m, 'switch_to_deploy') and hasattr(m, 'arch_settings')]
        for name in switched:
            model.get_submodule(name).switch_to_deploy()
        if not switched:
            raise RuntimeError('DeployHook: the model has no effbackbones backbone to deploy')
        runner.logger.info(f'deploy mode: BN and layer scales folded in {switched}')
