"""Where the kernels come from: prebuilt by the install, or built just in time on first use.

The whole just-in-time path on an installed wheel (``pip wheel .`` with build isolation, a
fresh environment, the loss against the reference, a second process reusing the build)
runs in CI's wheel leg, ``.ci/wheel.sh``.  Here: the editable install reports "prebuilt",
a missing module with ``ADPO_JIT=0`` is a stated reason, the lock lets one process of two
build, and a failed build is reported with its log and not retried.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

import adpo_kernels as ak
from adpo_kernels import _jit, _recipe
from adpo_kernels import info as info_mod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = info_mod.build_info()
PREBUILT_CPU = bool(BUILD and BUILD["extensions"]["adpo_kernels._C"].get("built"))

# Makes a process see no prebuilt module, as after an isolated `pip install` (no torch at build time).
HIDE_PREBUILT = textwrap.dedent("""
    import importlib.util as u
    _real = u.find_spec
    u.find_spec = lambda name, *a, **k: None if name in ("adpo_kernels._C", "adpo_kernels._C_cuda") \\
        else _real(name, *a, **k)
""")


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=ROOT, **env))


@pytest.mark.skipif(not PREBUILT_CPU, reason="the C++ extension was not built by `pip install -e . --no-build-isolation`")
def test_editable_install_reports_prebuilt():
    cpu = ak.available_backends(detail=True)["cpu"]
    assert cpu["usable"] and cpu["origin"] == "prebuilt", cpu
    assert cpu["how"].startswith("prebuilt at install time: " + os.path.join(ROOT, "adpo_kernels", "_C")), cpu
    res = _python("import sys; from adpo_kernels import info; sys.exit(info.main([]))")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    i = lines.index("  cpu: available")
    assert lines[i + 1].startswith("    from: prebuilt at install time: "), lines[i:i + 2]
    assert "building" not in res.stderr


def test_no_prebuilt_and_jit_off_is_a_stated_reason(tmp_path):
    code = HIDE_PREBUILT + textwrap.dedent("""
        import json, torch, adpo_kernels as ak
        from adpo_kernels import dispatch
        print(json.dumps(ak.available_backends(detail=True)["cpu"]))
        print(dispatch.select("auto", torch.device("cpu"), torch.float32, 0).name)
    """)
    res = _python(code, ADPO_JIT="0", TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert res.returncode == 0, res.stderr
    detail, chosen = res.stdout.strip().splitlines()[-2:]
    cpu = json.loads(detail)
    assert not cpu["usable"] and cpu["origin"] == "unavailable", cpu
    assert "no prebuilt adpo_kernels._C" in cpu["how"] and "ADPO_JIT=0" in cpu["how"], cpu
    assert chosen == "torch"
    assert list(tmp_path.iterdir()) == [] and "building" not in res.stderr  # nothing was built


def test_lock_lets_one_of_two_processes_build(tmp_path):
    """Two processes start the same build: one builds, the other waits on the lock and
    reuses it.  The build is a stand-in that waits until both processes have arrived."""
    code = textwrap.dedent("""
        import json, os, sys, time
        from adpo_kernels import _jit
        tmp = sys.argv[1]

        def fake_build(p):
            with open(os.path.join(tmp, "builds"), "a") as f:
                f.write(f"{os.getpid()}\\n")
            deadline = time.time() + 120
            while len([f for f in os.listdir(tmp) if f.startswith("ready-")]) < 2 and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)  # the other process is now blocked on the lock
            os.makedirs(os.path.dirname(p["module_path"]), exist_ok=True)
            open(p["module_path"], "w").close()
            meta = {"built_at": "now", "build_seconds": 1.0, "log": p["log"]}
            _jit._write_json(os.path.join(p["directory"], "build.json"), meta)
            return meta

        _jit._build = fake_build
        _jit.plan("cpu")  # imports torch before announcing readiness
        open(os.path.join(tmp, f"ready-{os.getpid()}"), "w").close()
        rec = _jit.build("cpu")
        print(json.dumps({"origin": rec["origin"], "waited": rec["waited_for_lock_s"]}))
    """)
    env = dict(os.environ, PYTHONPATH=ROOT, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    recs = sorted((json.loads(o[0].strip().splitlines()[-1]) for o in outs), key=lambda r: r["origin"])
    assert (tmp_path / "builds").read_text().count("\n") == 1, "both processes built"
    assert [r["origin"] for r in recs] == ["jit-built", "jit-cached"], recs
    assert recs[1]["waited"] >= 0.5, recs  # it waited for the build rather than finding it done


def test_failed_build_is_reported_with_its_log_and_not_retried(tmp_path, monkeypatch):
    csrc = tmp_path / "csrc"
    (csrc / "cpu").mkdir(parents=True)
    (csrc / "cpu" / "module.cpp").write_text("#error adpo test: broken on purpose\n")
    monkeypatch.setattr(_jit, "csrc_root", lambda: str(csrc))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    with pytest.raises(_jit.JITError, match=r"the just-in-time build failed .*full log: (\S+build\.log)") as err:
        _jit.build("cpu")
    log = str(err.value).rsplit("full log: ", 1)[1]
    assert "broken on purpose" in open(log).read()
    start = time.monotonic()
    with pytest.raises(_jit.JITError, match="failed earlier .* delete .* to try again"):
        _jit.build("cpu")
    assert time.monotonic() - start < 2.0  # remembered, not compiled again


def test_cache_key_follows_sources_and_flags(tmp_path):
    (tmp_path / "cpu").mkdir()
    src = tmp_path / "cpu" / "a.cpp"
    src.write_text("int a;\n")
    k0 = _recipe.fingerprint(str(tmp_path), ["-O3"])
    assert _recipe.fingerprint(str(tmp_path), ["-O3"]) == k0
    assert _recipe.fingerprint(str(tmp_path), ["-O2"]) != k0
    src.write_text("int b;\n")
    assert _recipe.fingerprint(str(tmp_path), ["-O3"]) != k0


def test_cpu_sources_link_isa_specific_kernels_last():
    names = [os.path.basename(f) for f in _recipe.sources(os.path.join(ROOT, "csrc"), "cpu")]
    assert "module.cpp" in names and "kernels_default.cpp" in names
    isa = [i for i, n in enumerate(names) if "avx" in n]
    assert isa and min(isa) > max(i for i, n in enumerate(names) if "avx" not in n), names


def test_cuda_arch_default_follows_torch_cuda_arch_list():
    assert _recipe.cuda_arch_spec({}) == ("8.0;9.0+PTX", "default")
    assert _recipe.cuda_arch_spec({"TORCH_CUDA_ARCH_LIST": "8.6"}) == ("8.6", "TORCH_CUDA_ARCH_LIST")
    assert _recipe.cuda_arch_spec({"TORCH_CUDA_ARCH_LIST": "8.6", "ADPO_CUDA_ARCHS": "90a"}) == \
        ("90a", "ADPO_CUDA_ARCHS")
    assert _recipe.parse_cuda_archs("8.0;9.0+PTX") == [("80", False), ("90", True)]
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST: cannot parse arch 'hopper'"):
        _recipe.parse_cuda_archs("Hopper", "TORCH_CUDA_ARCH_LIST")


def test_cuda_plan_uses_the_install_time_recipe(monkeypatch):
    """The CUDA JIT build compiles with setup.py's flags; without a GPU it is not attempted."""
    import torch

    monkeypatch.setenv("ADPO_CUDA_ARCHS", "8.0;9.0+PTX")
    p = _jit.plan("cuda")
    args = p["load_args"]
    assert [os.path.basename(s) for s in args["sources"]] == ["kernels.cu", "module.cpp", "ops_cuda.cpp"]
    assert args["name"] == "_C_cuda" and args["with_cuda"]
    assert args["extra_cuda_cflags"] == _recipe.NVCC_FLAGS + [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90"]
    assert p["env"]["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0+PTX"
    monkeypatch.setenv("ADPO_CUDA_ARCHS", "9.0")
    assert _jit.plan("cuda")["key"] != p["key"]  # other archs, another cache entry
    if torch.version.cuda and not torch.cuda.is_available():
        assert "no CUDA device visible" in (_jit.unavailable("cuda") or "")
