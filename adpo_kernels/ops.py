"""The ``adpo::`` torch ops: one schema per stage, shared by every fused backend.

Each fused backend ``b`` (``triton``, ``cuda``, ``cpu``) implements the same three ops:

``adpo::{b}_mse(Tensor model_pred, Tensor ref_pred, Tensor target, Tensor[] annotators) -> Tensor``
    Inputs are 2-D and contiguous: predictions ``(2B, N)``, ``target`` ``(2B, N)`` or a
    shared ``(B, N)`` (row ``j`` uses target row ``j mod B``).  Returns ``(2 + K, 2B)``
    per-row MSEs in the accumulation dtype (fp32; fp64 for fp64 inputs): row 0 the
    policy, row 1 the reference, rows 2.. the annotators.  Deterministic (fixed-order
    reduction, no float atomics).

``adpo::{b}_pairs(Tensor mse, Tensor model_pred, Tensor target, int offset, int num_pairs,
float[] fparams, int[] iparams) -> (loss, logits, metric, weights, margin, implicit_acc, grad_coef)``
    The scalar stage.  ``mse`` is ``(2 + K, 2, B_global)`` (winners then losers, all
    processes' pairs when ``sync_stats`` gathered them); this process owns pairs
    ``offset .. offset + num_pairs``.  Batch statistics run over all ``B_global`` pairs;
    ``loss`` and ``implicit_acc`` are means over the local pairs.  ``grad_coef`` is
    ``g_i = d loss / d z_i`` of the local pairs.  ``fparams`` / ``iparams`` are
    :meth:`AdaptiveDPOConfig.op_params` (indices ``F_*`` / ``I_*`` in config.py).
    ``model_pred`` and ``target`` (the 2-D tensors given to ``_mse``) are not read in the
    forward: they are inputs so that autograd can route ``d loss / d model_pred``.

``adpo::{b}_pairs_bwd(Tensor grad_loss, Tensor grad_coef, Tensor model_pred, Tensor target) -> Tensor``
    ``grad[i] = grad_loss * g_i * (-2/N) * (model_pred[i] - target[i])`` for winners and
    ``(+2/N)`` for losers, in ``model_pred``'s dtype.

The schemas, fake (meta) implementations and autograd formulas live here, once; the
backends register only their kernels (C++ via ``TORCH_LIBRARY_IMPL(adpo, CPU/CUDA)``,
Triton from ``adpo_kernels/triton``).
"""
from __future__ import annotations

import torch

FUSED_BACKENDS = ("triton", "cuda", "cpu")

SCHEMAS = {
    "mse": "(Tensor model_pred, Tensor ref_pred, Tensor target, Tensor[] annotators) -> Tensor",
    "pairs": ("(Tensor mse, Tensor model_pred, Tensor target, int offset, int num_pairs, "
              "float[] fparams, int[] iparams) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"),
    "pairs_bwd": "(Tensor grad_loss, Tensor grad_coef, Tensor model_pred, Tensor target) -> Tensor",
}


def op_name(backend: str, stage: str) -> str:
    return f"adpo::{backend}_{stage}"


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_mse(model_pred, ref_pred, target, annotators):
    return model_pred.new_empty((2 + len(annotators), model_pred.shape[0]), dtype=_acc(model_pred.dtype))


def _fake_pairs(mse, model_pred, target, offset, num_pairs, fparams, iparams):
    scalar = mse.new_empty(())
    vec = [mse.new_empty((num_pairs,)) for _ in range(5)]
    return scalar, vec[0], vec[1], vec[2], vec[3], mse.new_empty(()), vec[4]


def _fake_pairs_bwd(grad_loss, grad_coef, model_pred, target):
    # contiguous like every kernel's output (empty_like would keep a transposed input's strides)
    return model_pred.new_empty(model_pred.shape)


def _make_autograd(backend: str):
    bwd = getattr(torch.ops.adpo, f"{backend}_pairs_bwd")

    def setup_context(ctx, inputs, output):
        _, model_pred, target = inputs[:3]
        ctx.save_for_backward(output[6], model_pred, target)

    def backward(ctx, grad_loss, *unused):
        grad_coef, model_pred, target = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[1]:
            grad = bwd(grad_loss, grad_coef, model_pred, target)
        return None, grad, None, None, None, None, None

    return setup_context, backward


def _define(backend: str) -> None:
    for stage, schema in SCHEMAS.items():
        torch.library.define(op_name(backend, stage), schema)
    torch.library.register_fake(op_name(backend, "mse"))(_fake_mse)
    torch.library.register_fake(op_name(backend, "pairs"))(_fake_pairs)
    torch.library.register_fake(op_name(backend, "pairs_bwd"))(_fake_pairs_bwd)
    setup_context, backward = _make_autograd(backend)
    torch.library.register_autograd(op_name(backend, "pairs"), backward, setup_context=setup_context)


for _b in FUSED_BACKENDS:
    _define(_b)
