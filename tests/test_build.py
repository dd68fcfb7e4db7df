"""The build: metadata written by setup.py, the extensions it promises, `adpo_kernels.info`.

CI (.ci/run) builds with ADPO_FORCE_CUDA=1, so there the CUDA extension must have been
compiled and linked even though no GPU is present.
"""
from __future__ import annotations

import importlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
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
    # the module the build made, not a just-in-time build standing in for a missing one
    assert adpo_kernels.available_backends(detail=True)["cpu"]["origin"] == "prebuilt"


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


@needs_build
def test_cuda_archs_follow_torch_cuda_arch_list():
    """ADPO_CUDA_ARCHS defaults to TORCH_CUDA_ARCH_LIST (which the Makefile sets), else 8.0;9.0+PTX."""
    if not BUILD.get("cuda_requested"):
        pytest.skip("the CUDA extension was not requested by this build")
    from adpo_kernels import _recipe

    env = BUILD["env"]
    spec, var = _recipe.cuda_arch_spec({k: v for k, v in env.items() if v is not None})
    assert BUILD["cuda_archs_from"] == var
    assert BUILD["cuda_archs"] == [a + ("+PTX" if p else "") for a, p in _recipe.parse_cuda_archs(spec)]


def _copy_tree_for_build(dst):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(root, name), dst)
    shutil.copytree(os.path.join(root, "csrc"), os.path.join(dst, "csrc"))
    shutil.copytree(os.path.join(root, "adpo_kernels"), os.path.join(dst, "adpo_kernels"),
                    ignore=shutil.ignore_patterns("*.so", "_build_info.json", "__pycache__", "csrc"))


def test_an_extension_that_fails_to_compile_does_not_fail_the_install(tmp_path):
    """Each extension may fail on its own (reported, left to the JIT build); under
    ADPO_FORCE_CUDA=1 (CI) any failure fails the build."""
    _copy_tree_for_build(tmp_path)
    for src in _recipe_sources(tmp_path):  # every file, so that the failure comes at once
        with open(src, "r+") as f:
            body = f.read()
            f.seek(0)
            f.write("#error adpo test: broken on purpose\n" + body)
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", "lib", "--build-temp", "tmp"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADPO_")}
    env["MAX_JOBS"] = "1"
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "adpo_kernels._C was not built" in res.stderr
    with open(tmp_path / "lib" / "adpo_kernels" / "_build_info.json") as f:
        ext = json.load(f)["extensions"]
    assert not ext["adpo_kernels._C"]["built"]
    assert ext["adpo_kernels._C"]["reason"].startswith("compile failed at install time"), ext
    res = subprocess.run(cmd, cwd=tmp_path, env=dict(env, ADPO_FORCE_CUDA="1"), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode != 0 and "broken on purpose" in res.stdout + res.stderr


def _recipe_sources(root):
    from adpo_kernels import _recipe

    return _recipe.sources(os.path.join(root, "csrc"), "cpu")
