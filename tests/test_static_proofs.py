"""GPU properties proven without a GPU: the code the compilers generate for sm_90.

The row kernels are bandwidth-bound, so two properties of the generated code decide most
of the distance to the bytes floor (docs/csrc.md, docs/triton.md), and both can be read off
the compiler output on a CPU machine:

* 128-bit global accesses.  CUDA: the 16-byte-aligned (``VEC``) instantiations of the row
  kernels load every input with ``ld.global.nc.v4`` and the backward stores with
  ``st.global.*.v4`` (nvcc's PTX).  Triton: at the specialisation a real launch produces
  (aligned pointers, ``chunk`` and ``N`` multiples of 16) every input load is
  ``ld.global.v4`` and the backward's stores ``st.global.v4`` (Triton's PTX for sm_90);
  with ``N`` not a multiple of 16 rows are not 16-byte aligned and the loads are scalar
  (checked too, so that the specialisation is seen to be what makes the difference).
* No local memory: ``nvcc --resource-usage`` reports 0 bytes of stack frame and spills for
  every CUDA kernel instantiation; Triton's cubins (ptxas ships with Triton) report
  ``LOCAL:0 STACK:0``.

Also checked: the Triton scalar stage's min / max lower to the NaN-propagating
``min.NaN`` / ``max.NaN`` of the NaN rule (tests/nan_cases.py).

The three compilations (nvcc resource usage, nvcc PTX, Triton's variants in a process
pool) start together when the module's first test runs: about 15-30 s in all.  They skip
only when the compiler is absent (no CUDA toolkit; a Triton without its NVIDIA backend).
"""
from __future__ import annotations

import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS_CU = os.path.join(ROOT, "csrc", "cuda", "kernels.cu")
MSE_ITERS = 8  # csrc/cuda/kernels.h: 16-byte vectors per thread per chunk and input
# torch's CUDAExtension flags that change device code, then setup.py's
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
              "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "-arch=sm_90"]

# every instantiation kernels.cu launches: (kernel, dtype, VEC or None)
CUDA_DTYPES = {"6__half": "fp16", "13__nv_bfloat16": "bf16", "f": "fp32", "d": "fp64"}
CUDA_KERNELS = ([(k, dt, vec) for k in ("mse_partial_kernel", "pairs_bwd_kernel") for dt in CUDA_DTYPES.values()
                 for vec in (False, True)]
                + [(k, dt, None) for k in ("pairs_kernel", "mse_combine_kernel") for dt in ("fp32", "fp64")])
_NAME = re.compile(r"(mse_partial_kernel|pairs_bwd_kernel|pairs_kernel|mse_combine_kernel)I"
                   r"(6__half|13__nv_bfloat16|f|d)(?:Lb([01])E)?")


def _nvcc():
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _triton_ptxas():
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return path if os.path.exists(path) else None


def _key(mangled: str):
    m = _NAME.search(mangled)
    if m is None:
        return None
    return m.group(1), CUDA_DTYPES[m.group(2)], None if m.group(3) is None else m.group(3) == "1"


