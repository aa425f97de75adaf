"""Build of capsparse and its native extensions.

Environment gates:
  CAPSPARSE_BUILD_CPP=0     skip the C++ CPU extension ``capsparse._C`` (the reference backend still works)
  CAPSPARSE_BUILD_CUDA=0/1  force the CUDA extension ``capsparse._C_cuda`` off/on; by default it is built
                            only when the installed torch is a CUDA build and nvcc is found
  TORCH_CUDA_ARCH_LIST      e.g. "8.0;9.0+PTX": when set, torch's own arch flags are used as given
  CAPSPARSE_CUDA_ARCHS      otherwise, e.g. "80;90" (default): machine code for each, plus PTX for the
                            newest so that later GPUs can JIT-compile it
  CAPSPARSE_MARCH           -march value for the CPU build (default "native": the host's vector
                            instructions, AVX2/FMA or AVX-512)
  MAX_JOBS                  parallel compile jobs (ninja)

The CUDA extension is optional: if it cannot be built (nvcc / torch CUDA mismatch, a compiler nvcc
rejects, a failing compile) the install goes on with the CPU extension and the Triton kernels, warns
loudly, and records why in ``capsparse/_C_cuda_build_error.txt`` (reported by the cuda backend).
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
CUDA_EXT = "capsparse._C_cuda"
CUDA_ERROR_FILE = "_C_cuda_build_error.txt"
DEFAULT_CUDA_ARCHS = "80;90"


def _log(message):
    print(f"capsparse setup: {message}", file=sys.stderr)


def _warn_cuda_failed(exc):
    bar = "!" * 78
    _log(f"\n{bar}\nWARNING: the CUDA extension {CUDA_EXT} failed to build and is skipped:\n  "
         f"{type(exc).__name__}: {exc}\ncapsparse is installed with the CPU extension and the Triton kernels "
         f"(the default on CUDA);\nthe 'cuda' backend will be unavailable. See docs/cuda.md (Build).\n{bar}")


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


def cuda_arch_flags(env=os.environ):
    """nvcc ``-gencode`` flags. None when ``TORCH_CUDA_ARCH_LIST`` is set: torch's cpp_extension then
    turns that list into flags itself (``+PTX`` included), and any flag of ours would override it."""
    if env.get("TORCH_CUDA_ARCH_LIST"):
        return []
    archs = [a.strip() for a in env.get("CAPSPARSE_CUDA_ARCHS", DEFAULT_CUDA_ARCHS).split(";") if a.strip()]
    for a in archs:
        if not a.rstrip("af").isdigit():
            raise ValueError(f"CAPSPARSE_CUDA_ARCHS: expected ';'-separated compute capabilities like '80;90', "
                             f"got {a!r}")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    if archs:  # PTX of the newest arch, without the a/f suffix: arch-specific PTX does not run on later GPUs
        ptx = max((a.rstrip("af") for a in archs), key=int)
        flags.append(f"-gencode=arch=compute_{ptx},code=compute_{ptx}")
    return flags


def optional_cuda_build_ext(base):
    """``base`` (a build_ext class) where a failure of the CUDA extension only drops that extension."""

    class OptionalCudaBuildExt(base):
        def build_extensions(self):
            error_file = os.path.join(os.path.dirname(self.get_ext_fullpath(CUDA_EXT)), CUDA_ERROR_FILE)
            if os.path.exists(error_file):
                os.remove(error_file)
            try:
                super().build_extensions()
                return
            except Exception as exc:  # noqa: BLE001  (nvcc/torch mismatch, compiler errors, missing toolkit)
                if not any(e.name == CUDA_EXT for e in self.extensions):
                    raise
                _warn_cuda_failed(exc)
                os.makedirs(os.path.dirname(error_file), exist_ok=True)
                with open(error_file, "w", encoding="utf-8") as f:
                    f.write(f"{type(exc).__name__}: {exc}\n")
            self.extensions = [e for e in self.extensions if e.name != CUDA_EXT]
            if self.extensions:
                super().build_extensions()

    return OptionalCudaBuildExt


def _cuda_extension(CUDAExtension):
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/binding_cuda.cpp"))
    if not cuda_sources:
        _log("no CUDA sources in csrc/cuda; skipping the CUDA extension")
        return None
    try:
        return CUDAExtension(
            CUDA_EXT, cuda_sources,
            extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                                "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", *cuda_arch_flags()]})
    except Exception as exc:  # noqa: BLE001  (e.g. CUDA_HOME not found)
        _warn_cuda_failed(exc)
        return None


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
    has_cuda_torch = bool(torch.version.cuda) and shutil.which("nvcc") is not None
    if want_cuda == "1" or (want_cuda is None and has_cuda_torch):
        ext = _cuda_extension(CUDAExtension)
        if ext is not None:
            exts.append(ext)
    else:
        reason = "CAPSPARSE_BUILD_CUDA=0" if want_cuda == "0" else "torch has no CUDA or nvcc is missing"
        _log(f"skipping the CUDA extension ({reason}); the cuda backend will be unavailable")
    base = BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return exts, {"build_ext": optional_cuda_build_ext(base)}


def main():
    ext_modules, cmdclass = _extensions()
    setup(
        packages=find_packages(include=["capsparse", "capsparse.*"]),
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )


if __name__ == "__main__":  # setuptools' build backend runs this file as __main__; tests import it
    main()
