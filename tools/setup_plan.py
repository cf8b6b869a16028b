"""The decisions of ``tools/setup_env.sh``: which torch, how mmcv 2.1.0 is built.

The shell script runs this file with the target environment's Python (standard library only, so
it runs before anything is installed):

    python tools/setup_plan.py torch        # keep the torch found, or which one to install
    python tools/setup_plan.py mmcv         # keep mmcv, install a cached wheel, or build one
    python tools/setup_plan.py patch-mmcv SRC_DIR [--cxx20]

``torch`` and ``mmcv`` print ``NAME=value`` lines for the script to ``eval`` and write their
messages to stderr. The decisions themselves (:func:`plan_torch`, :func:`plan_mmcv`) take a
:class:`Facts` record and return a plan: the unit tests give them invented facts (torch found or
missing, CPU or CUDA build, nvcc present, absent or of another major version, GPUs seen or not)
without installing anything. :func:`probe` gathers the real facts.
"""
import argparse
import dataclasses
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig

MIN_TORCH = (2, 1)
CPU_TORCH = '2.13.0'  # the CPU build pinned where no NVIDIA GPU is visible
MMCV_VERSION = '2.1.0'
CPU_TORCH_INDEX = 'https://download.pytorch.org/whl/cpu'
DEFAULT_ARCH_LIST = '9.0'  # when neither a GPU nor the torch build names one


@dataclasses.dataclass
class Facts:
    """What the target environment and the machine hold (all optional: nothing may be there)."""
    python_tag: str = 'cp311'
    torch_version: str = None  # e.g. '2.14.1+cu130'
    torch_cuda: str = None  # torch.version.cuda, e.g. '13.0'; None for a CPU build
    torch_arch_list: tuple = ()  # e.g. ('sm_75', 'sm_90'): what the torch build was compiled for
    torch_needs_cxx20: bool = False  # torch's ATen headers refuse C++17
    nvcc_version: str = None  # e.g. '13.0'
    cuda_home: str = None
    gpus: tuple = ()  # ((name, '9.0'), ...)
    mmcv_version: str = None
    mmcv_ops: str = None  # 'cpu', 'cuda 13.0', 'broken: <error>' or None (no mmcv)
    local_cpu_torch: bool = False  # pip's find-links hold torch-2.13.0+cpu
    nvidia_include_dirs: tuple = ()  # include folders of the nvidia-* wheels in site-packages
    env: dict = dataclasses.field(default_factory=dict)


def version_tuple(text):
    """'2.14.1+cu130' -> (2, 14, 1); '12.4' -> (12, 4)."""
    return tuple(int(part) for part in re.findall(r'\d+', text.split('+')[0])[:3])


def _torch_kind(facts):
    return f'CUDA {facts.torch_cuda} build' if facts.torch_cuda else 'CPU build'


# --------------------------------------------------------------------------------------- torch


def plan_torch(facts):
    """Keep a torch >= 2.1 already there; else install the CPU build (no GPU) or the CUDA build."""
    messages = []
    if facts.torch_version and version_tuple(facts.torch_version) >= MIN_TORCH:
        messages.append(f'keeping the torch found: {facts.torch_version} ({_torch_kind(facts)})')
        return dict(action='keep', pip_args=[], expect_cpu=False, messages=messages)
    if facts.torch_version:
        messages.append(f'torch {facts.torch_version} is older than '
                        f'{".".join(map(str, MIN_TORCH))}: it will be replaced')
    if facts.gpus:
        names = ', '.join(name for name, _ in facts.gpus)
        messages.append(f'NVIDIA GPU visible ({names}): installing the registry\'s default torch '
                        '(a CUDA build on Linux; it needs a recent NVIDIA driver)')
        return dict(action='install', pip_args=['torch>=2.1'], expect_cpu=False,
                    messages=messages)
    if facts.local_cpu_torch:
        messages.append(f'no NVIDIA GPU visible: installing torch {CPU_TORCH} CPU '
                        '(from the local wheel folder)')
        return dict(action='install', pip_args=[f'torch=={CPU_TORCH}'], expect_cpu=True,
                    messages=messages)
    messages.append(f'no NVIDIA GPU visible: installing torch {CPU_TORCH} CPU from '
                    f'{CPU_TORCH_INDEX} (PyPI\'s torch for Linux is the CUDA build)')
    return dict(action='install', expect_cpu=True, messages=messages,
                pip_args=[f'torch=={CPU_TORCH}+cpu', '--extra-index-url', CPU_TORCH_INDEX])


