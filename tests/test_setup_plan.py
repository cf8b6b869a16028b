"""tools/setup_plan.py (the decisions of tools/setup_env.sh) on invented facts, nothing installed;
tools/collect_env.py on this environment."""
import json
import os.path as osp
import subprocess
import sys

import pytest

from conftest import REPO, load_script

plan = load_script(osp.join(REPO, 'tools', 'setup_plan.py'), 'effb_setup_plan')
Facts = plan.Facts
H100 = (('NVIDIA H100 80GB HBM3', '9.0'),)


def _cuda_torch(**kw):
    base = dict(torch_version='2.14.1+cu130', torch_cuda='13.0', torch_needs_cxx20=True,
                torch_arch_list=('sm_75', 'sm_80', 'sm_90', 'sm_120'),
                nvcc_version='13.0', cuda_home='/usr/local/cuda-13.0',
                nvidia_include_dirs=('/v/site-packages/nvidia/cu13/include',))
    base.update(kw)
    return Facts(**base)


# ------------------------------------------------------------------------------------ torch
@pytest.mark.parametrize('version,cuda', [('2.13.0+cpu', None), ('2.14.1+cu130', '13.0'),
                                          ('2.1.0', '12.1')])
def test_torch_found_is_kept_cpu_or_cuda(version, cuda):
    got = plan.plan_torch(Facts(torch_version=version, torch_cuda=cuda, gpus=H100))
    assert got['action'] == 'keep' and got['pip_args'] == []
    assert version in got['messages'][0]
    assert ('CUDA ' + cuda if cuda else 'CPU build') in got['messages'][0]


def test_torch_missing_without_gpu_installs_the_cpu_build():
    local = plan.plan_torch(Facts(local_cpu_torch=True))
    assert local['pip_args'] == ['torch==2.13.0'] and local['expect_cpu']   # today's path
    remote = plan.plan_torch(Facts(local_cpu_torch=False))
    assert remote['pip_args'] == ['torch==2.13.0+cpu', '--extra-index-url',
                                  'https://download.pytorch.org/whl/cpu']
    assert remote['expect_cpu']


def test_torch_missing_with_gpu_installs_the_registry_cuda_build():
    got = plan.plan_torch(Facts(gpus=H100, local_cpu_torch=True))
    assert got['action'] == 'install' and got['pip_args'] == ['torch>=2.1']
    assert not got['expect_cpu'] and 'H100' in got['messages'][0]


def test_old_torch_is_replaced():
    got = plan.plan_torch(Facts(torch_version='1.13.1+cu117', torch_cuda='11.7'))
    assert got['action'] == 'install' and 'older than 2.1' in got['messages'][0]


# ------------------------------------------------------------------------------------- mmcv
def test_cpu_torch_builds_cpu_ops_into_its_own_cache(tmp_path):
    got = plan.plan_mmcv(Facts(torch_version='2.13.0+cpu'), str(tmp_path))
    assert got['action'] == 'build' and not got['cuda_ops'] and not got['cxx20']
    assert got['wheel_dir'] == str(tmp_path / 'torch2.13.0-cpu')
    assert got['env'] == {'MMCV_WITH_OPS': '1', 'FORCE_CUDA': '0'}


def test_cuda_torch_with_matching_nvcc_builds_cuda_kernels(tmp_path):
    got = plan.plan_mmcv(_cuda_torch(gpus=H100), str(tmp_path))
    assert got['action'] == 'build' and got['cuda_ops'] and got['cxx20']
    env = got['env']
    assert env['FORCE_CUDA'] == '1' and env['TORCH_CUDA_ARCH_LIST'] == '9.0'
    assert env['CUDA_HOME'] == '/usr/local/cuda-13.0'
    assert env['CPATH'] == '/v/site-packages/nvidia/cu13/include'
    assert got['wheel_dir'] == str(tmp_path / 'torch2.14.1-cu130-sm90')
    assert 'visible GPUs' in got['messages'][0]


def test_arch_list_from_environment_then_torch_build(tmp_path):
    env = plan.plan_mmcv(_cuda_torch(gpus=H100, env={'TORCH_CUDA_ARCH_LIST': '8.0;9.0+PTX'}),
                         str(tmp_path))
    assert env['arch_list'] == '8.0;9.0+PTX'
    assert env['wheel_dir'].endswith('torch2.14.1-cu130-sm80_90ptx')
    no_gpu = plan.plan_mmcv(_cuda_torch(), str(tmp_path))
    assert no_gpu['arch_list'] == '7.5;8.0;9.0;12.0' and 'torch build' in no_gpu['messages'][0]
    bare = plan.plan_mmcv(_cuda_torch(torch_arch_list=()), str(tmp_path))
    assert bare['arch_list'] == '9.0'


def test_nvcc_missing_means_cpu_ops_and_says_what_to_install(tmp_path):
    got = plan.plan_mmcv(_cuda_torch(nvcc_version=None, cuda_home=None), str(tmp_path))
    assert not got['cuda_ops'] and got['env']['FORCE_CUDA'] == '0'
    assert got['wheel_dir'].endswith('torch2.14.1-cu130-cpuops')
    text = got['messages'][0]
    assert text.startswith('WARNING') and 'no nvcc found' in text
    assert 'CUDA 13.0 toolkit' in text and 'cuda-toolkit=13.0' in text


