from .launch import (check_datasets, check_pretrained_files, detect_toolbox, prepare_config,
                     register_toolbox)

__all__ = ['check_datasets', 'check_pretrained_files', 'detect_toolbox', 'prepare_config',
           'register_toolbox']
