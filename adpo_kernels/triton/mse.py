"""Per-row mean squared errors of every prediction against the target (``adpo::triton_mse``).

    mse(p)_j = (1/N) * sum_n (p[j, n] - target[j mod T, n])^2        j = 0 .. 2B-1

for ``p`` in ``[model_pred, ref_pred, annotator_0, ...]`` (spec section 2; ``T = 2B`` for a
full target, ``T = B`` for the shared epsilon-prediction noise, which is indexed, never
repeated).  No gradient flows through this op (``adpo::triton_pairs`` routes it).

One program handles one chunk of one row for up to ``MAX_PREDS`` predictions at once:
the target chunk is loaded once and every prediction's squared error is accumulated in
fp32 registers, so each input byte crosses memory exactly once.  Rows are split into
chunks (see ``_common.plan_rows``); the per-chunk partial sums are then added by a
second tiny launch in a fixed order (deterministic, no float atomics).  When a row fits
one chunk the first launch writes the final MSE directly.  More than ``MAX_PREDS``
predictions (K > 4 annotators) take one extra launch per group of ``MAX_PREDS``, each
re-reading the target.

Row bases are 64-bit (``row * N`` and ``chunk_id * chunk`` in int64), offsets inside a
chunk 32-bit, so tensors of more than 2^31 elements are addressed correctly.
See docs/triton.md.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from . import _common

MAX_PREDS = 6  # predictions per launch: model, ref and up to 4 annotators


@triton.jit
def _sq_err(acc, row_ptr, offs, mask, t):
    x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = x - t
    return acc + d * d


@triton.jit(do_not_specialize=["rows", "t_rows", "num_chunks", "out_pred0"])
def _mse_partial_kernel(
    out_ptr, t_ptr, p0, p1, p2, p3, p4, p5,
    N, rows, t_rows, chunk, num_chunks, out_pred0,
    NP: tl.constexpr, FINAL: tl.constexpr, BLOCK: tl.constexpr,
):
    """Sum of squared errors of chunk ``program_id(1)`` of row ``program_id(0)``.

    Writes ``out[out_pred0 + i, row, chunk_id]`` (partials) or, when ``FINAL`` (one chunk
    per row), ``out[out_pred0 + i, row] = sum / N``, for the ``NP`` predictions ``p0..``.
    """
    row = tl.program_id(0)
    cid = tl.program_id(1)
    start = cid.to(tl.int64) * chunk
    base = row.to(tl.int64) * N + start
    t_base = (row % t_rows).to(tl.int64) * N + start
    rem = tl.minimum(N - start, chunk).to(tl.int32)  # elements of this chunk, < 2^31
    lanes = tl.arange(0, BLOCK)
    a0 = tl.zeros((BLOCK,), tl.float32)
    a1 = tl.zeros((BLOCK,), tl.float32)
    a2 = tl.zeros((BLOCK,), tl.float32)
    a3 = tl.zeros((BLOCK,), tl.float32)
    a4 = tl.zeros((BLOCK,), tl.float32)
    a5 = tl.zeros((BLOCK,), tl.float32)
    for k in range(0, chunk, BLOCK):  # a plain argument: triton 3.6's interpreter rejects tensor bounds
        offs = k + lanes
        mask = offs < rem
        # fp32 right after the load: the interpreter's bf16 arithmetic is wrong
        t = tl.load(t_ptr + t_base + offs, mask=mask, other=0.0).to(tl.float32)
        a0 = _sq_err(a0, p0 + base, offs, mask, t)
        if NP > 1:
            a1 = _sq_err(a1, p1 + base, offs, mask, t)
        if NP > 2:
            a2 = _sq_err(a2, p2 + base, offs, mask, t)
        if NP > 3:
            a3 = _sq_err(a3, p3 + base, offs, mask, t)
        if NP > 4:
            a4 = _sq_err(a4, p4 + base, offs, mask, t)
        if NP > 5:
            a5 = _sq_err(a5, p5 + base, offs, mask, t)
    if FINAL:
        stride = rows.to(tl.int64)
        dst = out_ptr + out_pred0.to(tl.int64) * stride + row
        scale = N.to(tl.float32)
    else:
        stride = rows.to(tl.int64) * num_chunks
        dst = out_ptr + out_pred0.to(tl.int64) * stride + row.to(tl.int64) * num_chunks + cid
        scale = 1.0
    tl.store(dst, tl.sum(a0, axis=0) / scale)
    if NP > 1:
        tl.store(dst + stride, tl.sum(a1, axis=0) / scale)
    if NP > 2:
        tl.store(dst + 2 * stride, tl.sum(a2, axis=0) / scale)
    if NP > 3:
        tl.store(dst + 3 * stride, tl.sum(a3, axis=0) / scale)
    if NP > 4:
        tl.store(dst + 4 * stride, tl.sum(a4, axis=0) / scale)
    if NP > 5:
        tl.store(dst + 5 * stride, tl.sum(a5, axis=0) / scale)


@triton.jit(do_not_specialize=["total_rows", "num_chunks", "N"])
def _mse_finish_kernel(part_ptr, out_ptr, total_rows, num_chunks, N,
                       RB: tl.constexpr, CB: tl.constexpr):
    """``out[r] = (sum_c part[r, c]) / N`` in a fixed order, ``RB`` rows per program."""
    r = tl.program_id(0).to(tl.int64) * RB + tl.arange(0, RB)
    rmask = r < total_rows
    acc = tl.zeros((RB, CB), tl.float32)
    for c0 in range(0, num_chunks, CB):
        c = c0 + tl.arange(0, CB)
        m = rmask[:, None] & (c[None, :] < num_chunks)
        acc += tl.load(part_ptr + r[:, None] * num_chunks + c[None, :], mask=m, other=0.0)
    tl.store(out_ptr + r, tl.sum(acc, axis=1) / N.to(tl.float32), mask=rmask)


def row_mse(model_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor,
            annotators: Sequence[torch.Tensor]) -> torch.Tensor:
    """The launcher of ``adpo::triton_mse``: ``(2 + K, 2B)`` fp32 per-row MSEs."""
    op = "triton_mse"
    preds = [model_pred, ref_pred, *annotators]
    _common.check_device(_mse_partial_kernel, model_pred, op)
    rows = model_pred.shape[0] if model_pred.dim() else 0
    N = (model_pred.numel() // rows if rows else 0) if model_pred.dim() > 1 else 1
    if rows == 0 or rows % 2 or N == 0:  # as the C++ and CUDA ops (op_checks.h)
        raise ValueError(f"adpo::{op}: model_pred must be (2B, N) with B, N > 0, got shape {tuple(model_pred.shape)}")
    for i, p in enumerate(preds):
        _common.check_dtype(p, f"prediction {i}", op)
        if p.shape[0] != rows or p.numel() != rows * N or p.device != model_pred.device:
            raise ValueError(f"adpo::{op}: prediction {i} has shape {tuple(p.shape)} on {p.device}, "
                             f"expected ({rows}, {N}) on {model_pred.device}")
    _common.check_dtype(target, "target", op)
    t_rows = target.shape[0]
    if t_rows not in (rows, rows // 2) or target.numel() != t_rows * N:
        raise ValueError(f"adpo::{op}: target has shape {tuple(target.shape)}, expected ({rows}, {N}) "
                         f"or ({rows // 2}, {N})")
    preds = [p.contiguous() for p in preds]
    target = target.contiguous()
    P = len(preds)
    device = model_pred.device
    out = _common.alloc((P, rows), torch.float32, device)
    row_bytes = N * (sum(p.element_size() for p in preds) + target.element_size())
    plan = _common.plan_rows(N, rows, device, _common.is_interpreted(_mse_partial_kernel), row_bytes)
    final = plan.num_chunks == 1
    part = out if final else _common.alloc((P, rows, plan.num_chunks), torch.float32, device)
    with _common.device_guard(model_pred):
        for g0 in range(0, P, MAX_PREDS):
            group = preds[g0:g0 + MAX_PREDS]
            ptrs = group + [target] * (MAX_PREDS - len(group))  # never dereferenced
            _mse_partial_kernel[(rows, plan.num_chunks)](
                part, target, *ptrs, N, rows, t_rows, plan.chunk, plan.num_chunks, g0,
                NP=len(group), FINAL=final, BLOCK=plan.block, num_warps=plan.num_warps)
        if not final:
            total = P * rows
            CB = min(_common.next_pow2(plan.num_chunks), 64)
            RB = max(1, min(_common.next_pow2(total), 4096 // CB))
            _mse_finish_kernel[(_common.cdiv(total, RB),)](
                part, out, total, plan.num_chunks, N, RB=RB, CB=CB, num_warps=4)
    return out
