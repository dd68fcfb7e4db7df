"""The scalar stage (``adpo::triton_pairs``): logits, metric, weights, margin, loss, g.

From the ``(2 + K, 2, Bg)`` MSEs (winners then losers; ``Bg`` pairs, all processes'
when ``sync_stats`` gathered them), for the local pairs ``offset .. offset + num_pairs``
(spec sections 2-8, docs/math.md)::

    z^(k)_i = (mse(ref)_i - mse(ref)_{i+B}) - (mse(p_k)_i - mse(p_k)_{i+B})   k = 0 (policy) .. K
    m_i     = metric of spec section 4 (0 when adaptive=False or during warm-up)
    w_i     = weight_type(m_i),   gamma_i = zbar - m_i^{1 or 2} / beta    (spec section 5,
              zbar = mean_j s_j z_j over the flipped logits: section 7)
    flip_i  = m_i > max(h, m_sorted[min(floor(Bg (1 - r)), Bg - 1)])    (spec section 7)
    loss    = mean_i L(s_i z_i)  with s_i = -1 for flipped pairs, else 1  (spec section 6)
    g_i     = d loss / d z_i = s_i L'(s_i z_i) / num_pairs              (spec section 8)

with, for ``x = beta s_i z_i``:

    sigmoid       L = -w logsig(x - gamma)                    L' = -w beta sigmoid(gamma - x)
    ipo           L = w (s z + shift)^2                       L' = 2 w (s z + shift)
    hinge         L = relu(1 - x)                             L' = -beta [1 - x > 0]
    robust        L = (-(1-e) logsig(x) + e logsig(-x))/(1-2e) L' = -beta((1-e) sig(-x) + e sig(x))/(1-2e)
    conservative  L = -(1-e) logsig(x) - e logsig(-x)          L' = beta(-(1-e) sig(-x) + e sig(x))

One program does everything, looping over the pairs in blocks of ``BB`` (any ``Bg``):
pass 1 the batch L2 norms and the mean logit, pass 2 (``std_standardize`` /
``weight_normalize``) the sums of ``d`` and ``m``, pass 3 (flipping) the quantile by
counting ranks (``O(Bg^2)`` comparisons in ``BQ x BC`` tiles, the metric recomputed per
tile rather than staged through memory) and then the mean of the flipped logits (the
margin's ``zbar``, spec section 7), pass 4 the local outputs.  Every variant is a
``tl.constexpr`` switch of this one kernel.  The conventions the spec leaves open are
those of ``adpo_kernels/reference.py`` (its module docstring).
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .. import config as C
from . import _common

NORM_EPS = tl.constexpr(1e-12)  # F.normalize's guard, as in reference.py
# NaN rule of every backend (docs/math.md): min / max / clamp propagate NaN as torch does.
# Native tl.minimum / tl.maximum drop it by default (PTX min/max), the interpreter keeps it.
NAN = tl.constexpr(tl.PropagateNan.ALL)


@triton.jit
def _logsig(x):
    """log sigmoid(x) = min(x, 0) - log1p(exp(-|x|)), log1p by its series for tiny arguments."""
    e = tl.exp(-tl.abs(x))
    log1p = tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))
    return tl.minimum(x, 0.0, propagate_nan=NAN) - log1p


@triton.jit
def _sig(x):
    """sigmoid(x) from exp(-|x|) (no overflow; as adpo_common.h); NaN stays NaN."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _logits(mse_ptr, j, jmask, Bg, K1: tl.constexpr, KP: tl.constexpr):
    """``(KP, len(j))`` tile of z^(k)_j; rows k >= K1 and masked pairs are 0."""
    k = tl.arange(0, KP)
    src = tl.where(k == 0, 0, k + 1)  # row of predictor k in mse: 0 policy, 1 ref, 2.. annotators
    m2 = (k < K1)[:, None] & jmask[None, :]
    win = tl.load(mse_ptr + (2 * src[:, None]) * Bg + j[None, :], mask=m2, other=0.0)
    los = tl.load(mse_ptr + (2 * src[:, None] + 1) * Bg + j[None, :], mask=m2, other=0.0)
    ref_diff = tl.load(mse_ptr + 2 * Bg + j, mask=jmask, other=0.0) - tl.load(mse_ptr + 3 * Bg + j,
                                                                                mask=jmask, other=0.0)
    return tl.where(m2, ref_diff[None, :] - (win - los), 0.0)


@triton.jit
def _row0(Z, KP: tl.constexpr):
    k = tl.arange(0, KP)
    return tl.sum(tl.where((k == 0)[:, None], Z, 0.0), axis=0)


