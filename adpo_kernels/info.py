"""``python -m adpo_kernels.info``: versions, build metadata, and every backend's status.

The build metadata is the ``_build_info.json`` that ``setup.py`` writes next to the
compiled extensions (torch/CUDA/Python versions, CUDA archs, which extensions were built
and why one was not).  Backends are listed with ``available_backends()``: an empty list
of reasons means usable.  ``--json`` prints everything as one JSON object.
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
    backends = adpo_kernels.available_backends()
    if not backends.get("cpu"):
        versions["cpu_kernel_isa"] = importlib.import_module("adpo_kernels._C").cpu_isa()
    return {"versions": versions, "build": build_info(), "backends": backends}


def format_report(info: dict[str, Any]) -> str:
    lines = ["adpo-kernels", "", "versions:"]
    lines += [f"  {k}: {v}" for k, v in info["versions"].items()]
    build = info["build"]
    lines += ["", "build metadata:"]
    if build is None:
        lines.append(f"  none ({BUILD_INFO_FILE} is missing: build with "
                     f"`pip install -e . --no-build-isolation`)")
    else:
        for key in ("built_at", "build_seconds", "torch", "torch_cuda", "python", "nvcc", "cuda_archs",
                    "force_cuda", "skip_cuda", "gpu_visible_at_build", "cuda_requested"):
            if key in build:
                lines.append(f"  {key}: {build[key]}")
        for name, ext in build.get("extensions", {}).items():
            status = "built" if ext.get("built") else f"not built: {ext.get('reason', 'unknown')}"
            lines.append(f"  {name}: {status}")
    lines += ["", "backends (auto order: cuda > triton > torch on GPU, cpu > torch on CPU):"]
    for name, reasons in info["backends"].items():
        status = "available" if not reasons else "unavailable: " + "; ".join(reasons)
        if name == "triton" and not reasons:
            status += " (CUDA tensors; CPU tensors only in the interpreter, TRITON_INTERPRET=1)"
        lines.append(f"  {name}: {status}")
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