# ---------------------------------------------------------------------------------------- mmcv


def _arch_list(facts):
    """TORCH_CUDA_ARCH_LIST: the environment's, else the visible GPUs', else the torch build's."""
    if facts.env.get('TORCH_CUDA_ARCH_LIST'):
        return facts.env['TORCH_CUDA_ARCH_LIST'], 'from TORCH_CUDA_ARCH_LIST'
    if facts.gpus:
        caps = sorted({cap for _, cap in facts.gpus}, key=version_tuple)
        return ';'.join(caps), 'from the visible GPUs'
    built = [a[3:] for a in facts.torch_arch_list if re.fullmatch(r'sm_\d+a?', a)]
    if built:
        caps = sorted({f'{a[:-1]}.{a[-1]}' for a in built if a.isdigit()}, key=version_tuple)
        return ';'.join(caps), ('from the torch build (no GPU visible; set TORCH_CUDA_ARCH_LIST '
                                'to the target GPUs to build faster)')
    return DEFAULT_ARCH_LIST, 'default (no GPU visible, the torch build names none)'


def _cuda_ops_blocker(facts):
    """Why mmcv cannot get CUDA kernels here, with what to install; None when it can."""
    want = facts.torch_cuda
    if facts.env.get('EFFB_MMCV_OPS') == 'cpu':
        return 'EFFB_MMCV_OPS=cpu asks for CPU ops only'
    if not facts.nvcc_version:
        return (f'no nvcc found (torch is a CUDA {want} build). Install the CUDA {want} toolkit '
                f'(e.g. `conda install -c nvidia cuda-toolkit={want}` or NVIDIA\'s installer), '
                'make `nvcc` reachable (PATH or CUDA_HOME) and run the set-up again')
    if version_tuple(facts.nvcc_version)[0] != version_tuple(want)[0]:
        return (f'nvcc {facts.nvcc_version} ({facts.cuda_home}) does not match torch\'s CUDA {want}'
                f' (major versions differ). Install the CUDA {want} toolkit and point CUDA_HOME at '
                f'it, or install a torch built for CUDA {facts.nvcc_version}, then run the set-up '
                'again')
    return None


def _nvidia_includes(facts):
    """Headers shipped in the nvidia-* wheels (cuSPARSE, cuBLAS, ...): a CUDA 13 toolkit without
    them stops mmcv's build at 'cusparse.h: No such file or directory'. The folder of torch's CUDA
    major (nvidia/cu13/include) when there is one, else every nvidia/<lib>/include."""
    major = version_tuple(facts.torch_cuda)[0]
    own = [d for d in facts.nvidia_include_dirs if f'{os.sep}cu{major}{os.sep}' in d + os.sep]
    if own:
        return own
    return [d for d in facts.nvidia_include_dirs if not re.search(r'[/\\]cu\d+[/\\]', d)]


def mmcv_wheel_key(facts, cuda_ops, arch_list):
    """Cache folder name of an mmcv wheel: torch version, its build, and which ops it holds.
    pip's own cache knows mmcv by version only, so a CPU and a CUDA build would collide there."""
    base = facts.torch_version.split('+')[0]
    if not facts.torch_cuda:
        return f'torch{base}-cpu'
    variant = 'cu' + ''.join(str(p) for p in version_tuple(facts.torch_cuda)[:2])
    if not cuda_ops:
        return f'torch{base}-{variant}-cpuops'
    archs = '_'.join(a.replace('.', '').replace('+PTX', 'ptx')
                     for a in re.split(r'[;\s]+', arch_list) if a)
    return f'torch{base}-{variant}-sm{archs}'