@triton.jit
def _conf_stab(Z, norms, rho, K1: tl.constexpr, KP: tl.constexpr, LN: tl.constexpr):
    """Raw metric ``c * d`` and stability ``d`` of a logit tile (K >= 1, spec section 4)."""
    k = tl.arange(0, KP)
    kmask = (k < K1)[:, None]
    if LN:
        Z = Z / tl.maximum(norms, NORM_EPS, propagate_nan=NAN)[:, None]
    s = rho * Z
    c = tl.sum(tl.where(kmask, _sig(-s), 0.0), axis=0) / K1  # 1 - mean_k sigmoid(s_k), no cancellation
    mean = tl.sum(tl.where(kmask, s, 0.0), axis=0) / K1
    dev = tl.where(kmask, s - mean[None, :], 0.0)
    d = tl.minimum(tl.sqrt(tl.sum(dev * dev, axis=0) / (K1 - 1)), 1.0, propagate_nan=NAN)
    return c * d, d


@triton.jit
def _metric(Z, norms, rho, dmean, total,
            K1: tl.constexpr, KP: tl.constexpr, METRIC: tl.constexpr, LN: tl.constexpr,
            STD: tl.constexpr, WN: tl.constexpr):
    """Final metric ``m`` of a logit tile, given the batch statistics."""
    z = _row0(Z, KP)
    if METRIC != 2:  # off or warm-up
        m = tl.zeros_like(z)
    elif K1 == 1:
        m = _sig(-rho * z)  # 1 - sigmoid(rho z)
    else:
        m, d = _conf_stab(Z, norms, rho, K1, KP, LN)
        if STD:
            m = tl.where(dmean == 0.0, _sig(-rho * z), m / dmean)
        if WN:
            m = tl.where(total == 0.0, m, m / total)
    return m


