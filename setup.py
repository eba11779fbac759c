"""Builds ``alterops._C`` (CPU kernels always, CUDA kernels when torch has CUDA and nvcc is
present). Build flags live in ``alterops/_config.py``; install with
``pip install --no-build-isolation .`` so pip uses the torch already installed.
"""
import glob
import importlib.util
import os
import shutil
import sys
import warnings

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_config():
    spec = importlib.util.spec_from_file_location("_alterops_config", os.path.join(HERE, "alterops", "_config.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_options()


def _rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def _extensions(opts):
    if opts["no_extension"]:
        return [], {}
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None and shutil.which("g++") is None:
        warnings.warn(
            "alterops: no C++ compiler found; installing without alterops._C (the 'cpu' and "
            "'cuda' backends will be unavailable; 'reference' and 'triton' still work)"
        )
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        sys.exit(
            "alterops: torch must be installed before alterops is built; run "
            "`pip install torch` and then `pip install --no-build-isolation .`"
        )

    os.environ.setdefault("MAX_JOBS", str(opts["build_jobs"]))
    sources = _rel(glob.glob(os.path.join(HERE, "csrc", "*.cpp")) + glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno"]
    if opts["cpu_arch"]:
        cxx_flags.append(f"-march={opts['cpu_arch']}")
    define_macros = []

    use_cuda = False
    if opts["force_cuda"]:
        use_cuda = True
    elif not opts["skip_cuda"]:
        use_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if use_cuda:
        if CUDA_HOME is None:
            sys.exit("alterops: ALTEROPS_FORCE_CUDA=1 but nvcc/CUDA_HOME was not found")
        os.environ["TORCH_CUDA_ARCH_LIST"] = opts["cuda_arch_list"]
        sources += _rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cpp")))
        define_macros.append(("ALTEROPS_WITH_CUDA", "1"))
        ext = CUDAExtension(
            "alterops._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "alterops._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


_opts = _load_config()
_ext_modules, _cmdclass = _extensions(_opts)

setup(ext_modules=_ext_modules, cmdclass=_cmdclass)
