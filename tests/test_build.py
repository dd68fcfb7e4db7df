"""The build: metadata written by setup.py, the extensions it promises, `adpo_kernels.info`.

CI (.ci/run) builds with ADPO_FORCE_CUDA=1, so there the CUDA extension must have been
compiled and linked even though no GPU is present.
"""
from __future__ import annotations

import importlib
import importlib.util
import io
import os
from contextlib import redirect_stdout

import pytest
import torch

import adpo_kernels
from adpo_kernels import info as info_mod

BUILD = info_mod.build_info()
needs_build = pytest.mark.skipif(BUILD is None, reason="no build metadata: the package was not built by setup.py")
OPS = ("mse", "pairs", "pairs_bwd")


def _ext_path(name: str):
    spec = importlib.util.find_spec(name)
    return spec.origin if spec else None


@needs_build
def test_metadata_matches_runtime():
    assert BUILD["torch"] == torch.__version__, "extensions were built against another torch: rebuild"
    assert BUILD["package_version"] == adpo_kernels.__version__
    for key in ("python", "torch_cuda", "extensions", "force_cuda", "skip_cuda", "cuda_requested", "built_at"):
        assert key in BUILD, key


@needs_build
def test_cpu_extension_built_and_registered():
    ext = BUILD["extensions"]["adpo_kernels._C"]
    assert ext["built"], ext
    importlib.import_module("adpo_kernels._C")
    for stage in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"adpo::cpu_{stage}", "CPU")
    assert adpo_kernels.available_backends()["cpu"] == []


@needs_build
def test_cuda_extension_built_when_requested():
    if os.environ.get("ADPO_FORCE_CUDA") == "1":
        # the CI contract: the suite runs under ADPO_FORCE_CUDA=1, so the build must have seen it
        assert BUILD["force_cuda"], "ADPO_FORCE_CUDA=1 now, but the installed build was made without it"
    if not BUILD.get("cuda_requested"):
        pytest.skip("build metadata says CUDA was not requested: "
                    + BUILD["extensions"]["adpo_kernels._C_cuda"].get("reason", "?"))
    ext = BUILD["extensions"]["adpo_kernels._C_cuda"]
    assert ext["built"], ext
    assert BUILD.get("cuda_archs") and BUILD.get("nvcc")
    path = _ext_path("adpo_kernels._C_cuda")
    assert path and os.path.exists(path)
    # it must load on a machine without a GPU too (its kernels then cannot run)
    importlib.import_module("adpo_kernels._C_cuda")
    for stage in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"adpo::cuda_{stage}", "CUDA")


def test_info_reports_every_backend():
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert info_mod.main([]) == 0
    text = buf.getvalue()
    for name in adpo_kernels.available_backends():
        assert f"  {name}: " in text
    assert "torch: " + torch.__version__ in text
    assert ("adpo_kernels._C: built" in text) == bool(BUILD and BUILD["extensions"]["adpo_kernels._C"]["built"])


def test_missing_extension_is_a_reason_not_an_import_error():
    """Import never fails because an extension is missing; dispatch says why instead."""
    from adpo_kernels import dispatch

    reason = dispatch._import("adpo_kernels._C_does_not_exist", "C++ extension")
    assert reason and "not usable" in reason and "ModuleNotFoundError" in reason
