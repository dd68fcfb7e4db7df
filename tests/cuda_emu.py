"""The CUDA-on-CPU harness (csrc/cuda_emu) from the tests: build, load, and the ``cuda_emu`` backend.

:func:`load` compiles the checkout's ``csrc/cuda/kernels.cu`` and ``ops_cuda.cpp`` as C++ against
``csrc/cuda_emu`` (the harness headers and runtime) into a library that registers
``adpo::cuda_emu_{mse,pairs,pairs_bwd}`` for CPU tensors and loads it; :func:`registered` adds the
test-only backend ``cuda_emu`` to :data:`adpo_kernels.dispatch.BACKENDS` for a test, so that
``adaptive_dpo_loss(..., backend="cuda_emu")`` runs the CUDA kernels, launchers and op code on
CPU threads, through the same dispatch, autograd and checks as a GPU would.

The library is cached under the torch extensions directory by a hash of the sources, the flags,
the compiler and torch (an edit of ``kernels.cu`` is picked up without a reinstall).

``ADPO_CUDA_EMU_SANITIZER=address`` or ``=thread`` builds it with ASan (memcheck) or TSan
(racecheck).  The sanitizer's runtime must then be the process's first library:
``.ci/sanitizers.sh`` runs the tests that way (:func:`sanitizer_env` gives the environment).
:func:`build_selftest` builds the torch-free driver ``csrc/cuda_emu/selftest.cpp`` from a given
``kernels.cu`` text, for the tests that show the harness catching broken kernels.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from typing import Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
EMU = os.path.join(CSRC, "cuda_emu")
ENV = "ADPO_CUDA_EMU_SANITIZER"
SANITIZERS = {"": [], "address": ["-fsanitize=address", "-fno-omit-frame-pointer"],
              "thread": ["-fsanitize=thread"]}
RUNTIME_LIB = {"address": "libasan.so", "thread": "libtsan.so"}
CXX = os.environ.get("CXX", "g++")
BASE_FLAGS = ["-std=c++20", "-fPIC", "-g", "-Wall", "-Wno-unknown-pragmas", "-pthread", "-I", os.path.join(EMU, "include")]
BACKEND = "cuda_emu"
_loaded: dict[str, str] = {}


class BuildError(RuntimeError):
    pass


def sanitizer() -> str:
    value = os.environ.get(ENV, "").strip().lower()
    if value not in SANITIZERS:
        raise ValueError(f"{ENV}: expected 'address', 'thread' or unset, got {value!r}")
    return value


def _opt(san: str) -> list[str]:
    return ["-O1"] if san else ["-O2"]  # the sanitizers' usual level: fast enough, exact line numbers


def runtime_path(san: str) -> str:
    out = subprocess.run([CXX, f"-print-file-name={RUNTIME_LIB[san]}"], capture_output=True, text=True, check=True,
                         env=clean_env())
    return out.stdout.strip()


def sanitizer_env(san: str, env: Optional[dict] = None) -> dict:
    """The environment in which a Python process can load the ``san`` build: the runtime preloaded,
    leak checks off (the interpreter's own allocations are not ours), the first report fatal, torch
    on one thread."""
    env = dict(os.environ if env is None else env)
    env[ENV] = san
    env["LD_PRELOAD"] = runtime_path(san)
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:halt_on_error=1:exitcode=86"
    env["TSAN_OPTIONS"] = "halt_on_error=1:exitcode=66:report_signal_unsafe=0"
    # torch's own OpenMP threads synchronise inside libgomp, which TSan does not see: one thread,
    # so that every report is about the harness's threads
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_prefix(san: str) -> list[str]:
    """How to start a process that runs TSan code: with address-space randomisation off where
    ``setarch`` can, since TSan before LLVM 18 (gcc 12's) refuses some high-entropy layouts
    ("unexpected memory mapping"); nothing otherwise."""
    if san != "thread" or not shutil.which("setarch"):
        return []
    return ["setarch", platform.machine(), "-R"]


def _runtime_loaded(san: str) -> bool:
    with open("/proc/self/maps") as f:
        return any(RUNTIME_LIB[san].split(".")[0] in line for line in f)


def _torch_flags() -> tuple[list[str], list[str]]:
    # torch.utils.cpp_extension.include_paths(), without importing cpp_extension (which warns
    # about CUDA_HOME on machines without a GPU); library.h needs no Python headers
    base = os.path.dirname(torch.__file__)
    inc = [f for d in (os.path.join(base, "include"), os.path.join(base, "include", "torch", "csrc", "api", "include"))
           for f in ("-isystem", d)]
    abi = [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    lib = os.path.join(base, "lib")
    return inc + abi, ["-L", lib, f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu", "-ltorch"]


def _sources() -> list[str]:
    files = []
    for d in (CSRC, os.path.join(CSRC, "cuda"), EMU, os.path.join(EMU, "include")):
        files += sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith((".h", ".cpp", ".cu")))
    return files


@functools.lru_cache(maxsize=None)
def _compiler_version() -> str:
    out = subprocess.run([CXX, "--version"], capture_output=True, text=True, env=clean_env()).stdout
    return out.splitlines()[0] if out else ""


def _key(flags: list[str], extra: str = "") -> str:
    h = hashlib.sha256()
    for path in _sources():
        with open(path, "rb") as f:
            h.update(os.path.relpath(path, CSRC).encode() + b"\0" + f.read() + b"\0")
    for item in flags + [_compiler_version(), torch.__version__, sys.version, extra]:
        h.update(item.encode() + b"\0")
    return h.hexdigest()[:16]


def cache_dir() -> str:
    from adpo_kernels import _jit

    return _jit.cache_root()


def clean_env(env: Optional[dict] = None) -> dict:
    """``env`` (default: this process's) without a preloaded sanitizer runtime, for the compiler and
    for the selftest executables, which link their own."""
    return {k: v for k, v in (os.environ if env is None else env).items() if k != "LD_PRELOAD"}


def _compile(jobs: list[list[str]], log: str) -> None:
    """Runs the compiler commands two at a time (the machines have 2 cores); raises with the log."""
    with open(log, "w") as out:
        for i in range(0, len(jobs), 2):
            procs = [subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=clean_env()) for cmd in jobs[i:i + 2]]
            codes = [p.wait() for p in procs]
            if any(codes):
                out.flush()
                with open(log) as f:
                    tail = f.read()[-4000:]
                raise BuildError(f"the CUDA-on-CPU harness build failed (log {log}):\n{tail}")


def _cached_build(kind: str, flags: list[str], make, extra: str = "", suffix: str = "") -> str:
    """``make(tmp_path, build_dir)`` builds the artefact ``kind + suffix`` unless the cache holds it;
    returns its path."""
    key = _key(flags, extra)
    directory = os.path.join(cache_dir(), f"{kind}-{key}")
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, kind + suffix)
    with open(os.path.join(directory, "lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits for the build, then reuses it
        if not os.path.exists(target):
            tmp = f"{target}.{os.getpid()}.tmp"
            make(tmp, directory)
            os.replace(tmp, target)
    return target


def build(san: str = "") -> str:
    """The ops library for sanitizer ``san`` ("" for none): its path, built once per source hash."""
    torch_inc, torch_lib = _torch_flags()
    flags = BASE_FLAGS + _opt(san) + SANITIZERS[san] + ["-DADPO_CUDA_EMU"] + torch_inc

    def make(tmp, directory):
        tus = [(os.path.join(CSRC, "cuda", "kernels.cu"), ["-x", "c++"]),
               (os.path.join(CSRC, "cuda", "ops_cuda.cpp"), []),
               (os.path.join(EMU, "runtime.cpp"), [])]
        objs = [os.path.join(directory, os.path.basename(src) + ".o") for src, _ in tus]
        jobs = [[CXX, *flags, *lang, "-c", src, "-o", obj] for (src, lang), obj in zip(tus, objs)]
        log = os.path.join(directory, "build.log")
        _compile(jobs, log)
        _compile([[CXX, *flags, "-shared", *objs, "-o", tmp, *torch_lib, *SANITIZERS[san]]], log + ".link")

    return _cached_build(f"cuda_emu_ops-{san or 'plain'}", flags + torch_lib, make, suffix=".so")


def build_selftest(kernels_cu: str, san: str = "", name: str = "selftest") -> str:
    """The torch-free driver (csrc/cuda_emu/selftest.cpp) on the harness, with ``kernels_cu`` (the text
    of a kernels.cu, e.g. a deliberately broken copy) as the kernels: the executable's path."""
    flags = BASE_FLAGS + _opt(san) + SANITIZERS[san] + ["-I", os.path.join(CSRC, "cuda")]

    def make(tmp, directory):
        src = os.path.join(directory, f"{name}.cu")
        with open(src, "w") as f:
            f.write(kernels_cu)
        _compile([[CXX, *flags, "-x", "c++", src, "-x", "none", os.path.join(EMU, "runtime.cpp"),
                   os.path.join(EMU, "selftest.cpp"), "-o", tmp]], os.path.join(directory, "build.log"))

    digest = hashlib.sha256(kernels_cu.encode()).hexdigest()[:16]
    return _cached_build(f"cuda_emu_selftest-{name}-{san or 'plain'}", flags, make, extra=digest)


def load() -> str:
    """Builds (once) and loads the harness's ops (``torch.ops.adpo.cuda_emu_*``) for this process's
    sanitizer; :func:`registered` adds the backend too.  Returns the library's path.  Raises when the build fails or when the
    sanitizer's runtime was not preloaded."""
    san = sanitizer()
    if san in _loaded:
        return _loaded[san]
    if _loaded:
        raise RuntimeError(f"the CUDA-on-CPU harness is loaded already ({_loaded}); one build per process")
    if san and not _runtime_loaded(san):
        raise RuntimeError(f"{ENV}={san} needs the {RUNTIME_LIB[san]} runtime loaded before Python starts: run "
                           f"with LD_PRELOAD={runtime_path(san)} (.ci/sanitizers.sh does; tests.cuda_emu.sanitizer_env)")
    from adpo_kernels import ops

    path = build(san)
    ops._define(BACKEND)
    torch.ops.load_library(path)
    _loaded[san] = path
    return path


@contextlib.contextmanager
def registered():
    """:func:`load`, and the ``cuda_emu`` backend in ``dispatch.BACKENDS`` for the duration (tests
    of the user-facing backend list must not see it)."""
    from adpo_kernels import dispatch

    san = sanitizer()
    load()
    what = f"csrc/cuda on CPU threads (the CUDA-on-CPU harness, tests only{', ' + san + ' sanitizer' if san else ''})"
    dispatch.BACKENDS[BACKEND] = dispatch.FusedBackend(BACKEND, ("cpu",), dispatch.ALL_DTYPES, what, lambda: None)
    try:
        yield
    finally:
        dispatch.BACKENDS.pop(BACKEND, None)