def plan_mmcv(facts, cache_root):
    """Keep a working mmcv 2.1.0, install the cached wheel for this torch, or build one."""
    messages = []
    cuda_ops, arch_list = False, ''
    if facts.torch_cuda:
        blocker = _cuda_ops_blocker(facts)
        if blocker:
            messages.append(f'WARNING: mmcv ops will be built for the CPU only: {blocker}. '
                            'Without CUDA ops Mask R-CNN (RoIAlign, NMS) cannot run on a GPU.')
        else:
            cuda_ops = True
            arch_list, why = _arch_list(facts)
            messages.append(f'mmcv ops with CUDA kernels: nvcc {facts.nvcc_version} '
                            f'({facts.cuda_home}), TORCH_CUDA_ARCH_LIST={arch_list} ({why})')
    else:
        messages.append('mmcv ops for the CPU (torch is a CPU build)')
    plan = dict(cuda_ops=cuda_ops, arch_list=arch_list, cxx20=facts.torch_needs_cxx20,
                messages=messages, env={})
    has_cuda = (facts.mmcv_ops or '').startswith('cuda')
    loads = facts.mmcv_version == MMCV_VERSION and (facts.mmcv_ops == 'cpu' or has_cuda)
    if loads and (has_cuda or not cuda_ops):  # a working CUDA build is kept even without nvcc
        del messages[:]  # (what a build would do does not apply)
        messages.append(f'mmcv {MMCV_VERSION} with {facts.mmcv_ops} ops already loads with this '
                        'torch: kept')
        return dict(plan, action='keep', wheel_dir='')
    if facts.mmcv_ops and facts.mmcv_ops.startswith('broken'):
        messages.append(f'the installed mmcv does not load with this torch ({facts.mmcv_ops}): '
                        'replacing it')
    wheel_dir = os.path.join(cache_root, mmcv_wheel_key(facts, cuda_ops, arch_list))
    wheels = glob.glob(os.path.join(wheel_dir, f'mmcv-{MMCV_VERSION}-{facts.python_tag}-*.whl'))
    if wheels:
        messages.append(f'installing the mmcv wheel built earlier for this torch: {wheels[0]}')
        return dict(plan, action='install', wheel_dir=wheel_dir)
    env = {'MMCV_WITH_OPS': '1', 'FORCE_CUDA': '1' if cuda_ops else '0'}
    if cuda_ops:
        env['TORCH_CUDA_ARCH_LIST'] = arch_list
        env['CUDA_HOME'] = facts.cuda_home
        includes = _nvidia_includes(facts)
        if includes:
            env['CPATH'] = os.pathsep.join(includes + [facts.env.get('CPATH', '')]).rstrip(
                os.pathsep)
    messages.append(f'building mmcv {MMCV_VERSION} ({"CUDA kernels + CPU" if cuda_ops else "CPU"} '
                    f'ops) into {wheel_dir}' + (' with -std=c++20 (torch\'s headers need it)'
                                                 if facts.torch_needs_cxx20 else ''))
    return dict(plan, action='build', wheel_dir=wheel_dir, env=env)


# ------------------------------------------------------------------------------ mmcv's setup.py


def patch_mmcv_setup(text, cxx20):
    """mmcv 2.1.0's setup.py asks for -std=c++14 / c++17; torch >= 2.14's ATen headers stop with
    '#error C++20 or later compatible compiler is required'. Only the standard flag changes."""
    if not cxx20:
        return text
    text = re.sub(r"(['\"])-std=c\+\+1[47]\1", r"\1-std=c++20\1", text)
    return re.sub(r"(['\"])/std:c\+\+1[47]\1", r"\1/std:c++20\1", text)


# ---------------------------------------------------------------------------------------- probe


def _run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ''


def _probe_torch(facts):
    try:
        import torch
    except Exception:  # noqa: BLE001 - no torch, or one that does not load, is 'no torch'
        return
    facts.torch_version = torch.__version__.split(' ')[0]
    facts.torch_cuda = torch.version.cuda
    try:
        flags = torch._C._cuda_getArchFlags() if facts.torch_cuda else ''
        facts.torch_arch_list = tuple(flags.split())
    except Exception:  # noqa: BLE001 - older builds lack it
        facts.torch_arch_list = ()
    aten = os.path.join(os.path.dirname(torch.__file__), 'include', 'ATen', 'ATen.h')
    try:
        with open(aten) as f:
            facts.torch_needs_cxx20 = 'C++20 or later' in f.read()
    except OSError:
        facts.torch_needs_cxx20 = version_tuple(facts.torch_version) >= (2, 14)
    if not facts.gpus and facts.torch_cuda and torch.cuda.is_available():
        facts.gpus = tuple((torch.cuda.get_device_name(i),
                            '%d.%d' % torch.cuda.get_device_capability(i))
                           for i in range(torch.cuda.device_count()))


def _probe_nvcc(facts, env):
    """nvcc: CUDA_HOME / CUDA_PATH first, then /usr/local/cuda, then the one on PATH."""
    on_path = shutil.which('nvcc')
    homes = [env.get('CUDA_HOME'), env.get('CUDA_PATH'), '/usr/local/cuda',
             os.path.dirname(os.path.dirname(on_path)) if on_path else None]
    for home in filter(None, homes):
        nvcc = os.path.join(home, 'bin', 'nvcc')
        headers = os.path.join(home, 'include', 'cuda_runtime.h')
        if os.access(nvcc, os.X_OK) and os.path.exists(headers):
            found = re.search(r'release (\d+\.\d+)', _run([nvcc, '--version']))
            if found:
                facts.nvcc_version, facts.cuda_home = found.group(1), home
                return


