"""Build script.  Install with ``pip install -e . --no-build-isolation`` (build isolation
would reinstall the whole torch stack; flash-attention and apex use the same convention).

Extensions (sources globbed from csrc/, compiled with ninja through
``torch.utils.cpp_extension``; see docs/csrc.md):

* ``adpo_kernels._C`` (csrc/cpu/*.cpp): the C++ CPU kernels.  Always built when torch
  is importable at build time.
* ``adpo_kernels._C_cuda`` (csrc/cuda/*.cpp, *.cu): the CUDA kernels.  Built when torch
  is a CUDA build, a CUDA toolkit is found, and a GPU is visible or ``ADPO_FORCE_CUDA=1``.

Environment switches:

``ADPO_FORCE_CUDA=1``      build the CUDA extension without a visible GPU (CI does); the
                           build fails if it cannot (no toolkit, CPU-only torch).
``ADPO_SKIP_CUDA_BUILD=1`` never build the CUDA extension.
``ADPO_CUDA_ARCHS``        archs to compile for, ``;``/``,``/space separated, e.g.
                           ``"8.0;9.0+PTX"`` (default), ``"90a"``, ``"sm_80 sm_90"``.
``MAX_JOBS``               parallel compile jobs (ninja).
``CUDA_HOME``              the toolkit (default: /usr/local/cuda when it has bin/nvcc).

The build writes ``adpo_kernels/_build_info.json`` (versions, archs, which extensions were
built and why one was not); ``python -m adpo_kernels.info`` prints it.
"""
import datetime
import glob
import json
import os
import platform
import re
import subprocess
import sys
import time

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
PKG = "adpo_kernels"
VERSION = "0.1.0"
BUILD_INFO = "_build_info.json"
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _default_cuda_home():
    # torch guesses CUDA_HOME from `which nvcc`, which is a wrapper in /usr/local/bin on some
    # machines; the link then fails.  Prefer the real toolkit when it is where it usually is.
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        if os.path.exists("/usr/local/cuda/bin/nvcc"):
            os.environ["CUDA_HOME"] = "/usr/local/cuda"


def parse_cuda_archs(spec):
    """``"8.0;9.0+PTX"`` -> ``[("80", False), ("90", True)]`` (arch digits[+suffix], emit PTX)."""
    archs = []
    for tok in re.split(r"[;,\s]+", spec.strip()):
        if not tok:
            continue
        ptx = tok.upper().endswith("+PTX")
        tok = tok[:-4] if ptx else tok
        tok = re.sub(r"^(sm_?|compute_?)", "", tok.lower())
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)|(\d{2,3})([af]?)", tok)
        if not m:
            raise ValueError(f"ADPO_CUDA_ARCHS: cannot parse arch {tok!r} in {spec!r}; "
                             f"expected e.g. '8.0', '90', 'sm_90a' or '9.0+PTX'")
        arch = m.group(1) + m.group(2) + m.group(3) if m.group(1) else m.group(4) + m.group(5)
        archs.append((arch, ptx))
    if not archs:
        raise ValueError(f"ADPO_CUDA_ARCHS: no arch in {spec!r}")
    return archs


def gencode_flags(archs):
    flags = []
    for arch, ptx in archs:
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    return flags


