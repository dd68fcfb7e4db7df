"""Compile every kernel for a CUDA architecture without a GPU.

    TRITON_INTERPRET=0 python -m adpo_kernels.triton._aot [--arch 90] [--quick]

The interpreter runs the kernels as numpy code and cannot see errors of the native code
generation (a non-constexpr global, a type error in a branch that only compiles on the
GPU, register spills).  This lowers each kernel, for the signatures and constexpr
switches its launcher uses, through Triton's CUDA backend (ptxas ships with Triton) and
prints the registers and local memory (spills) of each variant.  Exit status 1 on any
failure or spill.
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


def _compile(fn, types: dict, consts: dict, num_warps: int, arch: int) -> str:
    sig = {name: ("constexpr" if name in consts else types[name]) for name in fn.arg_names}
    kernel = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps})
    return _resources(kernel.asm["cubin"])


def variants(quick: bool):
    """(label, kernel, arg types, constexprs, num_warps) for every launch the launchers make."""
    P = "*fp32"
    dts = ["bf16"] if quick else list(DTYPES)
    for dt in dts:
        t = DTYPES[dt]
        for n_type in ("i32", "i64"):  # N >= 2^31 arrives as int64
            for NP in ((6,) if quick else (1, 2, 3, 4, 5, 6)):
                for final in (False, True):
                    types = dict(out_ptr=P, t_ptr=t, **{f"p{i}": t for i in range(6)}, N=n_type, rows="i32",
                                 t_rows="i32", chunk="i32", num_chunks="i32", out_pred0="i32")
                    yield (f"mse {dt} N:{n_type} NP={NP} final={final}", mse._mse_partial_kernel, types,
                           dict(NP=NP, FINAL=final, BLOCK=2048), 8)
            types = dict(grad_ptr=t, grad_loss_ptr=P, g_ptr=P, mp_ptr=t, t_ptr=t, N=n_type, B="i32",
                         t_rows="i32", chunk="i32")
            yield f"bwd {dt} N:{n_type}", backward._pairs_bwd_kernel, types, dict(BLOCK=2048), 8
    yield ("mse finish", mse._mse_finish_kernel,
           dict(part_ptr=P, out_ptr=P, total_rows="i32", num_chunks="i32", N="i32"), dict(RB=64, CB=64), 4)
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
                yield f"pairs {name} K={K} B={Bg}", pairs._pairs_kernel, ptypes, consts, warps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    ap.add_argument("--quick", action="store_true", help="a representative subset")
    args = ap.parse_args(argv)
    if _common.is_interpreted(mse._mse_partial_kernel):
        print("TRITON_INTERPRET=1: run with TRITON_INTERPRET=0 to compile natively", file=sys.stderr)
        return 2
    failed = 0
    for label, fn, types, consts, warps in variants(args.quick):
        try:
            res = _compile(fn, types, consts, warps, args.arch)
        except Exception as exc:  # report every failing variant, not just the first
            failed += 1
            print(f"FAIL {label}: {type(exc).__name__}: {exc}")
            continue
        spill = "LOCAL:0" not in res and "REG:" in res
        failed += spill
        print(f"{'SPILL' if spill else 'ok  '} {label}: {res}")
    print(f"{failed} failures" if failed else "all kernels compile")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