def test_nvcc_of_another_major_version_means_cpu_ops(tmp_path):
    got = plan.plan_mmcv(_cuda_torch(nvcc_version='12.4', cuda_home='/opt/cuda-12.4'),
                         str(tmp_path))
    assert not got['cuda_ops']
    assert 'nvcc 12.4 (/opt/cuda-12.4) does not match torch\'s CUDA 13.0' in got['messages'][0]
    # another minor version of the same major is fine (CUDA minor-version compatibility)
    assert plan.plan_mmcv(_cuda_torch(nvcc_version='13.1'), str(tmp_path))['cuda_ops']


def test_cu12_wheel_headers_are_put_on_cpath(tmp_path):
    dirs = ('/s/nvidia/cublas/include', '/s/nvidia/cusparse/include')
    got = plan.plan_mmcv(_cuda_torch(torch_cuda='12.8', nvcc_version='12.8',
                                     nvidia_include_dirs=dirs), str(tmp_path))
    assert got['env']['CPATH'] == ':'.join(dirs)


def test_working_mmcv_is_kept(tmp_path):
    cpu = plan.plan_mmcv(Facts(torch_version='2.13.0+cpu', mmcv_version='2.1.0', mmcv_ops='cpu'),
                         str(tmp_path))
    assert cpu['action'] == 'keep'
    # a CUDA build stays even where nvcc is gone
    cuda = plan.plan_mmcv(_cuda_torch(nvcc_version=None, mmcv_version='2.1.0',
                                      mmcv_ops='cuda 13.0'), str(tmp_path))
    assert cuda['action'] == 'keep'
    assert len(cuda['messages']) == 1 and cuda['messages'][0].endswith('kept')  # no nvcc warning


def test_cpu_mmcv_on_cuda_torch_is_rebuilt_with_kernels(tmp_path):
    got = plan.plan_mmcv(_cuda_torch(mmcv_version='2.1.0', mmcv_ops='cpu'), str(tmp_path))
    assert got['action'] == 'build' and got['cuda_ops']
    broken = plan.plan_mmcv(Facts(torch_version='2.13.0+cpu', mmcv_version='2.1.0',
                                  mmcv_ops='broken: undefined symbol'), str(tmp_path))
    assert broken['action'] == 'build' and 'does not load' in broken['messages'][-2]


def test_cached_wheel_is_installed_instead_of_building(tmp_path):
    folder = tmp_path / 'torch2.14.1-cu130-sm90'
    folder.mkdir()
    (folder / 'mmcv-2.1.0-cp311-cp311-linux_x86_64.whl').write_bytes(b'')
    got = plan.plan_mmcv(_cuda_torch(gpus=H100), str(tmp_path))
    assert got['action'] == 'install' and got['wheel_dir'] == str(folder)
    # another Python's wheel in the folder is not taken
    other = plan.plan_mmcv(_cuda_torch(gpus=H100, python_tag='cp312'), str(tmp_path))
    assert other['action'] == 'build'


def test_mmcv_setup_patch_only_changes_the_standard():
    src = ("        cuda_args = os.getenv('MMCV_CUDA_ARGS')\n"
           "            'nvcc': [cuda_args, '-std=c++14'] if cuda_args else ['-std=c++14'],\n"
           "                extra_compile_args['cxx'] = ['-std=c++17']\n"
           "                extra_compile_args['cxx'] = ['/std:c++17']\n")
    assert plan.patch_mmcv_setup(src, cxx20=False) == src
    out = plan.patch_mmcv_setup(src, cxx20=True)
    assert out.count("'-std=c++20'") == 3 and "'/std:c++20'" in out
    assert [a for a in out.splitlines() if 'std' not in a] == \
        [a for a in src.splitlines() if 'std' not in a]


def test_cli_prints_shell_assignments_for_this_environment():
    out = subprocess.run([sys.executable, osp.join(REPO, 'tools', 'setup_plan.py'), 'torch'],
                         capture_output=True, text=True, check=True)
    import torch
    assert 'TORCH_ACTION=keep' in out.stdout.splitlines()
    assert torch.__version__ in out.stderr


# -------------------------------------------------------------------------------- collect_env
def test_collect_env_reports_torch_mmcv_ops_and_runtimes():
    out = subprocess.run([sys.executable, osp.join(REPO, 'tools', 'collect_env.py'), '--json',
                          '--short'], capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    import mmcv
    import torch
    assert info['PyTorch'] == torch.__version__
    assert info['PyTorch build'] == (f'CUDA {torch.version.cuda} build' if torch.version.cuda
                                     else 'CPU build')
    from mmcv.ops import get_compiling_cuda_version
    cuda_ops = get_compiling_cuda_version()
    assert info['MMCV'] == mmcv.__version__
    assert info['MMCV ops'].startswith('CPU only' if cuda_ops == 'not available'
                                       else f'CUDA {cuda_ops} kernels')
    for key in ('MMDetection', 'MMSegmentation', 'effbackbones', 'onnxruntime', 'OpenVINO',
                'NNCF', 'safetensors', 'GPUs seen by torch'):
        assert key in info
    assert 'PyTorch compiling details' not in info
