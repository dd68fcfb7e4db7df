"""Extension build (the package metadata is in pyproject.toml).

Extensions (sources from csrc/, compiled with ninja through ``torch.utils.cpp_extension``;
flags in ``adpo_kernels/_recipe.py``, shared with the just-in-time build; see docs/csrc.md):

* ``adpo_kernels._C`` (csrc/cpu/*.cpp): the C++ CPU kernels.  Built when torch is
  importable at build time (``pip install --no-build-isolation``).
* ``adpo_kernels._C_cuda`` (csrc/cuda/*.cpp, *.cu): the CUDA kernels.  Built when torch
  is a CUDA build, a CUDA toolkit is found, and a GPU is visible or ``ADPO_FORCE_CUDA=1``.

They are separate extensions and each may fail on its own: a failed one is reported
(build metadata, ``python -m adpo_kernels.info``) and left to the just-in-time build,
unless ``ADPO_FORCE_CUDA=1`` makes every failure fatal.  A build without torch (the default
isolated ``pip install .``) compiles nothing: the package then builds the kernels on first
use (adpo_kernels/_jit.py), from the csrc/ copy this script puts in the package.

Environment switches:

``ADPO_FORCE_CUDA=1``      build the CUDA extension without a visible GPU (CI does); the
                           build fails if either extension cannot be built.
``ADPO_SKIP_CUDA_BUILD=1`` never build the CUDA extension.
``ADPO_CUDA_ARCHS``        archs to compile for, ``;``/``,``/space separated, e.g.
                           ``"8.0;9.0+PTX"``, ``"90a"``, ``"sm_80 sm_90"``; default
                           ``TORCH_CUDA_ARCH_LIST`` when that is set, else ``"8.0;9.0+PTX"``.
``MAX_JOBS``               parallel compile jobs (ninja).
``CUDA_HOME``              the toolkit (default: /usr/local/cuda when it has bin/nvcc).

The build writes ``adpo_kernels/_build_info.json`` (versions, archs, which extensions were
built and why one was not); ``python -m adpo_kernels.info`` prints it.
"""
import datetime
import glob
import importlib.util
import json
import os
import platform
import re
import shutil
import sys
import time

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PKG = "adpo_kernels"
BUILD_INFO = "_build_info.json"
CSRC = os.path.join(HERE, "csrc")

_spec = importlib.util.spec_from_file_location("_adpo_recipe", os.path.join(HERE, PKG, "_recipe.py"))
recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipe)
VERSION = re.search(r'__version__ = "([^"]+)"', open(os.path.join(HERE, PKG, "__init__.py")).read()).group(1)
# kept for importers of the old names
parse_cuda_archs, gencode_flags, DEFAULT_CUDA_ARCHS = recipe.parse_cuda_archs, recipe.gencode_flags, \
    recipe.DEFAULT_CUDA_ARCHS


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _rel(paths):
    return [os.path.relpath(p, HERE) for p in paths]


def plan_extensions():
    """The extensions to build and the metadata that explains the choice."""
    info = {
        "package_version": VERSION,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "env": {k: os.environ.get(k) for k in ("ADPO_FORCE_CUDA", "ADPO_SKIP_CUDA_BUILD", "ADPO_CUDA_ARCHS",
                                               "MAX_JOBS", "CUDA_HOME", "TORCH_CUDA_ARCH_LIST")},
        "force_cuda": _flag("ADPO_FORCE_CUDA"),
        "skip_cuda": _flag("ADPO_SKIP_CUDA_BUILD"),
        "extensions": {},
    }
    try:
        import torch
    except ImportError as exc:
        reason = (f"torch was not importable at build time ({exc}): the kernels are built on first use "
                  f"instead; to build them at install time, install torch first and use --no-build-isolation")
        info["extensions"] = {f"{PKG}._C": {"built": False, "reason": reason},
                              f"{PKG}._C_cuda": {"built": False, "reason": reason}}
        return [], info
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and recipe.cuda_home():
        os.environ["CUDA_HOME"] = recipe.cuda_home()
    from torch.utils import cpp_extension as cpp

    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    exts = []
    cpu_sources = _rel(recipe.sources(CSRC, "cpu"))
    exts.append(cpp.CppExtension(f"{PKG}._C", cpu_sources, extra_compile_args={"cxx": recipe.CXX_FLAGS},
                                 extra_link_args=recipe.LINK_FLAGS, optional=not info["force_cuda"]))
    info["extensions"][f"{PKG}._C"] = {"built": False, "reason": "build did not finish", "sources": cpu_sources}

    cuda_reason = None
    gpu_visible = False
    if info["skip_cuda"]:
        cuda_reason = "ADPO_SKIP_CUDA_BUILD=1"
    elif torch.version.cuda is None:
        cuda_reason = f"torch {torch.__version__} is not a CUDA build"
    elif cpp.CUDA_HOME is None or not os.path.exists(os.path.join(cpp.CUDA_HOME, "bin", "nvcc")):
        cuda_reason = "no CUDA toolkit found (set CUDA_HOME to a directory with bin/nvcc)"
    else:
        gpu_visible = torch.cuda.is_available()
        if not (gpu_visible or info["force_cuda"]):
            cuda_reason = "no GPU visible at build time and ADPO_FORCE_CUDA is not set"
    info["gpu_visible_at_build"] = gpu_visible
    info["cuda_requested"] = not info["skip_cuda"] and (gpu_visible or info["force_cuda"])
    if cuda_reason is not None and info["force_cuda"] and not info["skip_cuda"]:
        raise RuntimeError(f"ADPO_FORCE_CUDA=1 but the CUDA extension cannot be built: {cuda_reason}")

    if cuda_reason is None:
        spec, var = recipe.cuda_arch_spec()
        archs = recipe.parse_cuda_archs(spec, var)
        # torch's own arch detection crashes without a GPU when this is unset; our explicit
        # -gencode flags take precedence anyway.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", recipe.torch_arch_list(archs))
        cuda_sources = _rel(recipe.sources(CSRC, "cuda"))
        nvcc_flags = recipe.NVCC_FLAGS + recipe.gencode_flags(archs)
        exts.append(cpp.CUDAExtension(f"{PKG}._C_cuda", cuda_sources, include_dirs=recipe.nvidia_include_dirs(),
                                      extra_compile_args={"cxx": recipe.CUDA_CXX_FLAGS, "nvcc": nvcc_flags},
                                      optional=not info["force_cuda"]))
        info["cuda_home"] = cpp.CUDA_HOME
        info["nvcc"] = _nvcc_version(cpp.CUDA_HOME)
        info["cuda_archs"] = [a + ("+PTX" if p else "") for a, p in archs]
        info["cuda_archs_from"] = var
        info["nvcc_gencode"] = recipe.gencode_flags(archs)
        info["extensions"][f"{PKG}._C_cuda"] = {"built": False, "reason": "build did not finish",
                                                "sources": cuda_sources}
    else:
        info["extensions"][f"{PKG}._C_cuda"] = {"built": False, "reason": cuda_reason}
    return exts, info


