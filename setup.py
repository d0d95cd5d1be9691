"""Builds fwdkern._C: C++17 CPU kernels (always) + CUDA kernels (when nvcc is found).

Environment variables (flash-attention style):
  FWDKERN_CUDA=auto|0|1       build the CUDA kernels: auto = if nvcc is found (default)
  FWDKERN_CUDA_ARCHS="80;90"  SM architectures (default sm_80 and sm_90)
  FWDKERN_NVCC=/path/nvcc     nvcc to use (default: $CUDA_HOME/bin/nvcc, then PATH)
  FWDKERN_CPU_NATIVE=1|0      -march=native for the CPU kernels (default 1: a source
                              build runs where it is built; use 0 for portable wheels)
  FWDKERN_DEBUG=1             -O0 -g
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
INCLUDE = str(ROOT / "csrc" / "include")


def _env(name, default):
    return os.environ.get(name, default).strip()


def find_nvcc():
    explicit = _env("FWDKERN_NVCC", "")
    if explicit:
        return explicit
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_wanted():
    mode = _env("FWDKERN_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"FWDKERN_CUDA must be auto, 0 or 1 (got {mode!r})")
    nvcc = find_nvcc()
    if mode == "0":
        return None
    if nvcc is None:
        if mode == "1":
            sys.exit("FWDKERN_CUDA=1 but nvcc was not found (set FWDKERN_NVCC or CUDA_HOME)")
        print("fwdkern: nvcc not found, building the CPU kernels only", file=sys.stderr)
        return None
    return nvcc


DEBUG = _env("FWDKERN_DEBUG", "0") == "1"
NVCC = cuda_wanted()
CUDA_SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))

cxx_flags = ["-O0", "-g"] if DEBUG else ["-O3"]
cxx_flags += ["-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
if _env("FWDKERN_CPU_NATIVE", "1") == "1":
    cxx_flags.append("-march=native")
link_flags = ["-fopenmp"]
macros = []
if NVCC:
    macros.append(("FWDKERN_WITH_CUDA", "1"))


class BuildExt(build_ext):
    """Compiles csrc/cuda/*.cu with nvcc and links them (static cudart) into _C."""

    def build_extension(self, ext):
        if NVCC:
            archs = [a.strip().replace("sm_", "") for a in _env("FWDKERN_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a.strip()]
            gencode = []
            for a in archs:
                gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
            # PTX of the newest arch too, so newer GPUs can JIT it.
            gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
            build_tmp = Path(self.build_temp) / "cuda"
            build_tmp.mkdir(parents=True, exist_ok=True)
            objs = []
            for src in CUDA_SOURCES:
                obj = build_tmp / (Path(src).stem + ".o")
                cmd = [NVCC, "-std=c++17", "-O0" if DEBUG else "-O3", "-I", INCLUDE, "-Xcompiler", "-fPIC",
                       "--expt-relaxed-constexpr", *gencode, "-c", str(ROOT / src), "-o", str(obj)]
                print(" ".join(cmd))
                subprocess.check_call(cmd)
                objs.append(str(obj))
            ext.extra_objects = list(ext.extra_objects or []) + objs
            cuda_home = Path(NVCC).resolve().parent.parent
            libdirs = [str(cuda_home / d) for d in ("lib64", "lib", "targets/x86_64-linux/lib") if (cuda_home / d).exists()]
            ext.library_dirs = list(ext.library_dirs or []) + libdirs
            # Static cudart: no runtime dependency on a particular libcudart.so.
            ext.libraries = list(ext.libraries or []) + ["cudart_static", "rt", "dl", "pthread"]
        super().build_extension(ext)


ext = Pybind11Extension(
    "fwdkern._C",
    sources=[*sorted(str(p.relative_to(ROOT)) for p in (ROOT / "python").glob("*.cpp")), *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))],
    include_dirs=[INCLUDE],
    define_macros=macros,
    extra_compile_args=cxx_flags,
    extra_link_args=link_flags,
    cxx_std=17,
)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt})