@triton.jit
def _pairs_kernel(
    mse_ptr, loss_ptr, logits_ptr, metric_ptr, weights_ptr, margin_ptr, acc_ptr, g_ptr,
    Bg, offset, num_pairs, q_idx,
    beta, rho, tau, intercept, beta_ipo, eps, flip_threshold,
    K1: tl.constexpr, KP: tl.constexpr, LOSS: tl.constexpr, WEIGHT: tl.constexpr,
    MARGIN: tl.constexpr, METRIC: tl.constexpr, LN: tl.constexpr, STD: tl.constexpr,
    WN: tl.constexpr, FLIP: tl.constexpr, FULL: tl.constexpr,
    BB: tl.constexpr, BQ: tl.constexpr, BC: tl.constexpr,
):
    """One program; ``FULL``: the annotator metric is in play (metric on and K >= 1)."""
    lanes = tl.arange(0, BB)

    # pass 1: batch L2 norms of the logit rows, mean policy logit
    sq = tl.zeros((KP, BB), tl.float32)
    zs = tl.zeros((BB,), tl.float32)
    for b0 in range(0, Bg, BB):
        j = b0 + lanes
        Z = _logits(mse_ptr, j, j < Bg, Bg, K1, KP)
        sq += Z * Z
        zs += _row0(Z, KP)
    norms = tl.sqrt(tl.sum(sq, axis=1))
    zbar = tl.sum(zs, axis=0) / Bg

    # pass 2: mean stability and metric sum (std_standardize / weight_normalize)
    dmean = 1.0
    total = 1.0
    if FULL and (STD or WN):  # constexpr
        sd = tl.zeros((BB,), tl.float32)
        sm = tl.zeros((BB,), tl.float32)
        sf = tl.zeros((BB,), tl.float32)
        for b0 in range(0, Bg, BB):
            j = b0 + lanes
            jm = j < Bg
            Z = _logits(mse_ptr, j, jm, Bg, K1, KP)
            m_raw, d = _conf_stab(Z, norms, rho, K1, KP, LN)
            sd += tl.where(jm, d, 0.0)
            sm += tl.where(jm, m_raw, 0.0)
            sf += tl.where(jm, _sig(-rho * _row0(Z, KP)), 0.0)
        dmean = tl.sum(sd, axis=0) / Bg
        total = tl.sum(sm, axis=0)
        if STD:
            total = tl.where(dmean == 0.0, tl.sum(sf, axis=0), total / dmean)

    # pass 3: flip threshold T = max(h, m_sorted[q_idx]) by counting ranks
    T = flip_threshold
    if FLIP:
        q = tl.full((BQ,), float("-inf"), tl.float32)
        found = tl.zeros((BQ,), tl.int32)
        for a0 in range(0, Bg, BQ):
            ja = a0 + tl.arange(0, BQ)
            jam = ja < Bg
            ma = _metric(_logits(mse_ptr, ja, jam, Bg, K1, KP), norms, rho, dmean, total,
                         K1, KP, METRIC, LN, STD, WN)
            lt = tl.zeros((BQ,), tl.int32)
            le = tl.zeros((BQ,), tl.int32)
            for c0 in range(0, Bg, BC):
                jc = c0 + tl.arange(0, BC)
                jcm = jc < Bg
                mc = _metric(_logits(mse_ptr, jc, jcm, Bg, K1, KP), norms, rho, dmean, total,
                             K1, KP, METRIC, LN, STD, WN)
                valid = jcm[None, :]
                lt += tl.sum((valid & (mc[None, :] < ma[:, None])).to(tl.int32), axis=1)
                le += tl.sum((valid & (mc[None, :] <= ma[:, None])).to(tl.int32), axis=1)
            hit = jam & (lt <= q_idx) & (q_idx < le)
            q = tl.maximum(q, tl.where(hit, ma, float("-inf")))
            found += hit.to(tl.int32)
        # no rank hit only when rank q_idx falls among the NaNs (sorted last): q is NaN, and
        # so is T = clamp(q, min=h), which flips nothing (as torch.sort + clamp)
        T = tl.where(tl.sum(found, axis=0) > 0, tl.maximum(tl.max(q, axis=0), flip_threshold), float("nan"))
        # zbar over the logits as the loss sees them, flipped pairs negated (spec section 7)
        zs = tl.zeros((BB,), tl.float32)
        for b0 in range(0, Bg, BB):
            j = b0 + lanes
            Z = _logits(mse_ptr, j, j < Bg, Bg, K1, KP)
            m = _metric(Z, norms, rho, dmean, total, K1, KP, METRIC, LN, STD, WN)
            z = _row0(Z, KP)
            zs += tl.where(m > T, -z, z)  # masked pairs have z = 0
        zbar = tl.sum(zs, axis=0) / Bg

    # pass 4: the local pairs
    inv_n = 1.0 / num_pairs
    loss_acc = tl.zeros((BB,), tl.float32)
    acc_acc = tl.zeros((BB,), tl.float32)
    for b0 in range(0, num_pairs, BB):
        i = b0 + lanes
        im = i < num_pairs
        j = offset + i
        Z = _logits(mse_ptr, j, im, Bg, K1, KP)
        z = _row0(Z, KP)
        m = _metric(Z, norms, rho, dmean, total, K1, KP, METRIC, LN, STD, WN)
        if METRIC == 0:
            w = tl.full((BB,), 1.0, tl.float32)
            gamma = tl.zeros((BB,), tl.float32)
        else:
            if WEIGHT == 0:
                w = 1.0 / (tau * m + intercept)
            elif WEIGHT == 1:
                w = 1.0 / (tau * m * m + intercept)
            elif WEIGHT == 2:
                w = 1.0 / (tl.exp(tau * tl.sqrt(m)) + intercept)
            else:
                w = 1.0 / (tl.exp(tau * m) + intercept)
            if MARGIN == 0:
                gamma = tl.zeros((BB,), tl.float32)
            elif MARGIN == 1:
                gamma = zbar - m / beta
            else:
                gamma = zbar - m * m / beta
        sgn = tl.full((BB,), 1.0, tl.float32)
        if FLIP:
            sgn = tl.where(m > T, -1.0, 1.0)
        zz = sgn * z
        x = beta * zz
        if LOSS == 0:  # sigmoid
            L = -w * _logsig(x - gamma)
            dL = -w * beta * _sig(gamma - x)
        elif LOSS == 1:  # ipo
            shift = -1.0 / (2.0 * beta_ipo)
            if METRIC != 0 and MARGIN != 0:
                if MARGIN == 1:
                    shift = shift - m / (beta * beta) + zbar / beta
                else:
                    shift = shift - m * m / (beta * beta) + zbar / beta
            u = zz + shift
            L = w * u * u
            dL = 2.0 * w * u
        elif LOSS == 2:  # hinge
            h = 1.0 - x
            L = tl.maximum(h, 0.0, propagate_nan=NAN)
            dL = tl.where(h <= 0.0, 0.0, -beta)  # relu'(0) = 0, relu'(NaN) = 1: torch's
        elif LOSS == 3:  # robust
            L = (-(1.0 - eps) * _logsig(x) + eps * _logsig(-x)) / (1.0 - 2.0 * eps)
            dL = -beta * ((1.0 - eps) * _sig(-x) + eps * _sig(x)) / (1.0 - 2.0 * eps)
        else:  # conservative
            L = -(1.0 - eps) * _logsig(x) - eps * _logsig(-x)
            dL = beta * (-(1.0 - eps) * _sig(-x) + eps * _sig(x))
        tl.store(logits_ptr + i, z, mask=im)
        tl.store(metric_ptr + i, m, mask=im)
        tl.store(weights_ptr + i, w, mask=im)
        tl.store(margin_ptr + i, gamma, mask=im)
        tl.store(g_ptr + i, sgn * dL * inv_n, mask=im)
        loss_acc += tl.where(im, L, 0.0)
        acc_acc += tl.where(im & (z > 0.0), 1.0, 0.0) + tl.where(im & (z == 0.0), 0.5, 0.0)
    tl.store(loss_ptr, tl.sum(loss_acc, axis=0) * inv_n)
    tl.store(acc_ptr, tl.sum(acc_acc, axis=0) * inv_n)


