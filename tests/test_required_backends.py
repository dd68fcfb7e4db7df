"""ADPO_REQUIRE_BACKENDS (tests/conftest.py): in CI a missing backend fails the suite, it does not skip.

Each case runs a small pytest session in a subprocess in which one extension cannot be
imported (``sys.modules[name] = None`` makes ``import name`` raise), as if the build had
not produced it; ``ADPO_JIT=0`` keeps the first-use build (adpo_kernels/_jit.py) from
compiling a replacement.
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = "tests/test_cpu_kernels.py::test_cpp_enums_mirror_config"  # fast; skips without _C


def _pytest_without(module, require):
    code = ("import sys; sys.modules[%r] = None; import pytest; "
            "sys.exit(pytest.main(['-q', '-rs', '-p', 'no:cacheprovider', %r]))" % (module, TARGET))
    env = {k: v for k, v in os.environ.items() if k != "ADPO_REQUIRE_BACKENDS"}
    env["ADPO_JIT"] = "0"
    if require:
        env["ADPO_REQUIRE_BACKENDS"] = require
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("module,require", [("adpo_kernels._C", "cpu"), ("adpo_kernels._C_cuda", "cuda-built"),
                                            ("triton", "triton")])
def test_missing_required_backend_fails_the_session(module, require):
    p = _pytest_without(module, f"{require},")
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert "required backend missing" in p.stdout and f"{require}:" in p.stdout, p.stdout[-2000:]


def test_missing_backend_only_skips_when_not_required():
    p = _pytest_without("adpo_kernels._C", "")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "1 skipped" in p.stdout and "CPU extension not usable" in p.stdout, p.stdout[-2000:]


def test_unknown_requirement_fails():
    p = _pytest_without("nothing_to_hide", "cpu,fortran")
    assert p.returncode == 1 and "fortran: unknown name" in p.stdout, p.stdout[-2000:]


def test_a_skip_for_a_required_backend_fails(tmp_path):
    """The second guard: a test that skips because a required backend is missing fails (even if
    the session-start check passed, e.g. a test with its own notion of the backend)."""
    (tmp_path / "test_fake.py").write_text(
        "import pytest\n\ndef test_x():\n    pytest.skip('CPU extension not usable: faked')\n")
    env = {k: v for k, v in os.environ.items() if k != "ADPO_REQUIRE_BACKENDS"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
           "--rootdir", str(tmp_path), str(tmp_path / "test_fake.py")]
    runs = {}
    for require in ("", "cpu"):
        e = dict(env, PYTHONPATH=ROOT, ADPO_REQUIRE_BACKENDS=require)
        runs[require] = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    assert runs[""].returncode == 0 and "1 skipped" in runs[""].stdout, runs[""].stdout[-2000:]
    p = runs["cpu"]
    assert p.returncode == 1 and "ADPO_REQUIRE_BACKENDS requires (cpu)" in p.stdout, p.stdout[-2000:]
