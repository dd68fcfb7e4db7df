"""Where ``adpo_kernels._C`` / ``_C_cuda`` come from: prebuilt, or built on first use.

A ``pip install`` with build isolation has no torch at build time, so it compiles nothing;
its wheel carries csrc/ (as ``adpo_kernels/csrc``).  On first use of the ``cpu`` backend
(or of ``cuda``, with a GPU and a CUDA toolkit) :func:`load_extension` then builds the
same sources with the same flags (:mod:`adpo_kernels._recipe`) through
``torch.utils.cpp_extension.load``, into the torch extensions cache::

    ${TORCH_EXTENSIONS_DIR:-~/.cache/torch_extensions}/py311_cu130/adpo_kernels/<kind>-<key>/
        build/_C.so   build.log   build.json   lock

``key`` hashes the sources, the flags, torch and Python, so a new version builds anew and
an unchanged one is reused by every later process.  The build runs in a child process
whose whole output is ``build.log``; one line on stderr says it is happening.  An exclusive
``fcntl`` lock on ``lock`` makes a second process wait for a build in progress and then
reuse it (the lock dies with its process: a killed build never blocks the next one).  A
failed build is remembered (``failed.json``) rather than retried by every process.
``ADPO_JIT=0`` turns the just-in-time build off.

:data:`STATUS` records how each module was obtained, for ``available_backends(detail=True)``
and ``python -m adpo_kernels.info``.
"""
from __future__ import annotations

import datetime
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Optional

from . import _recipe as recipe

ENV = "ADPO_JIT"
PKG_DIR = os.path.dirname(os.path.abspath(__file__))
WHAT = {"cpu": ("C++ CPU kernels", "~40 s"), "cuda": ("CUDA kernels", "~1-2 min")}
STATUS: dict[str, dict[str, Any]] = {}

# The child process: the build log is its output; importing the module there checks that it loads.
_CHILD = """import json, sys
from torch.utils.cpp_extension import load
m = load(verbose=True, **json.loads(sys.argv[1]))
print("adpo_kernels JIT: built", m.__file__, getattr(m, "cpu_isa", lambda: "")(), flush=True)
"""


class JITError(RuntimeError):
    pass


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def csrc_root() -> Optional[str]:
    """The sources: the wheel's ``adpo_kernels/csrc`` copy, else ``csrc/`` of a source checkout."""
    for cand in (os.path.join(PKG_DIR, "csrc"), os.path.join(os.path.dirname(PKG_DIR), "csrc")):
        if os.path.isfile(os.path.join(cand, "cpu", "module.cpp")):
            return cand
    return None


def cache_root() -> str:
    import torch

    # torch's default root (get_default_build_root), without importing cpp_extension, which
    # warns about CUDA_HOME on machines without a GPU
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch_extensions")
    acc = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    return os.path.join(root, f"py{sys.version_info.major}{sys.version_info.minor}_{acc}", "adpo_kernels")


def _cuda_archs() -> list[tuple[str, bool]]:
    """ADPO_CUDA_ARCHS, else TORCH_CUDA_ARCH_LIST, else the visible GPUs' own archs."""
    import torch

    spec, var = recipe.cuda_arch_spec()
    if var == "default":
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        spec, var = ";".join(f"{a}.{b}" for a, b in caps), "the visible GPUs"
    return recipe.parse_cuda_archs(spec, var)


def unavailable(kind: str) -> Optional[str]:
    """Why the JIT build of ``kind`` cannot run here, or ``None``."""
    if not enabled():
        return f"the just-in-time build is off ({ENV}={os.environ.get(ENV)})"
    if csrc_root() is None:
        return f"the csrc/ sources are not installed (looked in {PKG_DIR}/csrc and {PKG_DIR}/../csrc)"
    if kind == "cuda":
        import torch

        if torch.version.cuda is None:
            return f"torch {torch.__version__} is not a CUDA build"
        if not torch.cuda.is_available():
            return "no CUDA device visible"
        if recipe.cuda_home() is None:
            return "no CUDA toolkit found for the just-in-time build (set CUDA_HOME to a directory with bin/nvcc)"
    return None