class _Jobs:
    """The three compilations, started at once and awaited by the tests that need them."""

    def __init__(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.procs = {}
        nvcc = _nvcc()
        if nvcc:
            base = [nvcc, *NVCC_FLAGS, KERNELS_CU]
            self.procs["usage"] = self._start(base + ["--resource-usage", "-c", "-o", self._path("k.o")])
            self.procs["ptx"] = self._start(base + ["-ptx", "-o", self._path("k.ptx")])
        if _triton_ptxas():
            env = dict(os.environ, TRITON_INTERPRET="0")
            self.procs["triton"] = self._start([sys.executable, "-m", "adpo_kernels.triton._aot", "--proofs"], env)
        self.results = {}

    def _path(self, name):
        return os.path.join(self.tmp.name, name)

    def _start(self, cmd, env=None):
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)

    def get(self, name, reason):
        if name not in self.procs:
            pytest.skip(reason)
        if name not in self.results:
            out, _ = self.procs[name].communicate(timeout=600)
            assert self.procs[name].returncode == 0, f"{name} compile failed:\n{out[-4000:]}"
            self.results[name] = out
        return self.results[name]

    def close(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        self.tmp.cleanup()


@pytest.fixture(scope="module")
def jobs():
    j = _Jobs()
    yield j
    j.close()


NO_NVCC = "no CUDA toolkit (nvcc) on this machine: set CUDA_HOME"
NO_TRITON = "Triton or its NVIDIA backend (ptxas) is not installed"


# -- CUDA --------------------------------------------------------------------------------

def _cuda_usage(jobs):
    out = jobs.get("usage", NO_NVCC)
    rows = {}
    for m in re.finditer(r"Function properties for (\S+)\s+(\d+) bytes stack frame, (\d+) bytes spill stores, "
                         r"(\d+) bytes spill loads", out):
        key = _key(m.group(1))
        if key is not None:
            rows[key] = tuple(int(m.group(i)) for i in (2, 3, 4))
    return rows


def _cuda_ptx(jobs):
    jobs.get("ptx", NO_NVCC)
    with open(jobs._path("k.ptx")) as f:
        ptx = f.read()
    parts = re.split(r"^\.(?:visible\s+)?\.?entry\s+(\S+)\(", ptx, flags=re.M)
    out = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        key = _key(name)
        if key is not None:
            out[key] = collections.Counter(re.findall(r"\b(?:ld|st)\.(?:global|local)(?:\.[a-z0-9]+)+", body))
    return out


def test_cuda_every_instantiation_has_no_stack_or_spills(jobs):
    rows = _cuda_usage(jobs)
    assert sorted(rows, key=str) == sorted(CUDA_KERNELS, key=str), f"instantiations found: {sorted(rows, key=str)}"
    bad = {k: v for k, v in rows.items() if v != (0, 0, 0)}
    assert not bad, "(stack frame, spill stores, spill loads) bytes not zero: " + "; ".join(
        f"{k[0]}<{k[1]}, vec={k[2]}>: {v}" for k, v in bad.items())


@pytest.mark.parametrize("kernel", ["mse_partial_kernel", "pairs_bwd_kernel"])
def test_cuda_vec_instantiations_move_16_bytes_per_access(jobs, kernel):
    ptx = _cuda_ptx(jobs)
    for dt in CUDA_DTYPES.values():
        insns = ptx[(kernel, dt, True)]
        loads = {k: v for k, v in insns.items() if k.startswith("ld.")}
        v4 = loads.pop("ld.global.nc.v4.u32", 0)
        assert v4 == 2 * MSE_ITERS, f"{kernel}<{dt}, vec>: {v4} 128-bit loads, expected 2 x {MSE_ITERS}: {insns}"
        # the backward also reads grad_loss and g_r, one scalar each
        assert sum(loads.values()) == (2 if kernel == "pairs_bwd_kernel" else 0), f"{kernel}<{dt}>: {insns}"
        assert not any(k.startswith("ld.local") or k.startswith("st.local") for k in insns), insns
        if kernel == "pairs_bwd_kernel":
            stores = {k: v for k, v in insns.items() if k.startswith("st.global")}
            assert list(stores) and all(".v4." in k for k in stores) and sum(stores.values()) == MSE_ITERS, \
                f"{kernel}<{dt}, vec>: stores {stores}, expected {MSE_ITERS} 128-bit ones"
        # the scalar fallback really is the other path (the assertion above can fail)
        assert not any(".v4." in k for k in ptx[(kernel, dt, False)]), ptx[(kernel, dt, False)]


# -- Triton ------------------------------------------------------------------------------

def _triton_facts(jobs):
    rows = [json.loads(line) for line in jobs.get("triton", NO_TRITON).splitlines() if line.startswith("{")]
    errors = [f"{r['label']}: {r['error']}" for r in rows if "error" in r]
    assert not errors, "Triton variants failed to compile natively:\n" + "\n".join(errors)
    return rows


def _split(insns, prefix):
    sel = {k: v for k, v in insns.items() if k.startswith(prefix)}
    return {k: v for k, v in sel.items() if ".v4." in k}, {k: v for k, v in sel.items() if ".v4." not in k}


def test_triton_row_kernels_use_128bit_accesses_when_n_allows(jobs):
    rows = [r for r in _triton_facts(jobs) if r["kind"] in ("mse", "bwd")]
    assert {(r["kind"], r["dtype"], r["n_div16"]) for r in rows} >= {
        (k, dt, div) for k in ("mse", "bwd") for dt in ("bf16", "fp16", "fp32") for div in (True, False)}
    for r in rows:
        what = f"{r['label']}: {r['insns']}"
        vec_ld, scalar_ld = _split(r["insns"], "ld.global")
        vec_st, scalar_st = _split(r["insns"], "st.global")
        scalars = 2 if r["kind"] == "bwd" else 0  # grad_loss and g_r, one element each
        if r["n_div16"]:
            assert vec_ld and sum(scalar_ld.values()) == scalars, "loads not all 128-bit: " + what
            if r["kind"] == "bwd":
                assert vec_st and not scalar_st, "gradient stores not all 128-bit: " + what
        else:  # rows start anywhere: element loads (the divisibility hint is what vectorises)
            assert not vec_ld and not vec_st, what


def test_triton_kernels_have_no_local_memory(jobs):
    for r in _triton_facts(jobs):
        assert "LOCAL:0" in r["resources"] and "STACK:0" in r["resources"], f"{r['label']}: {r['resources']}"


def test_triton_scalar_stage_min_max_propagate_nan(jobs):
    """Native tl.minimum / tl.maximum drop NaN unless propagate_nan is set (PTX min / max
    return the other operand); the NaN rule needs the min.NaN / max.NaN forms.  The plain
    max left is the flip quantile's reduction over values that are never NaN."""
    rows = {r["dtype"]: r["insns"] for r in _triton_facts(jobs) if r["kind"] == "pairs"}  # dtype: the loss
    assert set(rows) == {"hinge", "robust"}, rows
    for loss, insns in rows.items():
        # hinge: relu + norm guard (max), min(std, 1) (min); robust: the log-sigmoids' min too
        assert insns.get("max.NaN.f32", 0) >= (2 if loss == "hinge" else 1), f"{loss}: {insns}"
        assert insns.get("min.NaN.f32", 0) >= (1 if loss == "hinge" else 3), f"{loss}: {insns}"
        assert not insns.get("min.f32"), f"{loss}: a NaN-dropping min in the scalar stage: {insns}"
