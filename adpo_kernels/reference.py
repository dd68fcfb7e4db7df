"""The literal torch implementation of Diffusion-DPO / Adaptive-DPO.

This is the oracle: every fused backend is tested against it run in float64.  It follows
``docs/math.md`` (= ``shared/spec/ADAPTIVE_DPO.md`` sections 2-8) line by line, favouring
clarity over speed; it materialises fp32 copies of every input, which the fused backends
exist to avoid.  Gradients come from autograd through ``z``; the metric, weights and
margins are computed on detached values.

Conventions that the spec leaves open, shared by every backend:

* ``adaptive=False`` is plain DPO: ``m = 0``, ``w = 1``, ``gamma = 0``, no flipping,
  whatever ``margin_type`` / ``weight_type`` say.
* Warm-up (``adaptive=True, annotators_ready=False``): ``m = 0``, and the weight and
  margin formulas are applied to it (``w = 1/c`` for ``linear``, ``gamma = zbar``).
* ``logits_normalize``, ``std_standardize`` and ``weight_normalize`` apply only with
  K >= 1 annotators, as in the spec.  The batch L2 norm is clamped to at least 1e-12
  (``F.normalize``'s guard); ``weight_normalize`` leaves ``m`` unchanged when
  ``sum_j m_j == 0`` (then every ``m_j`` is 0).
* For IPO, ``mean_j(z_j / beta)`` of the margin is detached like every batch statistic.
* With label flipping, ``zbar`` (and IPO's ``mean_j(z_j / beta)``) is the mean of the
  flipped logits (``-z_j`` for flipped pairs), as the spec (section 7) and the authors'
  script compute it; the returned ``logits`` and ``implicit_acc`` stay unflipped.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from . import distributed
from .config import AdaptiveDPOConfig
from .output import AdaptiveDPOOutput

NORM_EPS = 1e-12


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(2B,)`` per-row MSE; ``target`` is ``(2B, *S)`` or a shared ``(B, *S)``."""
    acc = accumulation_dtype(pred.dtype)
    rows = pred.shape[0]
    p = pred.reshape(rows, -1).to(acc)
    t = target.reshape(target.shape[0], -1).to(acc)
    if t.shape[0] != rows:  # shared noise: broadcast over the two halves, no repeat
        return ((p.view(2, rows // 2, -1) - t.unsqueeze(0)) ** 2).mean(-1).reshape(rows)
    return ((p - t) ** 2).mean(-1)


def pair_diff(mse: torch.Tensor) -> torch.Tensor:
    half = mse.shape[-1] // 2
    return mse[..., :half] - mse[..., half:]


def weight_fn(m: torch.Tensor, cfg: AdaptiveDPOConfig) -> torch.Tensor:
    tau, c = cfg.tau, cfg.intercept
    if cfg.weight_type == "linear":
        return 1.0 / (tau * m + c)
    if cfg.weight_type == "quadratic":
        return 1.0 / (tau * m * m + c)
    if cfg.weight_type == "sqrt":
        return 1.0 / (torch.exp(tau * torch.sqrt(m)) + c)
    return 1.0 / (torch.exp(tau * m) + c)  # exp


def minority_metric(Z: torch.Tensor, cfg: AdaptiveDPOConfig) -> torch.Tensor:
    """Spec section 4 on detached logits ``Z`` of shape ``(K+1, B)`` (row 0: the policy)."""
    z = Z[0]
    if Z.shape[0] == 1:
        return torch.sigmoid(-cfg.rho * z)  # = 1 - sigmoid(rho z), without the cancellation
    Zn = Z
    if cfg.logits_normalize:
        Zn = Z / torch.linalg.vector_norm(Z, dim=1, keepdim=True).clamp_min(NORM_EPS)
    s = cfg.rho * Zn
    c = torch.sigmoid(-s).mean(0)  # = 1 - mean_k sigmoid(s_k)
    d = torch.clamp(s.std(0, unbiased=True), max=1.0)
    m = c * d
    if cfg.std_standardize:
        d_mean = d.mean()
        m = torch.where(d_mean == 0, torch.sigmoid(-cfg.rho * z), m / d_mean)
    if cfg.weight_normalize:
        total = m.sum()
        m = torch.where(total == 0, m, m / total)
    return m


def flip_mask(m: torch.Tensor, cfg: AdaptiveDPOConfig) -> torch.Tensor:
    """Spec section 7: pairs whose metric exceeds ``max(h, quantile)``."""
    B = m.shape[0]
    q = torch.sort(m).values[min(int(B * (1.0 - cfg.flip_ratio)), B - 1)]
    return m > torch.clamp(q, min=cfg.flip_threshold)


def pair_losses(z, m, w, gamma, zbar, flipped, cfg: AdaptiveDPOConfig):
    """Per-pair losses (spec section 6); ``z`` carries the gradient, the rest is detached."""
    beta = cfg.beta
    zz = torch.where(flipped, -z, z)
    if cfg.loss_type == "sigmoid":
        return -w * F.logsigmoid(beta * zz - gamma)
    if cfg.loss_type == "ipo":
        shift = -1.0 / (2.0 * cfg.beta_ipo)
        if cfg.adaptive and cfg.margin_type is not None:
            mm = m if cfg.margin_type == "linear" else m * m
            shift = shift - mm / beta ** 2 + zbar / beta
        return w * (zz + shift) ** 2
    if cfg.loss_type == "hinge":
        return torch.relu(1.0 - beta * zz)
    eps = cfg.label_smoothing
    pos, neg = F.logsigmoid(beta * zz), F.logsigmoid(-beta * zz)
    if cfg.loss_type == "robust":
        return (-(1.0 - eps) * pos + eps * neg) / (1.0 - 2.0 * eps)
    return -(1.0 - eps) * pos - eps * neg  # conservative


def margin_fn(m: torch.Tensor, zbar: torch.Tensor, cfg: AdaptiveDPOConfig) -> torch.Tensor:
    if cfg.margin_type is None:
        return torch.zeros_like(m)
    mm = m if cfg.margin_type == "linear" else m * m
    return zbar - mm / cfg.beta


def forward(model_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor,
            annotators: Sequence[torch.Tensor], cfg: AdaptiveDPOConfig,
            annotators_ready: bool = True) -> AdaptiveDPOOutput:
    """The whole loss.  Inputs are assumed validated (see ``_validate.py``)."""
    target = target.detach()
    model_mse = row_mse(model_pred, target)
    with torch.no_grad():
        ref_mse = row_mse(ref_pred.detach(), target)
        annot_mse = [row_mse(a.detach(), target) for a in annotators]
    ref_diff = pair_diff(ref_mse)
    z = ref_diff - pair_diff(model_mse)  # (B,), differentiable
    B = z.shape[0]

    with torch.no_grad():
        Z_local = torch.stack([z.detach()] + [ref_diff - pair_diff(a) for a in annot_mse])
        Z, off = distributed.gather_pairs(Z_local, cfg.sync_stats)
        if not cfg.adaptive or not annotators_ready:
            m = torch.zeros_like(Z[0])
        else:
            m = minority_metric(Z, cfg)
        if cfg.adaptive and cfg.flip_ratio > 0:
            flipped = flip_mask(m, cfg)
        else:
            flipped = torch.zeros_like(m, dtype=torch.bool)
        zbar = torch.where(flipped, -Z[0], Z[0]).mean()  # spec section 7: over the flipped logits
        if cfg.adaptive:
            w = weight_fn(m, cfg)
            gamma = margin_fn(m, zbar, cfg)
        else:
            w, gamma = torch.ones_like(m), torch.zeros_like(m)
        sl = slice(off, off + B)
        m, w, gamma, flipped = m[sl], w[sl], gamma[sl], flipped[sl]

    losses = pair_losses(z, m, w, gamma, zbar, flipped, cfg)
    loss = losses.mean()
    zd = z.detach()
    acc = (zd > 0).to(zd.dtype).mean() + 0.5 * (zd == 0).to(zd.dtype).mean()
    return AdaptiveDPOOutput(loss=loss, logits=zd, metric=m, weights=w, margin=gamma,
                             implicit_acc=acc, model_mse=model_mse.detach(), ref_mse=ref_mse)
