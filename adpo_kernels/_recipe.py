"""How csrc/ is compiled: one recipe for both ways the extensions come to exist.

``setup.py`` uses it to build ``_C`` / ``_C_cuda`` at install time (when torch is
importable by the build), and :mod:`adpo_kernels._jit` to build the same sources with
the same flags on first use otherwise.  This module imports nothing but the standard
library: setup.py loads it by path, possibly in a build environment without torch.

The ISA-specific CPU files (``kernels_avx2.cpp``, ``kernels_avx512.cpp``) choose their
instruction set with ``#pragma GCC target`` rather than per-file flags, so one flag set
compiles every CPU source; they must come last on the link line (see :func:`sources`).
"""
from __future__ import annotations

import glob
import hashlib
import os
import re

CXX_FLAGS = ["-O3", "-fopenmp", "-Wno-unknown-pragmas"]  # torch's headers use CUDA's #pragma unroll
LINK_FLAGS = ["-fopenmp"]
CUDA_CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
SOURCE_SUFFIXES = (".h", ".cuh", ".hpp", ".cpp", ".cu")
MODULES = {"cpu": "_C", "cuda": "_C_cuda"}  # the module name is fixed by PyInit_<name> in module.cpp


def csrc_files(root: str) -> list[str]:
    """Every source and header under ``root`` (what the sdist, the wheel and the JIT build need)."""
    out = []
    for dirpath, _, files in os.walk(root):
        out += [os.path.join(dirpath, f) for f in files if f.endswith(SOURCE_SUFFIXES)]
    return sorted(out)


def sources(root: str, kind: str) -> list[str]:
    """The translation units of extension ``kind`` ("cpu" or "cuda") under ``root`` (csrc/).

    The ISA-specific kernels go last: the linker keeps the first copy of an inline function
    that several objects emit, and that copy must be one compiled for any CPU, not the
    AVX2 one.
    """
    pats = {"cpu": ["cpu/*.cpp"], "cuda": ["cuda/*.cpp", "cuda/*.cu"]}[kind]
    files = [f for p in pats for f in glob.glob(os.path.join(root, p))]
    return sorted(files, key=lambda f: ("avx" in os.path.basename(f), os.path.basename(f)))


def fingerprint(root: str, extra: list[str]) -> str:
    """A hash of every file under ``root`` and of ``extra`` (flags, versions): the JIT cache key."""
    h = hashlib.sha256()
    for path in csrc_files(root):
        h.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read() + b"\0")
    for item in extra:
        h.update(item.encode() + b"\0")
    return h.hexdigest()[:16]


def cuda_arch_spec(env=os.environ) -> tuple[str, str]:
    """``(spec, where it came from)``: ``ADPO_CUDA_ARCHS``, else ``TORCH_CUDA_ARCH_LIST``, else
    the default (sm80 and sm90 with PTX for the newest)."""
    for var in ("ADPO_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST"):
        if (env.get(var) or "").strip():
            return env[var], var
    return DEFAULT_CUDA_ARCHS, "default"


def parse_cuda_archs(spec: str, var: str = "ADPO_CUDA_ARCHS") -> list[tuple[str, bool]]:
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
            raise ValueError(f"{var}: cannot parse arch {tok!r} in {spec!r}; "
                             f"expected e.g. '8.0', '90', 'sm_90a' or '9.0+PTX'")
        arch = m.group(1) + m.group(2) + m.group(3) if m.group(1) else m.group(4) + m.group(5)
        archs.append((arch, ptx))
    if not archs:
        raise ValueError(f"{var}: no arch in {spec!r}")
    return archs


def torch_arch_list(archs: list[tuple[str, bool]]) -> str:
    """The same archs in TORCH_CUDA_ARCH_LIST form, so torch adds no archs of its own."""
    return ";".join(f"{a[:-1]}.{a[-1]}" + ("+PTX" if p else "") for a, p in archs if a.isdigit()) or "9.0"


def gencode_flags(archs: list[tuple[str, bool]]) -> list[str]:
    flags = []
    for arch, ptx in archs:
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    return flags


def nvidia_include_dirs() -> list[str]:
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


def cuda_home() -> str | None:
    """The CUDA toolkit: CUDA_HOME / CUDA_PATH, else /usr/local/cuda, else the one holding
    ``nvcc`` on PATH.  (torch guesses from `which nvcc`, which is a wrapper in
    /usr/local/bin on some machines; the link then fails.)"""
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    for d in os.environ.get("PATH", "").split(os.pathsep):
        nvcc = os.path.join(d, "nvcc")
        if d and os.path.exists(nvcc):
            return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None
