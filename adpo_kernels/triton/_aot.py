"""Compile every kernel for a CUDA architecture without a GPU.

    TRITON_INTERPRET=0 python -m adpo_kernels.triton._aot [--arch 90] [--quick]
    TRITON_INTERPRET=0 python -m adpo_kernels.triton._aot --proofs      # JSON lines, see below

The interpreter runs the kernels as numpy code and cannot see errors of the native code
generation (a non-constexpr global, a type error in a branch that only compiles on the
GPU, register spills).  This lowers each kernel, for the signatures, constexpr switches
and specialisations its launcher produces, through Triton's CUDA backend (ptxas ships
with Triton) and prints the registers and local memory (spills) of each variant.  Exit
status 1 on any failure or spill.

Specialisation: a real launch marks every pointer argument whose address is a multiple of
16 bytes, and every integer argument that is a multiple of 16, as ``tt.divisibility = 16``
(torch's allocations are aligned; ``chunk`` is a multiple of the block).  Whether ``N`` is
a multiple of 16 decides whether rows start 16-byte aligned, hence whether the loads can
be 128-bit: both cases are compiled.

``--proofs`` compiles the variants of :func:`proof_variants` in parallel and prints, per
variant, the global load and store instructions of its PTX and the resources of its
cubin; ``tests/test_static_proofs.py`` asserts on them.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .. import config as C
from . import _common, backward, mse, pairs

DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _resources(cubin: bytes) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return "(no cuobjdump)"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    lines = [ln.strip() for ln in out.splitlines() if "REG:" in ln]
    return lines[0] if lines else "(no resource line)"


def _build(fn, types: dict, consts: dict, num_warps: int, arch: int, divisible=None):
    """``divisible``: the arguments whose values a real launch finds 16-divisible (default:
    every pointer, the 16-byte-aligned allocations of the launchers); those the kernel's
    ``do_not_specialize`` names get no hint, as at a real launch."""
    sig = {name: ("constexpr" if name in consts else types[name]) for name in fn.arg_names}
    if divisible is None:
        divisible = [n for n, t in types.items() if t.startswith("*")]
    unspecialised = {p.name for p in fn.params if p.do_not_specialize}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible if n not in unspecialised}
    return triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps})


def _compile(fn, types: dict, consts: dict, num_warps: int, arch: int, divisible=None) -> str:
    return _resources(_build(fn, types, consts, num_warps, arch, divisible).asm["cubin"])


def _row_kernel(kind: str, dt: str, n_type: str, NP: int = 1, final: bool = False):
    """Types of the row kernels (``kind`` = "mse" or "bwd") for dtype ``dt``."""
    P, t = "*fp32", DTYPES[dt]
    if kind == "mse":
        return mse._mse_partial_kernel, dict(out_ptr=P, t_ptr=t, **{f"p{i}": t for i in range(6)}, N=n_type,
                                             rows="i32", t_rows="i32", chunk="i32", num_chunks="i32",
                                             out_pred0="i32"), dict(NP=NP, FINAL=final, BLOCK=2048)
    return backward._pairs_bwd_kernel, dict(grad_ptr=t, grad_loss_ptr=P, g_ptr=P, mp_ptr=t, t_ptr=t, N=n_type,
                                            B="i32", t_rows="i32", chunk="i32"), dict(BLOCK=2048)


def _divisible(types: dict, n_div16: bool) -> list:
    """What a launch with aligned tensors specialises: pointers, chunk (a multiple of the
    block) and N when it is a multiple of 16."""
    return [n for n, t in types.items() if t.startswith("*")] + ["chunk"] + (["N"] if n_div16 else [])


# N specialisations of the row kernels: (type, N % 16 == 0); N >= 2^31 arrives as int64
N_SPECS = (("i32", True), ("i32", False), ("i64", True))


def variants(quick: bool):
    """(label, kernel, arg types, constexprs, num_warps, divisible) for the launches the launchers make."""
    P = "*fp32"
    dts = ["bf16"] if quick else list(DTYPES)
    for dt in dts:
        for n_type, div in N_SPECS:
            spec = f"N:{n_type}{'%16' if div else ''}"
            for NP in ((6,) if quick else (1, 2, 6)):
                for final in (False, True):
                    fn, types, consts = _row_kernel("mse", dt, n_type, NP, final)
                    yield (f"mse {dt} {spec} NP={NP} final={final}", fn, types, consts, 8,
                           _divisible(types, div))
            fn, types, consts = _row_kernel("bwd", dt, n_type)
            yield f"bwd {dt} {spec}", fn, types, consts, 8, _divisible(types, div)
    yield ("mse finish", mse._mse_finish_kernel,
           dict(part_ptr=P, out_ptr=P, total_rows="i32", num_chunks="i32", N="i32"), dict(RB=64, CB=64), 4, None)
    ptypes = dict(mse_ptr=P, loss_ptr=P, logits_ptr=P, metric_ptr=P, weights_ptr=P, margin_ptr=P, acc_ptr=P,
                  g_ptr=P, Bg="i32", offset="i32", num_pairs="i32", q_idx="i32", beta="fp32", rho="fp32",
                  tau="fp32", intercept="fp32", beta_ipo="fp32", eps="fp32", flip_threshold="fp32")
    cfg = C.AdaptiveDPOConfig
    base = dict(beta=500.0, rho=50.0)
    configs = [("paper", cfg.paper(), True, (2,)),
               ("all-opts+flip", cfg(logits_normalize=True, std_standardize=True, weight_normalize=True,
                                     margin_type="quadratic", flip_ratio=0.3, **base), True, (0, 2, 7)),
               ("ipo-quadratic", cfg(loss_type="ipo", margin_type="quadratic", **base), True, (1,)),
               ("robust-warmup", cfg(loss_type="robust", label_smoothing=0.1, **base), False, (2,))]
    if not quick:
        for lt in C.LOSS_TYPES:
            for wt in C.WEIGHT_TYPES:
                for mt in C.MARGIN_TYPES:
                    configs.append((f"{lt}-{wt}-{mt}", cfg(loss_type=lt, weight_type=wt, margin_type=mt,
                                                           flip_ratio=0.2, **base), True, (0, 1, 3)))
        configs.append(("dpo", cfg.dpo(), True, (0, 2)))
    for name, c, ready, ks in configs:
        for K in ks:
            for Bg in (10, 4000):
                consts, warps = pairs.kernel_meta(K + 1, Bg, c.op_params(ready)[1], interpret=False)
                yield f"pairs {name} K={K} B={Bg}", pairs._pairs_kernel, ptypes, consts, warps, None


# ---- the PTX facts of tests/test_static_proofs.py --------------------------------------

def proof_variants():
    """(label, kind, dtype, n_type, N % 16 == 0, NP, final): the row kernels at the
    specialisations real launches produce, the fewest that cover every dtype and both N cases."""
    for dt in DTYPES:
        for n_type, div in N_SPECS[:2]:
            yield (f"mse {dt} N:{n_type}{'%16' if div else ''} NP=6", "mse", dt, n_type, div, 6, False)
            yield (f"bwd {dt} N:{n_type}{'%16' if div else ''}", "bwd", dt, n_type, div, 1, False)
    yield "mse bf16 N:i64%16 NP=2 final", "mse", "bf16", "i64", True, 2, True
    yield "bwd bf16 N:i64%16", "bwd", "bf16", "i64", True, 1, False
    # the scalar stage with every min / max of the NaN rule: relu (hinge), log-sigmoid
    # (robust), the norm guard and min(std, 1) (logits_normalize, K >= 1)
    for loss in ("hinge", "robust"):
        yield f"pairs {loss} lognorm flip K=2", "pairs", loss, "i32", False, 3, False


def _pairs_nan_variant(loss: str):
    cfg = C.AdaptiveDPOConfig(loss_type=loss, logits_normalize=True, flip_ratio=0.3, beta=500.0, rho=50.0)
    consts, warps = pairs.kernel_meta(3, 10, cfg.op_params(True)[1], interpret=False)
    P = "*fp32"
    types = dict(mse_ptr=P, loss_ptr=P, logits_ptr=P, metric_ptr=P, weights_ptr=P, margin_ptr=P, acc_ptr=P,
                 g_ptr=P, Bg="i32", offset="i32", num_pairs="i32", q_idx="i32", beta="fp32", rho="fp32",
                 tau="fp32", intercept="fp32", beta_ipo="fp32", eps="fp32", flip_threshold="fp32")
    return pairs._pairs_kernel, types, consts, warps


def _ptx_facts(v) -> dict:
    """Counts of the global load / store and float min / max instructions of one variant's
    PTX, and its cubin's resources (stack, local memory)."""
    import collections
    import re
    label, kind, dt, n_type, div, NP, final = v
    try:
        if kind == "pairs":
            fn, types, consts, warps = _pairs_nan_variant(dt)
            k = _build(fn, types, consts, warps, _ARCH)
        else:
            fn, types, consts = _row_kernel(kind, dt, n_type, NP, final)
            k = _build(fn, types, consts, 8, _ARCH, _divisible(types, div))
    except Exception as exc:  # reported, the test fails on it
        return dict(label=label, error=f"{type(exc).__name__}: {exc}")
    ptx = k.asm["ptx"]
    insns = collections.Counter(re.findall(r"\b(?:ld\.global|st\.global|min|max)(?:\.[A-Za-z0-9]+)+", ptx))
    return dict(label=label, kind=kind, dtype=dt, n_type=n_type, n_div16=div, np=NP, insns=dict(insns),
                resources=_resources(k.asm["cubin"]))


