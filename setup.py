"""Builds alterops' shared objects (``tools/build_libs.py``) into ``alterops/_lib``:

- the CPU kernels once per instruction-set level (generic, AVX2+FMA, AVX-512), chosen at run
  time, so one build runs on every x86-64 CPU;
- their bindings on the LibTorch stable ABI, so one build runs on every torch >= 2.11;
- the CUDA kernels, when torch is a CUDA build and nvcc is found.

No shared object uses the Python C API: the wheel is ``py3-none-<platform>``, one per platform
for every Python >= 3.10. Build with ``pip install --no-build-isolation .`` (or ``pip wheel
--no-build-isolation --no-deps .``) so the installed torch's headers are used; build flags are
in ``alterops/_config.py``.
"""
import glob
import importlib.util
import os
import shutil
import sys
import sysconfig
import warnings

from setuptools import Distribution, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70
    try:
        from wheel.bdist_wheel import bdist_wheel
    except ImportError:  # no wheel package: pip cannot build a wheel here anyway
        bdist_wheel = None

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_config = _load("_alterops_config", os.path.join("alterops", "_config.py"))


class BinaryDistribution(Distribution):
    """A platform wheel: it carries shared objects."""

    def has_ext_modules(self):
        return not _config.build_options()["no_extension"]


class BuildLibs(build_ext):
    """Builds the shared objects (not Python extension modules) with tools/build_libs.py."""

    def run(self):
        opts = _config.build_options()
        if opts["no_extension"]:
            return
        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx) is None and shutil.which("g++") is None:
            warnings.warn("alterops: no C++ compiler found; installing without the compiled kernels (the 'cpu' "
                          "and 'cuda' backends will be unavailable; 'reference' and 'triton' still work)")
            return
        try:
            import torch  # noqa: F401
        except ImportError:
            sys.exit("alterops: torch must be installed before alterops is built; run `pip install torch` "
                     "and then `pip install --no-build-isolation .`")
        build_libs = _load("_alterops_build_libs", os.path.join("tools", "build_libs.py"))
        inplace = self.inplace or getattr(self, "editable_mode", False)
        out = os.path.join(HERE if inplace else self.build_lib, "alterops", "_lib")
        cuda = None
        if opts["force_cuda"]:
            cuda = True
        elif opts["skip_cuda"]:
            cuda = False
        self._outputs = build_libs.build(
            out, cpu_arch=opts["cpu_arch"], cuda=cuda, cuda_arch_list=opts["cuda_arch_list"],
            jobs=opts["build_jobs"], debug=opts["debug"], verbose=self.verbose > 1)

    def get_outputs(self):
        return list(getattr(self, "_outputs", []))

    def get_output_mapping(self):
        return {}


class BuildPy(build_py):
    """Also ships the user docs inside the package (alterops/docs)."""

    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            dst = os.path.join(self.build_lib, "alterops", "docs")
            os.makedirs(dst, exist_ok=True)
            for f in glob.glob(os.path.join(HERE, "docs", "*.md")):
                shutil.copy(f, dst)


cmdclass = {"build_ext": BuildLibs, "build_py": BuildPy}
if bdist_wheel is not None:
    class BdistWheel(bdist_wheel):
        """py3-none-<platform>: no Python C API, so one wheel serves every Python >= 3.10."""

        def get_tag(self):
            _, _, plat = super().get_tag()
            return "py3", "none", plat

    cmdclass["bdist_wheel"] = BdistWheel

setup(distclass=BinaryDistribution, cmdclass=cmdclass)
