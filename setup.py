"""Build of capsparse and its native extensions.

Environment gates:
  CAPSPARSE_BUILD_CPP=0     skip the C++ CPU extension ``capsparse._C`` (the reference backend still works)
  CAPSPARSE_BUILD_CUDA=0/1  force the CUDA extension ``capsparse._C_cuda`` off/on; by default it is built
                            only when the installed torch is a CUDA build and nvcc is found
  CAPSPARSE_CUDA_ARCHS      e.g. "80;90a" (default), CAPSPARSE_MARCH: -march value for the CPU build
                            (default "native": the host's vector instructions, AVX2/FMA or AVX-512)
  MAX_JOBS                  parallel compile jobs (ninja)
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _log(message):
    print(f"capsparse setup: {message}", file=sys.stderr)


def _march_flags():
    march = os.environ.get("CAPSPARSE_MARCH", "native")
    if not march:
        return []
    try:
        ok = subprocess.run(["c++", f"-march={march}", "-x", "c++", "-E", "-", "-o", os.devnull],
                            input=b"", capture_output=True).returncode == 0
    except OSError:
        ok = False
    return [f"-march={march}"] if ok else []


def _extensions():
    if os.environ.get("CAPSPARSE_BUILD_CPP", "1") == "0":
        _log("CAPSPARSE_BUILD_CPP=0: skipping the C++ extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _log("torch is not installed in the build environment: install torch first and use "
             "`pip install --no-build-isolation -e .`; building without native extensions")
        return [], {}
    exts = []
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    if cpu_sources:
        exts.append(CppExtension(
            "capsparse._C", cpu_sources,
            extra_compile_args={"cxx": ["-O3", "-fopenmp", "-std=c++17", *_march_flags()]},
            extra_link_args=["-fopenmp"]))
    want_cuda = os.environ.get("CAPSPARSE_BUILD_CUDA")
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/binding_cuda.cpp"))
    has_cuda_torch = bool(torch.version.cuda) and shutil.which("nvcc") is not None
    if want_cuda == "1" or (want_cuda is None and has_cuda_torch):
        if not cuda_sources:
            _log("no CUDA sources in csrc/cuda; skipping the CUDA extension")
        else:
            archs = os.environ.get("CAPSPARSE_CUDA_ARCHS", "80;90a").split(";")
            gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
            exts.append(CUDAExtension(
                "capsparse._C_cuda", cuda_sources,
                extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                                    "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", *gencode]}))
    else:
        reason = "CAPSPARSE_BUILD_CUDA=0" if want_cuda == "0" else "torch has no CUDA or nvcc is missing"
        _log(f"skipping the CUDA extension ({reason}); the cuda backend will be unavailable")
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()

kernel_packages = ["capsparse.kernels"] + [
    "capsparse.kernels." + os.path.relpath(d, "kernels").replace(os.sep, ".")
    for d in sorted(glob.glob("kernels/*/")) if os.path.exists(os.path.join(d, "__init__.py"))]

setup(
    packages=["capsparse", "capsparse.backends", "capsparse.ops", "capsparse.nn", "capsparse.pruning",
              "capsparse.cap", "capsparse.data", *kernel_packages],
    package_dir={"capsparse": "capsparse", "capsparse.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
