"""``python -m adpo_kernels.info``: versions, build metadata, and every backend's status.

The build metadata is the ``_build_info.json`` that ``setup.py`` writes into the package
(torch/CUDA/Python versions, CUDA archs, which extensions were built at install time and
why one was not).  Backends are listed with ``available_backends(detail=True)``: usable or
not and why, and where each one's code came from: prebuilt at install time, built just in
time on first use (with the path of the module and of its build log), or the Python
packages.  Collecting this loads the extensions, so it may run the just-in-time build
(adpo_kernels/_jit.py) itself.  ``--json`` prints everything as one JSON object.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import sys
from typing import Any, Optional

BUILD_INFO_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")


def build_info() -> Optional[dict[str, Any]]:
    """The build metadata, or ``None`` when the package was not built by setup.py."""
    try:
        with open(BUILD_INFO_FILE) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict[str, Any]:
    import torch

    import adpo_kernels

    versions = {
        "adpo_kernels": adpo_kernels.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "num_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        versions["gpu"] = torch.cuda.get_device_name()
        versions["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    else:
        versions["gpu"] = None
    from . import _jit

    detail = adpo_kernels.available_backends(detail=True)
    backends = {name: d["reasons"] for name, d in detail.items()}
    if not backends.get("cpu"):
        versions["cpu_kernel_isa"] = importlib.import_module("adpo_kernels._C").cpu_isa()
    jit = {"enabled": _jit.enabled(), "sources": _jit.csrc_root(), "cache": _jit.cache_root(),
           "records": {k: v for k, v in _jit.STATUS.items() if v.get("origin", "").startswith("jit")}}
    return {"versions": versions, "build": build_info(), "backends": backends,
            "origins": {name: {k: d[k] for k in ("origin", "how")} for name, d in detail.items()}, "jit": jit}


def format_report(info: dict[str, Any]) -> str:
    lines = ["adpo-kernels", "", "versions:"]
    lines += [f"  {k}: {v}" for k, v in info["versions"].items()]
    build = info["build"]
    lines += ["", "build metadata:"]
    if build is None:
        lines.append(f"  none ({BUILD_INFO_FILE} is missing: a source checkout that was never built)")
    else:
        for key in ("built_at", "build_seconds", "torch", "torch_cuda", "python", "nvcc", "cuda_archs",
                    "force_cuda", "skip_cuda", "gpu_visible_at_build", "cuda_requested"):
            if key in build:
                lines.append(f"  {key}: {build[key]}")
        for name, ext in build.get("extensions", {}).items():
            status = "built" if ext.get("built") else f"not built: {ext.get('reason', 'unknown')}"
            lines.append(f"  {name}: {status}")
    jit = info["jit"]
    lines += ["", f"just-in-time build ({'on' if jit['enabled'] else 'off'}, ADPO_JIT): sources {jit['sources']}, "
                  f"cache {jit['cache']}"]
    lines += ["", "backends (auto order: cuda > triton > torch on GPU, cpu > torch on CPU):"]
    for name, reasons in info["backends"].items():
        origin = info["origins"][name]
        status = "available" if not reasons else "unavailable: " + "; ".join(reasons)
        if name == "triton" and not reasons:
            status += " (CUDA tensors; CPU tensors only in the interpreter, TRITON_INTERPRET=1)"
        lines.append(f"  {name}: {status}")
        if origin["origin"] not in ("python", "unavailable"):
            lines.append(f"    from: {origin['how']}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adpo_kernels.info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2, default=str) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
