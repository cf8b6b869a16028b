"""Print the environment effbackbones runs in (paste it into a bug report).

    python tools/collect_env.py            # everything
    python tools/collect_env.py --short    # without torch's build details (setup_env.sh's)
    python tools/collect_env.py --json

mmengine's ``collect_env`` (platform, Python, CUDA, GPUs, compilers, torch, OpenCV, mmengine) plus
what this project depends on: whether torch is a CUDA build, whether mmcv's ops hold CUDA
kernels, mmdet / mmseg, effbackbones, safetensors and the deploy runtimes (onnx, onnxruntime,
OpenVINO, NNCF).
A package that is missing or fails to import is reported as such, never skipped.
"""
import argparse
import importlib
import json
import sys
from collections import OrderedDict


def _why(err):
    first = str(err).splitlines()[0][:160] if str(err) else ''
    return f'not available ({type(err).__name__}: {first})'


def _version(module_name):
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - the report says why, the caller keeps going
        return _why(err)
    return getattr(module, '__version__', 'unknown version')


def mmcv_ops_info():
    """'CUDA 13.0 kernels (+ CPU)', 'CPU only' or why the ops library does not load."""
    try:
        from mmcv.ops import get_compiler_version, get_compiling_cuda_version
        cuda = get_compiling_cuda_version()
        compiler = get_compiler_version()
    except Exception as err:  # noqa: BLE001
        return _why(err)
    if cuda == 'not available':
        return f'CPU only (built with {compiler})'
    return f'CUDA {cuda} kernels + CPU (built with {compiler})'


def torch_build_info():
    try:
        import torch
    except Exception as err:  # noqa: BLE001
        return dict(build=f'torch not available ({err})', gpus='unknown')
    build = f'CUDA {torch.version.cuda} build' if torch.version.cuda else 'CPU build'
    if torch.version.cuda and torch.cuda.is_available():
        gpus = ', '.join('%s (sm_%d%d)' % (torch.cuda.get_device_name(i),
                                           *torch.cuda.get_device_capability(i))
                         for i in range(torch.cuda.device_count()))
    else:
        gpus = 'none'
    return dict(build=build, gpus=gpus)


def collect(short=False):
    """mmengine's report extended by this project's entries, as an ordered dict of strings."""
    info = OrderedDict()
    try:
        from mmengine.utils.dl_utils import collect_env as mmengine_collect_env
        info.update(mmengine_collect_env())
    except Exception as err:  # noqa: BLE001
        info['mmengine collect_env'] = f'not available ({type(err).__name__}: {err})'
        info['Python'] = sys.version.replace('\n', '')
    if short:
        info.pop('PyTorch compiling details', None)
    torch_info = torch_build_info()
    info['PyTorch build'] = torch_info['build']
    info['GPUs seen by torch'] = torch_info['gpus']
    info['MMCV'] = _version('mmcv')
    info['MMCV ops'] = mmcv_ops_info()
    for label, module in (('MMDetection', 'mmdet'), ('MMSegmentation', 'mmseg'),
                          ('effbackbones', 'effbackbones'), ('safetensors', 'safetensors'),
                          ('onnx', 'onnx'), ('onnxruntime', 'onnxruntime'),
                          ('OpenVINO', 'openvino'), ('NNCF', 'nncf')):
        info[label] = _version(module)
    if not info['onnxruntime'].startswith('not'):
        import onnxruntime
        info['onnxruntime providers'] = ', '.join(onnxruntime.get_available_providers())
    return OrderedDict((k, str(v)) for k, v in info.items())


def main(argv=None):
    parser = argparse.ArgumentParser(description='Print the environment effbackbones runs in.')
    parser.add_argument('--short', action='store_true', help="leave out torch's build details")
    parser.add_argument('--json', action='store_true', help='one JSON object')
    args = parser.parse_args(argv)
    info = collect(short=args.short)
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f'{key:<{width}} : {value}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