def plan(kind: str) -> dict[str, Any]:
    """The ``torch.utils.cpp_extension.load`` arguments, the child's environment and the cache directory."""
    import torch

    root = csrc_root()
    if root is None:
        raise JITError(unavailable(kind))
    args: dict[str, Any] = {"name": recipe.MODULES[kind], "sources": recipe.sources(root, kind),
                            "with_cuda": kind == "cuda"}
    env: dict[str, str] = {}
    if kind == "cpu":
        args.update(extra_cflags=recipe.CXX_FLAGS, extra_ldflags=recipe.LINK_FLAGS)
    else:
        archs = _cuda_archs()
        args.update(extra_cflags=recipe.CUDA_CXX_FLAGS, extra_cuda_cflags=recipe.NVCC_FLAGS + recipe.gencode_flags(archs),
                    extra_include_paths=recipe.nvidia_include_dirs())
        # torch adds -gencode flags for TORCH_CUDA_ARCH_LIST (and detects them without it): make them ours
        env = {"TORCH_CUDA_ARCH_LIST": recipe.torch_arch_list(archs), "CUDA_HOME": recipe.cuda_home()}
    recipe_id = {k: v for k, v in args.items() if k != "sources"}
    key = recipe.fingerprint(root, [json.dumps([recipe_id, env], sort_keys=True), torch.__version__,
                                    str(torch.version.git_version), sys.version, platform.machine(),
                                    os.environ.get("CXX", "")])
    directory = os.path.join(cache_root(), f"{kind}-{key}")
    args["build_directory"] = os.path.join(directory, "build")
    return {"kind": kind, "key": key, "directory": directory, "load_args": args, "env": env, "csrc": root,
            "module_path": os.path.join(args["build_directory"], args["name"] + ".so"),
            "log": os.path.join(directory, "build.log")}


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ, **extra)
    path = [os.path.dirname(sys.executable)]  # ninja of this environment, when its bin/ is not on PATH
    try:
        import ninja
        path.append(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    env["PATH"] = os.pathsep.join(path + [env.get("PATH", "")])
    if not env.get("CUDA_HOME") and recipe.cuda_home():
        env["CUDA_HOME"] = recipe.cuda_home()  # else torch warns, even for the CPU build
    return env


def _build(p: dict[str, Any]) -> dict[str, Any]:
    what, eta = WHAT[p["kind"]]
    print(f"adpo_kernels: building the {what} just in time (once, {eta}; log: {p['log']}; "
          f"{ENV}=0 turns this off)...", file=sys.stderr, flush=True)
    os.makedirs(p["load_args"]["build_directory"], exist_ok=True)  # torch <= 2.13 does not create it
    stale = os.path.join(p["load_args"]["build_directory"], "lock")  # torch's own lock, left by a killed build
    if os.path.exists(stale):
        os.remove(stale)
    start = time.monotonic()
    with open(p["log"], "w") as log:
        log.write(f"# {sys.executable} building {p['load_args']['name']} from {p['csrc']}\n")
        log.flush()
        res = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(p["load_args"])], stdout=log,
                             stderr=subprocess.STDOUT, env=_child_env(p["env"]), cwd=p["directory"])
    meta = {"built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "build_seconds": round(time.monotonic() - start, 1), "key": p["key"], "csrc": p["csrc"],
            "python": sys.executable, "log": p["log"]}
    if res.returncode != 0 or not os.path.exists(p["module_path"]):
        with open(p["log"]) as f:
            tail = [ln.rstrip() for ln in f.readlines()[-3:]]
        meta["error"] = f"exit status {res.returncode}: " + " | ".join(tail)
        _write_json(os.path.join(p["directory"], "failed.json"), meta)
        raise JITError(f"the just-in-time build failed ({meta['error']}); full log: {p['log']}")
    _write_json(os.path.join(p["directory"], "build.json"), meta)
    return meta


