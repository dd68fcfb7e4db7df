"""Suite-wide setup: the Triton interpreter on CPU-only machines, required backends, the CPU ISA.

``ADPO_REQUIRE_BACKENDS`` (comma-separated; ``.ci/run`` sets ``cpu,cuda-built,triton``)
names backends that must be usable.  A missing one fails the session at its start, and a
test skipped for want of one fails, so that CI cannot go green because a build silently
produced less than it promised.  Names: ``cpu`` (the C++ extension ``_C``), ``cuda-built``
(``_C_cuda`` compiled, linked and importable; no GPU needed), ``cuda`` (usable on a GPU),
``triton`` (usable natively or, on a CPU, through ``TRITON_INTERPRET=1``).

Every run states which CPU instruction set ran (``ATEN_CPU_CAPABILITY`` forces it down):
in the report header, in the terminal summary, and as the ``cpu_isa`` property of every test
(``--junitxml`` records it).
"""
import importlib
import os

import pytest
import torch

# Triton kernels run in the interpreter on machines without a GPU; this must be set
# before triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".inductor_cache"))
# The toy model's UNet pre-training (adpo_train/toy.py) makes `make demo` learn visibly; the
# tests check the plumbing, so they build the toy with a short pre-training.
os.environ.setdefault("ADPO_TOY_PRETRAIN_STEPS", "20")

KNOWN_REQUIREMENTS = ("cpu", "cuda-built", "cuda", "triton")
# Phrases of the skip reasons that mean "this backend is missing" (tests/test_*.py, dispatch.py).
SKIP_PHRASES = {
    "cpu": ("CPU extension not usable", "_C not usable", "C++ extension"),
    "cuda-built": ("CUDA was not requested", "_C_cuda not built", "CUDA extension adpo_kernels._C_cuda"),
    "cuda": ("CUDA backend not usable",),
    "triton": ("triton backend unusable", "Triton kernels not usable", "Triton interpreter is off"),
}


def required_backends() -> list[str]:
    return [n.strip() for n in os.environ.get("ADPO_REQUIRE_BACKENDS", "").split(",") if n.strip()]


def _import_problem(module: str):
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001  (any failure to load means the backend is missing)
        return f"import {module} failed: {type(exc).__name__}: {exc}"
    return None


def backend_problem(name: str):
    """Why backend ``name`` (one of KNOWN_REQUIREMENTS) is not usable here, or None."""
    from adpo_kernels.dispatch import BACKENDS

    if name == "cpu":
        # Prebuilt, not JIT-built: a first-use build must not stand in for a _C that CI failed to build.
        # (This backend's status alone: asking every backend would import triton, which the sanitizer
        # legs must not: its extension aborts under ASan.)
        from adpo_kernels import _jit

        why = BACKENDS["cpu"].unavailable()
        origin = _jit.STATUS.get("cpu", {}).get("origin")
        if not why and origin != "prebuilt":
            return f"the cpu backend is {origin}, not the prebuilt adpo_kernels._C ({_jit.describe('cpu')})"
        return "; ".join(why) or _import_problem("adpo_kernels._C")
    if name == "cuda-built":
        return _import_problem("adpo_kernels._C_cuda")
    if name == "cuda":
        return "; ".join(BACKENDS["cuda"].unavailable()) or None
    if name == "triton":
        reasons = BACKENDS["triton"].unavailable()
        if not reasons and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            reasons = ["no GPU and TRITON_INTERPRET is not 1"]
        return "; ".join(reasons) or None
    return f"unknown name (expected some of {', '.join(KNOWN_REQUIREMENTS)})"


def cpu_isa() -> str:
    """``'aten <capability>, adpo _C <isa>'``: what torch and the C++ kernels dispatch to."""
    aten = torch.backends.cpu.get_cpu_capability().lower()
    try:
        kernels = importlib.import_module("adpo_kernels._C").cpu_isa()
    except Exception:  # noqa: BLE001
        kernels = "not built"
    return f"aten {aten}, adpo _C {kernels}"


def isa_problem():
    """A forced ATEN_CPU_CAPABILITY that the C++ kernels did not follow (the ISA leg would lie)."""
    forced = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    if forced not in ("avx2", "default"):
        return None
    try:
        kernels = importlib.import_module("adpo_kernels._C").cpu_isa()
    except Exception:  # noqa: BLE001  (a missing _C is reported by the backend check)
        return None
    aten = torch.backends.cpu.get_cpu_capability().lower()
    if aten != forced or kernels != forced:
        return f"ATEN_CPU_CAPABILITY={forced} but aten runs {aten} and the adpo _C kernels run {kernels}"
    return None


def pytest_report_header(config):
    req = required_backends()
    return [f"cpu isa: {cpu_isa()} (ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', 'unset')})",
            f"required backends (ADPO_REQUIRE_BACKENDS): {', '.join(req) if req else 'none'}"]


def pytest_sessionstart(session):
    problems = [f"{n}: {p}" for n in required_backends() if (p := backend_problem(n))]
    if "cpu" in required_backends() and (p := isa_problem()):
        problems.append(f"cpu isa: {p}")
    if problems:
        pytest.exit("ADPO_REQUIRE_BACKENDS: required backend missing:\n  " + "\n  ".join(problems),
                    returncode=pytest.ExitCode.TESTS_FAILED)


def pytest_collection_modifyitems(config, items):
    isa = cpu_isa()
    for item in items:
        item.user_properties.append(("cpu_isa", isa))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    req = required_backends()
    if not (req and rep.skipped and isinstance(rep.longrepr, tuple)):
        return
    reason = str(rep.longrepr[2])
    for name in req:
        if any(phrase in reason for phrase in SKIP_PHRASES.get(name, ())):
            rep.outcome = "failed"
            rep.longrepr = f"skipped for want of a backend that ADPO_REQUIRE_BACKENDS requires ({name}): {reason}"
            return


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"cpu isa of this run: {cpu_isa()}")