def _nvcc_version(cuda_home):
    import subprocess
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release [\d.]+, V([\d.]+)", out)
    return m.group(1) if m else None


EXTENSIONS, BUILD_METADATA = plan_extensions()


def _write_info(info, dirs):
    for d in dirs:
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, BUILD_INFO + ".tmp")
        with open(tmp, "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, os.path.join(d, BUILD_INFO))


class BuildPyWithSources(build_py):
    """The Python package, plus csrc/ as ``adpo_kernels/csrc`` (the just-in-time build's
    sources) and the build plan as ``_build_info.json`` (build_ext replaces it with what it built)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # the JIT build finds ../csrc next to the package
            _write_info(BUILD_METADATA, [os.path.join(HERE, PKG)])
            return
        # build/lib outlives a build: a module compiled by an earlier build must not slip into
        # this wheel (build_ext puts back the ones this build makes)
        for stale in glob.glob(os.path.join(self.build_lib, PKG, "_C*.so")):
            os.remove(stale)
        dest = os.path.join(self.build_lib, PKG, "csrc")
        shutil.rmtree(dest, ignore_errors=True)
        for src in recipe.csrc_files(CSRC):
            out = os.path.join(dest, os.path.relpath(src, CSRC))
            os.makedirs(os.path.dirname(out), exist_ok=True)
            shutil.copy2(src, out)
        _write_info(BUILD_METADATA, [os.path.join(self.build_lib, PKG)])


def get_cmdclass():
    cmdclass = {"build_py": BuildPyWithSources}
    if not EXTENSIONS:
        return cmdclass
    from torch.utils.cpp_extension import BuildExtension

    class BuildExtensionWithInfo(BuildExtension):
        """ninja build of csrc/, then the build metadata next to the built modules."""

        failed = {}

        def finalize_options(self):
            super().finalize_options()
            if self.inplace:  # editable install: keep objects in ./build so ninja rebuilds only what changed
                self.build_temp = os.path.join(HERE, "build", f"temp.{platform.system().lower()}-"
                                               f"{platform.machine()}-{sys.implementation.cache_tag}")

        def build_extension(self, ext):
            # torch's ninja build raises RuntimeError, which setuptools' `optional` does not catch
            try:
                super().build_extension(ext)
            except Exception as exc:
                if not ext.optional:
                    raise
                last = [ln for ln in str(exc).strip().splitlines() if ln.strip()][-1:] or [""]
                self.failed[ext.name] = f"compile failed at install time ({type(exc).__name__}: {last[0]})"
                print(f"WARNING: {ext.name} was not built: {exc}\n  the other extension is unaffected; "
                      f"`python -m adpo_kernels.info` reports this", file=sys.stderr)

        def run(self):
            start = time.time()
            super().run()
            info = dict(BUILD_METADATA)
            info["built_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            info["build_seconds"] = round(time.time() - start, 1)
            info["extensions"] = {k: dict(v) for k, v in BUILD_METADATA["extensions"].items()}
            for ext in self.extensions:
                entry = info["extensions"][ext.name]
                built_path = self.get_ext_fullpath(ext.name)
                entry["built"] = os.path.exists(built_path) and ext.name not in self.failed
                entry.pop("reason", None)
                if not entry["built"]:
                    entry["reason"] = self.failed.get(ext.name, "the build finished without writing the module")
            out_dir = os.path.dirname(self.get_ext_fullpath(f"{PKG}._C"))
            _write_info(info, {out_dir, os.path.join(HERE, PKG) if self.inplace else out_dir})

    cmdclass["build_ext"] = BuildExtensionWithInfo.with_options(use_ninja=True)
    return cmdclass


setup(ext_modules=EXTENSIONS, cmdclass=get_cmdclass())