def build(kind: str) -> dict[str, Any]:
    """Build ``kind`` once into the cache (or find it there) and return its record; no import."""
    import fcntl  # POSIX only, like the build itself

    p = plan(kind)
    os.makedirs(p["directory"], exist_ok=True)
    start = time.monotonic()
    with open(os.path.join(p["directory"], "lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # waits while another process builds this very key
        waited = round(time.monotonic() - start, 1)
        meta = _read_json(os.path.join(p["directory"], "build.json"))
        failed = _read_json(os.path.join(p["directory"], "failed.json"))
        if meta and os.path.exists(p["module_path"]):
            origin = "jit-cached"
        elif failed:
            raise JITError(f"the just-in-time build failed earlier ({failed.get('error')}); full log: "
                           f"{p['log']}; delete {p['directory']} to try again")
        else:
            meta, origin = _build(p), "jit-built"
    return dict(meta, origin=origin, path=p["module_path"], waited_for_lock_s=waited, directory=p["directory"])


def _import_as(name: str, path: str):
    """Import the built file as ``adpo_kernels.<name>``, so ``import adpo_kernels._C`` finds it too."""
    full = f"adpo_kernels.{name}"
    if full in sys.modules:
        return sys.modules[full]
    spec = importlib.util.spec_from_file_location(full, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules[full] = mod
    setattr(importlib.import_module("adpo_kernels"), name, mod)
    return mod


def load_extension(kind: str, jit: bool = True) -> Optional[str]:
    """Load ``adpo_kernels._C`` (kind "cpu") or ``_C_cuda`` ("cuda"): the prebuilt module if it is
    installed and loads, else (``jit``) a just-in-time build.  ``None`` when loaded, else why not.
    Records the outcome in :data:`STATUS`."""
    name = recipe.MODULES[kind]
    full = f"adpo_kernels.{name}"
    if full in sys.modules and STATUS.get(kind, {}).get("origin", "unavailable") != "unavailable":
        return None  # loaded already (find_spec would now describe the JIT module as installed)
    spec = importlib.util.find_spec(full)
    if spec is not None:
        try:
            importlib.import_module(full)
            STATUS[kind] = {"origin": "prebuilt", "path": spec.origin}
            return None
        except Exception as exc:  # e.g. built against another torch: the JIT build can still help
            why_prebuilt = f"prebuilt {full} failed to load ({type(exc).__name__}: {exc})"
    else:
        why_prebuilt = f"no prebuilt {full} ({_prebuilt_reason(full)})"
    why_jit = unavailable(kind) if jit else "the just-in-time build is not tried"
    if why_jit is None:
        try:
            rec = build(kind)
            _import_as(name, rec["path"])
            STATUS[kind] = dict(rec, prebuilt=why_prebuilt)
            return None
        except Exception as exc:
            why_jit = f"{type(exc).__name__}: {exc}" if not isinstance(exc, JITError) else str(exc)
    reasons = [why_prebuilt, f"just-in-time build: {why_jit}"]
    STATUS[kind] = {"origin": "unavailable", "reasons": reasons}
    return "; ".join(reasons)


def _prebuilt_reason(full: str) -> str:
    info = _read_json(os.path.join(PKG_DIR, "_build_info.json"))
    if info is None:
        return "no build metadata"
    return info.get("extensions", {}).get(full, {}).get("reason", "not in the build metadata")


def describe(kind: str) -> str:
    """One line: where the module of ``kind`` came from (after :func:`load_extension`)."""
    s = STATUS.get(kind)
    if s is None:
        return "not loaded yet"
    if s["origin"] == "prebuilt":
        return f"prebuilt at install time: {s['path']}"
    if s["origin"] in ("jit-built", "jit-cached"):
        how = "JIT-built now" if s["origin"] == "jit-built" else "JIT-built earlier, reused from the cache"
        return (f"{how} (build {s['build_seconds']} s at {s['built_at']}): {s['path']}; log: {s['log']}; "
                f"{s['prebuilt']}")
    return "unavailable: " + "; ".join(s["reasons"])