_ARCH = 90


def _print_proofs(arch: int) -> int:
    import concurrent.futures
    import json
    import multiprocessing
    global _ARCH
    _ARCH = arch
    todo = list(proof_variants())
    # fork: the workers inherit the imported kernels; Triton holds no GPU context here
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, min(len(todo), os.cpu_count() or 1)),
                                                mp_context=multiprocessing.get_context("fork")) as ex:
        for facts in ex.map(_ptx_facts, todo):
            print(json.dumps(facts), flush=True)
    return 0


_VARIANTS: list = []


def _compile_one(i: int):
    label, fn, types, consts, warps, divisible = _VARIANTS[i]
    try:
        return label, _compile(fn, types, consts, warps, _ARCH, divisible), None
    except Exception as exc:  # noqa: BLE001  (reported by the caller)
        return label, None, f"{type(exc).__name__}: {exc}"


def _compile_all(todo: list, arch: int, jobs: int):
    """``(label, resources, error)`` per variant, in order, compiled by ``jobs`` forked workers
    (kernels are not picklable: the workers inherit ``todo`` and get indices)."""
    import concurrent.futures
    import multiprocessing
    global _ARCH, _VARIANTS
    _ARCH, _VARIANTS = arch, todo
    if jobs <= 1:
        yield from map(_compile_one, range(len(todo)))
        return
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as ex:
        yield from ex.map(_compile_one, range(len(todo)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    ap.add_argument("--quick", action="store_true", help="a representative subset")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: every core)")
    ap.add_argument("--proofs", action="store_true", help="JSON lines of the PTX facts tests/test_static_proofs.py checks")
    args = ap.parse_args(argv)
    if _common.is_interpreted(mse._mse_partial_kernel):
        print("TRITON_INTERPRET=1: run with TRITON_INTERPRET=0 to compile natively", file=sys.stderr)
        return 2
    if args.proofs:
        return _print_proofs(args.arch)
    failed = 0
    for label, res, err in _compile_all(list(variants(args.quick)), args.arch, args.jobs):
        if err is not None:  # report every failing variant, not just the first
            failed += 1
            print(f"FAIL {label}: {err}")
            continue
        spill = "LOCAL:0" not in res and "REG:" in res
        failed += spill
        print(f"{'SPILL' if spill else 'ok  '} {label}: {res}", flush=True)
    print(f"{failed} failures" if failed else "all kernels compile")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