def kernel_meta(K1: int, Bg: int, iparams: Sequence[int], interpret: bool) -> tuple[dict, int]:
    """The constexpr switches and block sizes of ``_pairs_kernel`` (and its num_warps)."""
    n = iparams
    KP = max(2, _common.next_pow2(K1))
    if interpret:  # big tiles: numpy is fast, programs are not
        BB = min(_common.next_pow2(Bg), 1024)
        BQ = BC = BB
    else:  # tiles of at most 4096 elements in registers
        BB = min(_common.next_pow2(Bg), max(16, 4096 // KP))
        BQ, BC = min(BB, 32), min(BB, 128)
    consts = dict(K1=K1, KP=KP, LOSS=n[C.I_LOSS], WEIGHT=n[C.I_WEIGHT], MARGIN=n[C.I_MARGIN],
                  METRIC=n[C.I_METRIC], LN=bool(n[C.I_LOGITS_NORMALIZE]), STD=bool(n[C.I_STD_STANDARDIZE]),
                  WN=bool(n[C.I_WEIGHT_NORMALIZE]), FLIP=bool(n[C.I_FLIP]),
                  FULL=n[C.I_METRIC] == C.METRIC_ON and K1 > 1, BB=BB, BQ=BQ, BC=BC)
    return consts, 8 if BB * KP >= 2048 else 4


def pairs_forward(mse: torch.Tensor, model_pred: torch.Tensor, target: torch.Tensor, offset: int, num_pairs: int,
                  fparams: Sequence[float], iparams: Sequence[int]):
    """The launcher of ``adpo::triton_pairs``; ``model_pred`` / ``target`` are only shape-checked
    (the backward reads them)."""
    op = "triton_pairs"
    _common.check_device(_pairs_kernel, mse, op)
    if model_pred.shape[0] != 2 * num_pairs or target.shape[0] not in (num_pairs, 2 * num_pairs):
        raise ValueError(f"adpo::{op}: model_pred must have 2 * num_pairs = {2 * num_pairs} rows and target "
                         f"{num_pairs} or {2 * num_pairs}, got {tuple(model_pred.shape)} and {tuple(target.shape)}")
    if mse.dim() != 3 or mse.shape[1] != 2 or mse.shape[0] < 2 or mse.dtype != torch.float32:
        raise ValueError(f"adpo::{op}: mse must be a (2 + K, 2, B) float32 tensor, got "
                         f"{tuple(mse.shape)} {mse.dtype}")
    Bg = mse.shape[2]
    if not (0 <= offset and 0 < num_pairs and offset + num_pairs <= Bg):
        raise ValueError(f"adpo::{op}: local pairs [{offset}, {offset + num_pairs}) outside [0, {Bg})")
    if len(fparams) != 8 or len(iparams) != 8:
        raise ValueError(f"adpo::{op}: expected 8 fparams and 8 iparams (AdaptiveDPOConfig.op_params)")
    if iparams[C.I_FLIP] and not (0.0 <= fparams[C.F_FLIP_RATIO] <= 1.0):  # NaN fails too
        raise ValueError(f"adpo::{op}: flip_ratio must be in [0, 1] when flip is on, got {fparams[C.F_FLIP_RATIO]}")
    mse = mse.contiguous()
    consts, num_warps = kernel_meta(mse.shape[0] - 1, Bg, iparams, _common.is_interpreted(_pairs_kernel))
    dev = mse.device
    scalar = lambda: _common.alloc((), torch.float32, dev)  # noqa: E731
    vec = lambda: _common.alloc((num_pairs,), torch.float32, dev)  # noqa: E731
    loss, logits, metric, weights, margin, acc, g = scalar(), vec(), vec(), vec(), vec(), scalar(), vec()
    f = fparams
    # the host float arithmetic of reference.py; with the flip off the ratio is not read (it may be anything)
    q_idx = min(int(Bg * (1.0 - f[C.F_FLIP_RATIO])), Bg - 1) if iparams[C.I_FLIP] else 0
    with _common.device_guard(mse):
        _pairs_kernel[(1,)](
            mse, loss, logits, metric, weights, margin, acc, g,
            Bg, offset, num_pairs, q_idx,
            f[C.F_BETA], f[C.F_RHO], f[C.F_TAU], f[C.F_INTERCEPT], f[C.F_BETA_IPO], f[C.F_EPS],
            f[C.F_FLIP_THRESHOLD], **consts, num_warps=num_warps)
    return loss, logits, metric, weights, margin, acc, g