def _probe_gpus():
    out = _run(['nvidia-smi', '--query-gpu=name,compute_cap', '--format=csv,noheader'])
    gpus = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.rsplit(',', 1)]
        if len(parts) == 2 and re.fullmatch(r'\d+\.\d+', parts[1]):
            gpus.append((parts[0], parts[1]))
    return tuple(gpus)


def _probe_mmcv(facts):
    try:
        import mmcv
    except Exception:  # noqa: BLE001
        return
    facts.mmcv_version = mmcv.__version__
    try:
        from mmcv.ops import get_compiling_cuda_version
        compiled = get_compiling_cuda_version()
        facts.mmcv_ops = 'cpu' if compiled == 'not available' else f'cuda {compiled}'
    except Exception as err:  # noqa: BLE001 - an ops library built for another torch
        first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        facts.mmcv_ops = f'broken: {first}'


def _local_cpu_torch():
    out = _run([sys.executable, '-m', 'pip', 'config', 'list'])
    dirs = re.findall(r"find-links='([^']*)'", out) + os.environ.get('PIP_FIND_LINKS', '').split()
    return any(glob.glob(os.path.join(d, f'torch-{CPU_TORCH}+cpu-*.whl'))
               for ds in dirs for d in ds.split() if os.path.isdir(d))


def probe():
    import warnings
    warnings.simplefilter('ignore')  # e.g. torch's 'Failed to initialize NumPy' before numpy is in
    env = dict(os.environ)
    facts = Facts(python_tag=f'cp{sys.version_info[0]}{sys.version_info[1]}', env={
        k: env[k] for k in ('TORCH_CUDA_ARCH_LIST', 'EFFB_MMCV_OPS', 'CPATH') if env.get(k)})
    facts.gpus = _probe_gpus()
    _probe_torch(facts)
    _probe_nvcc(facts, env)
    _probe_mmcv(facts)
    facts.local_cpu_torch = _local_cpu_torch()
    site = sysconfig.get_paths()['purelib']
    facts.nvidia_include_dirs = tuple(sorted(glob.glob(os.path.join(site, 'nvidia', '*',
                                                                    'include'))))
    return facts


# ------------------------------------------------------------------------------------------ CLI


def _emit(values, messages):
    for message in messages:
        print(f'[setup] {message}', file=sys.stderr)
    for name, value in values.items():
        if isinstance(value, (list, tuple)):
            value = ' '.join(shlex.quote(str(v)) for v in value)
            print(f'{name}=({value})')
        else:
            print(f'{name}={shlex.quote(str(value))}')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('step', choices=['torch', 'mmcv', 'patch-mmcv', 'facts'])
    parser.add_argument('src', nargs='?', help='patch-mmcv: the unpacked mmcv sdist')
    parser.add_argument('--cxx20', action='store_true')
    parser.add_argument('--cache', default=os.path.join(
        os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache')), 'effbackbones',
        'mmcv-wheels'))
    args = parser.parse_args(argv)
    if args.step == 'patch-mmcv':
        path = os.path.join(args.src, 'setup.py')
        with open(path) as f:
            text = f.read()
        with open(path, 'w') as f:
            f.write(patch_mmcv_setup(text, args.cxx20))
        return 0
    facts = probe()
    if args.step == 'facts':
        print(json.dumps(dataclasses.asdict(facts), indent=1))
    elif args.step == 'torch':
        plan = plan_torch(facts)
        _emit(dict(TORCH_ACTION=plan['action'], TORCH_PIP_ARGS=plan['pip_args'],
                   TORCH_EXPECT_CPU=int(plan['expect_cpu'])), plan['messages'])
    else:
        plan = plan_mmcv(facts, os.environ.get('EFFB_MMCV_WHEEL_CACHE') or args.cache)
        build_env = [f'{k}={v}' for k, v in plan['env'].items()]
        _emit(dict(MMCV_ACTION=plan['action'], MMCV_WHEEL_DIR=plan['wheel_dir'],
                   MMCV_CUDA_OPS=int(plan['cuda_ops']), MMCV_CXX20=int(plan['cxx20']),
                   MMCV_BUILD_ENV=build_env), plan['messages'])
    return 0


if __name__ == '__main__':
    sys.exit(main())