def _nvidia_include_dirs():
    """Headers of torch's nvidia wheels (cuBLAS etc.) that ATen's CUDA headers include and
    a bare CUDA toolkit may lack (site-packages/nvidia/cu13/include)."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for base in getattr(nvidia, "__path__", []):
        for inc in sorted(glob.glob(os.path.join(base, "*", "include"))):
            if re.fullmatch(r"cu\d+", os.path.basename(os.path.dirname(inc))) or os.path.exists(
                    os.path.join(inc, "cublas_v2.h")):
                dirs.append(inc)
    return dirs


def _nvcc_version(cuda_home):
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release [\d.]+, V([\d.]+)", out)
    return m.group(1) if m else None


def _rel_sources(*patterns):
    files = []
    for pat in patterns:
        files += glob.glob(os.path.join(HERE, pat))
    # Relative to setup.py, in a stable order with the ISA-specific kernels last: the linker
    # keeps the first copy of an inline function that several objects emit, and that copy
    # must be one compiled for any CPU, not the AVX2 one.
    return sorted((os.path.relpath(f, HERE) for f in files), key=lambda f: ("avx" in os.path.basename(f), f))


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
        reason = f"torch is not importable at build time ({exc}); install torch first and build with " \
                 f"--no-build-isolation"
        info["extensions"] = {f"{PKG}._C": {"built": False, "reason": reason},
                              f"{PKG}._C_cuda": {"built": False, "reason": reason}}
        return [], info
    _default_cuda_home()
    from torch.utils import cpp_extension as cpp

    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    exts = []
    cxx_flags = ["-O3", "-fopenmp", "-Wno-unknown-pragmas"]  # torch's headers use CUDA's #pragma unroll
    cpu_sources = _rel_sources("csrc/cpu/*.cpp")
    exts.append(cpp.CppExtension(f"{PKG}._C", cpu_sources, extra_compile_args={"cxx": cxx_flags},
                                 extra_link_args=["-fopenmp"]))
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
        archs = parse_cuda_archs(os.environ.get("ADPO_CUDA_ARCHS") or DEFAULT_CUDA_ARCHS)
        # torch's own arch detection crashes without a GPU when this is unset; our explicit
        # -gencode flags take precedence anyway.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ";".join(
            f"{a[:-1]}.{a[-1]}" + ("+PTX" if p else "") for a, p in archs if a.isdigit()) or "9.0")
        cuda_sources = _rel_sources("csrc/cuda/*.cpp", "csrc/cuda/*.cu")
        nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"] + gencode_flags(archs)
        exts.append(cpp.CUDAExtension(f"{PKG}._C_cuda", cuda_sources, include_dirs=_nvidia_include_dirs(),
                                      extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags}))
        info["cuda_home"] = cpp.CUDA_HOME
        info["nvcc"] = _nvcc_version(cpp.CUDA_HOME)
        info["cuda_archs"] = [a + ("+PTX" if p else "") for a, p in archs]
        info["nvcc_gencode"] = gencode_flags(archs)
        info["extensions"][f"{PKG}._C_cuda"] = {"built": False, "reason": "build did not finish",
                                                "sources": cuda_sources}
    else:
        info["extensions"][f"{PKG}._C_cuda"] = {"built": False, "reason": cuda_reason}
    return exts, info


EXTENSIONS, BUILD_METADATA = plan_extensions()


def get_extensions():
    return EXTENSIONS


def get_cmdclass():
    if not EXTENSIONS:
        return {}
    from torch.utils.cpp_extension import BuildExtension

    class BuildExtensionWithInfo(BuildExtension):
        """ninja build of csrc/, then the build metadata next to the built modules."""

        def finalize_options(self):
            super().finalize_options()
            if self.inplace:  # editable install: keep objects in ./build so ninja rebuilds only what changed
                self.build_temp = os.path.join(HERE, "build", f"temp.{platform.system().lower()}-"
                                               f"{platform.machine()}-{sys.implementation.cache_tag}")

        def run(self):
            start = time.time()
            super().run()
            info = dict(BUILD_METADATA)
            info["built_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            info["build_seconds"] = round(time.time() - start, 1)
            info["extensions"] = {k: dict(v) for k, v in BUILD_METADATA["extensions"].items()}
            for ext in self.extensions:
                entry = info["extensions"][ext.name]
                entry["built"] = os.path.exists(self.get_ext_fullpath(ext.name))
                entry.pop("reason", None)
                if not entry["built"]:
                    entry["reason"] = "the build finished without writing the module"
            out_dir = os.path.dirname(self.get_ext_fullpath(f"{PKG}._C"))
            for d in {out_dir, os.path.join(HERE, PKG) if self.inplace else out_dir}:
                os.makedirs(d, exist_ok=True)
                with open(os.path.join(d, BUILD_INFO), "w") as f:
                    json.dump(info, f, indent=2, sort_keys=True)
                    f.write("\n")

    return {"build_ext": BuildExtensionWithInfo.with_options(use_ninja=True)}


setup(
    name="adpo-kernels",
    version=VERSION,
    description="Fused GPU/CPU kernels and a fast trainer for Diffusion-DPO and Adaptive-DPO",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["adpo_kernels", "adpo_kernels.*", "adpo_train", "adpo_train.*",
                                    "bench", "bench.*"]),
    package_data={"adpo_kernels": ["_build_info.json"]},
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        "triton": ["triton"],
        "train": ["diffusers", "transformers", "accelerate", "peft", "safetensors", "tqdm", "pillow",
                  "pyarrow", "matplotlib"],
        "test": ["pytest", "hypothesis"],
        "bench": ["pytest-benchmark", "matplotlib"],
        "xformers": ["xformers"],
    },
    entry_points={"console_scripts": ["adpo-train=adpo_train.cli:main", "adpo-bench=bench.__main__:main"]},
    ext_modules=get_extensions(),
    cmdclass=get_cmdclass(),
    zip_safe=False,
)
