"""setup.py: a CUDA extension that fails to build leaves a working install of the rest, loudly; arch flags.

The build runs in-process on tiny C++ sources (one that compiles, one named ``capsparse._C_cuda``
that fails with ``#error``), through the same build_ext class setup.py installs with.
"""
import importlib.util
import os
import sys

import pytest
from setuptools import Distribution, Extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup_module():
    spec = importlib.util.spec_from_file_location("capsparse_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: setup() is not called
    return module


def _build(setup_module, tmp_path, cuda_source):
    from torch.utils.cpp_extension import BuildExtension

    (tmp_path / "ok.cpp").write_text("int capsparse_setup_test_ok() { return 1; }\n")
    (tmp_path / "cuda.cpp").write_text(cuda_source)
    exts = [Extension("capsparse._C", [str(tmp_path / "ok.cpp")], language="c++"),
            Extension(setup_module.CUDA_EXT, [str(tmp_path / "cuda.cpp")], language="c++")]
    cmd_cls = setup_module.optional_cuda_build_ext(BuildExtension.with_options(use_ninja=False))
    dist = Distribution({"name": "capsparse", "ext_modules": exts, "cmdclass": {"build_ext": cmd_cls}})
    cmd = dist.get_command_obj("build_ext")
    cmd.build_lib, cmd.build_temp = str(tmp_path / "lib"), str(tmp_path / "tmp")
    cmd.ensure_finalized()
    cmd.run()
    return tmp_path / "lib" / "capsparse"


def test_failing_cuda_build_keeps_the_rest_and_warns(setup_module, tmp_path, capfd):
    out = _build(setup_module, tmp_path, "#error forced failure of the CUDA extension\n")
    built = sorted(p.name for p in out.iterdir())
    assert any(n.startswith("_C.") for n in built), built  # the CPU extension is there
    assert not any(n.startswith("_C_cuda.") for n in built), built
    err = capfd.readouterr().err
    assert "WARNING: the CUDA extension capsparse._C_cuda failed to build and is skipped" in err
    assert "Triton kernels" in err
    recorded = (out / setup_module.CUDA_ERROR_FILE).read_text()
    assert "CompileError" in recorded or "error" in recorded.lower()


def test_succeeding_build_clears_a_stale_error_record(setup_module, tmp_path):
    out = tmp_path / "lib" / "capsparse"
    out.mkdir(parents=True)
    (out / setup_module.CUDA_ERROR_FILE).write_text("old failure\n")
    _build(setup_module, tmp_path, "int capsparse_setup_test_cuda() { return 2; }\n")
    assert any(p.name.startswith("_C_cuda.") for p in out.iterdir())
    assert not (out / setup_module.CUDA_ERROR_FILE).exists()


def test_cuda_backend_reports_the_recorded_failure(monkeypatch, tmp_path):
    from capsparse.backends import cuda

    monkeypatch.setattr(cuda.torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "capsparse._C_cuda", None)  # import fails as when it was never built
    monkeypatch.setattr(cuda._C, "module", None)
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(tmp_path / "e.txt", *a, **k)
                        if str(path).endswith("_C_cuda_build_error.txt") else real_open(path, *a, **k))
    (tmp_path / "e.txt").write_text("RuntimeError: The detected CUDA version (12.1) mismatches torch's (13.0)\n")
    ok, reason = cuda.is_available()
    assert not ok and "its build failed at install: RuntimeError: The detected CUDA version" in reason


def test_arch_flags(setup_module):
    flags = setup_module.cuda_arch_flags
    assert flags({}) == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                         "-gencode=arch=compute_90,code=compute_90"]  # + PTX of the newest
    assert flags({"CAPSPARSE_CUDA_ARCHS": "90a;80"})[-1] == "-gencode=arch=compute_90,code=compute_90"
    assert flags({"TORCH_CUDA_ARCH_LIST": "8.0;9.0+PTX"}) == []  # torch's cpp_extension applies the list
    with pytest.raises(ValueError, match="CAPSPARSE_CUDA_ARCHS: expected"):
        flags({"CAPSPARSE_CUDA_ARCHS": "sm_90"})


def test_torch_honours_the_arch_list_without_our_flags(setup_module, monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    got = cpp_extension._get_cuda_arch_flags(setup_module.cuda_arch_flags())
    assert "-gencode=arch=compute_90,code=compute_90" in got and "-gencode=arch=compute_80,code=sm_80" in got
