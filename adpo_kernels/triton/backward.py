"""The gradient (``adpo::triton_pairs_bwd``), spec section 8::

    grad[i, n]     = grad_loss * g_i * (-2/N) * (model_pred[i, n]     - target[i, n])
    grad[i + B, n] = grad_loss * g_i * (+2/N) * (model_pred[i + B, n] - target[i + B, n])

(target row ``r mod T`` for a shared ``(B, N)`` target).  One pass: reads ``model_pred``
and ``target`` once, writes the gradient once in ``model_pred``'s dtype.  ``grad_loss``
is read on the device (no host sync, no branch on its value).  Same ``(rows, chunks)``
grid and 64-bit row bases as the reduction (see mse.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common


@triton.jit(do_not_specialize=["B", "t_rows"])
def _pairs_bwd_kernel(grad_ptr, grad_loss_ptr, g_ptr, mp_ptr, t_ptr, N, B, t_rows, chunk,
                      BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cid = tl.program_id(1)
    sign = tl.where(row < B, -2.0, 2.0)
    coef = tl.load(grad_loss_ptr).to(tl.float32) * tl.load(g_ptr + row % B).to(tl.float32) * sign / N
    start = cid.to(tl.int64) * chunk
    base = row.to(tl.int64) * N + start
    t_base = (row % t_rows).to(tl.int64) * N + start
    rem = tl.minimum(N - start, chunk).to(tl.int32)
    lanes = tl.arange(0, BLOCK)
    for k in range(0, chunk, BLOCK):  # a plain argument: triton 3.6's interpreter rejects tensor bounds
        offs = k + lanes
        mask = offs < rem
        x = tl.load(mp_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + t_base + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(grad_ptr + base + offs, (coef * (x - t)).to(grad_ptr.dtype.element_ty), mask=mask)


def pairs_backward(grad_loss: torch.Tensor, grad_coef: torch.Tensor, model_pred: torch.Tensor,
              target: torch.Tensor) -> torch.Tensor:
    """The launcher of ``adpo::triton_pairs_bwd``: the gradient w.r.t. ``model_pred``."""
    op = "triton_pairs_bwd"
    _common.check_device(_pairs_bwd_kernel, model_pred, op)
    _common.check_dtype(model_pred, "model_pred", op)
    _common.check_dtype(target, "target", op)
    rows = model_pred.shape[0]
    B = rows // 2
    N = model_pred.numel() // max(rows, 1)
    if rows == 0 or rows % 2 or N == 0:  # as the C++ and CUDA ops (op_checks.h)
        raise ValueError(f"adpo::{op}: model_pred must be (2B, N) with B, N > 0, got shape {tuple(model_pred.shape)}")
    t_rows = target.shape[0]
    if grad_coef.numel() != B or grad_loss.numel() != 1:
        raise ValueError(f"adpo::{op}: expected grad_coef of {B} elements and a scalar grad_loss, got "
                         f"{tuple(grad_coef.shape)} and {tuple(grad_loss.shape)}")
    if t_rows not in (rows, B) or target.numel() != t_rows * N:
        raise ValueError(f"adpo::{op}: target has shape {tuple(target.shape)}, expected ({rows}, {N}) "
                         f"or ({B}, {N})")
    mp, t = model_pred.contiguous(), target.contiguous()
    grad = _common.alloc(model_pred.shape, model_pred.dtype, model_pred.device)
    plan = _common.plan_rows(N, rows, model_pred.device, _common.is_interpreted(_pairs_bwd_kernel))
    with _common.device_guard(model_pred):
        _pairs_bwd_kernel[(rows, plan.num_chunks)](
            grad, grad_loss.contiguous(), grad_coef.contiguous(), mp, t, N, B, t_rows, plan.chunk,
            BLOCK=plan.block, num_warps=plan.num_warps)
    return grad
