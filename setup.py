"""Build script: a pure-Python package plus, when nvcc is available, the CUDA extension
``pcd_kernels._C`` compiled from csrc/ and python/ through CMake and ninja.

Environment:
  PCD_KERNELS_NO_CUDA=1        skip the extension (pure-Python install)
  PCD_KERNELS_CUDA_ARCHS=...   CMAKE_CUDA_ARCHITECTURES (default "80;90a")
  CUDA_HOME / CUDA_PATH        where to look for nvcc before PATH and /usr/local/cuda
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _find_nvcc():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def _find_tool(name):
    # pip runs this script with the venv's python but not always with the venv's bin on PATH.
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else shutil.which(name)


def _say(message):
    print(f"pcd_kernels setup: {message}", file=sys.stderr, flush=True)


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        cmake = _find_tool("cmake")
        if cmake is None:
            raise RuntimeError("pcd_kernels: building the CUDA extension needs cmake >= 3.24 "
                               "(pip install cmake), or set PCD_KERNELS_NO_CUDA=1")
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = ROOT / "build" / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_CUDA_COMPILER={NVCC}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        ninja = _find_tool("ninja")
        if ninja and not (build_dir / "CMakeCache.txt").exists():
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        _say(f"building pcd_kernels._C with {NVCC} (CUDA archs: "
             f"{os.environ.get('PCD_KERNELS_CUDA_ARCHS', '80;90a')})")
        subprocess.run([cmake, str(ROOT), *args], cwd=build_dir, check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run([cmake, "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


NVCC = None if os.environ.get("PCD_KERNELS_NO_CUDA") == "1" else _find_nvcc()
if NVCC is None:
    reason = ("PCD_KERNELS_NO_CUDA=1" if os.environ.get("PCD_KERNELS_NO_CUDA") == "1"
              else "nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    _say(f"installing the pure-Python package without the CUDA extension: {reason}. "
         "The torch and Triton backends work; backend='cuda' will say it is not built.")
    ext_modules, cmdclass = [], {}
else:
    ext_modules, cmdclass = [CMakeExtension("pcd_kernels._C")], {"build_ext": CMakeBuild}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
