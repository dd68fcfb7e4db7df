"""An independent float64 implementation of the spec in numpy and plain loops.

Written from shared/spec/ADAPTIVE_DPO.md without looking at reference.py, so that the
torch reference (the oracle of every fused backend) is itself checked.  Also returns
the per-pair gradient coefficient g_i = d loss / d z_i from hand-derived formulas.
"""
from __future__ import annotations

import math

import numpy as np


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _logsig(x):
    return min(x, 0.0) - math.log1p(math.exp(-abs(x)))


def spec_loss(model, ref, target, annots, cfg, ready=True):
    """model/ref/annots: (2B, N) float64 arrays, target (2B, N) or (B, N)."""
    model, ref = np.asarray(model, np.float64), np.asarray(ref, np.float64)
    R, N = model.shape
    B = R // 2
    target = np.asarray(target, np.float64)
    if target.shape[0] == B:
        target = np.concatenate([target, target], 0)

    def mse(p):
        return [float(np.sum((p[j] - target[j]) ** 2)) / N for j in range(R)]

    mm, rm = mse(model), mse(ref)
    ref_diff = [rm[i] - rm[i + B] for i in range(B)]
    z = [ref_diff[i] - (mm[i] - mm[i + B]) for i in range(B)]
    Zs = [z]
    for a in annots:
        am = mse(np.asarray(a, np.float64))
        Zs.append([ref_diff[i] - (am[i] - am[i + B]) for i in range(B)])
    K = len(annots)

    if not cfg.adaptive:
        m = [0.0] * B
    elif not ready:
        m = [0.0] * B
    elif K == 0:
        m = [1.0 - _sig(cfg.rho * z[i]) for i in range(B)]
    else:
        rows = Zs
        if cfg.logits_normalize:
            rows = []
            for r in Zs:
                nrm = max(math.sqrt(sum(v * v for v in r)), 1e-12)
                rows.append([v / nrm for v in r])
        m, d = [], []
        for i in range(B):
            s = [cfg.rho * rows[k][i] for k in range(K + 1)]
            c = 1.0 - sum(_sig(v) for v in s) / (K + 1)
            mu = sum(s) / (K + 1)
            std = math.sqrt(sum((v - mu) ** 2 for v in s) / K)
            d.append(min(std, 1.0))
            m.append(c * d[-1])
        if cfg.std_standardize:
            dbar = sum(d) / B
            if dbar == 0:
                m = [1.0 - _sig(cfg.rho * z[i]) for i in range(B)]
            else:
                m = [v / dbar for v in m]
        if cfg.weight_normalize:
            tot = sum(m)
            if tot != 0:
                m = [v / tot for v in m]

    if cfg.adaptive:
        tau, c0 = cfg.tau, cfg.intercept
        wf = {"linear": lambda v: 1 / (tau * v + c0), "quadratic": lambda v: 1 / (tau * v * v + c0),
              "sqrt": lambda v: 1 / (math.exp(tau * math.sqrt(v)) + c0),
              "exp": lambda v: 1 / (math.exp(tau * v) + c0)}[cfg.weight_type]
        w = [wf(v) for v in m]
        flipped = [False] * B
        if cfg.flip_ratio > 0:
            srt = sorted(m)
            q = srt[min(int(math.floor(B * (1 - cfg.flip_ratio))), B - 1)]
            T = max(cfg.flip_threshold, q)
            flipped = [v > T for v in m]
        # section 7: the margin's batch mean is over the flipped logits
        zbar = sum(-z[i] if flipped[i] else z[i] for i in range(B)) / B
        if cfg.margin_type is None:
            gamma = [0.0] * B
        elif cfg.margin_type == "linear":
            gamma = [zbar - v / cfg.beta for v in m]
        else:
            gamma = [zbar - v * v / cfg.beta for v in m]
    else:
        w, gamma, flipped = [1.0] * B, [0.0] * B, [False] * B
        zbar = sum(z) / B

    beta, eps = cfg.beta, cfg.label_smoothing
    losses, g = [], []
    for i in range(B):
        sgn = -1.0 if flipped[i] else 1.0
        x = sgn * z[i]
        lt = cfg.loss_type
        if lt == "sigmoid":
            u = beta * x - gamma[i]
            losses.append(-w[i] * _logsig(u))
            dx = -w[i] * beta * _sig(-u)
        elif lt == "ipo":
            shift = -1.0 / (2 * cfg.beta_ipo)
            if cfg.adaptive and cfg.margin_type is not None:
                mm_ = m[i] if cfg.margin_type == "linear" else m[i] ** 2
                shift += -mm_ / beta ** 2 + zbar / beta
            losses.append(w[i] * (x + shift) ** 2)
            dx = 2 * w[i] * (x + shift)
        elif lt == "hinge":
            losses.append(max(0.0, 1 - beta * x))
            dx = -beta if 1 - beta * x > 0 else 0.0
        elif lt == "robust":
            losses.append((-(1 - eps) * _logsig(beta * x) + eps * _logsig(-beta * x)) / (1 - 2 * eps))
            dx = -beta * ((1 - eps) * _sig(-beta * x) + eps * _sig(beta * x)) / (1 - 2 * eps)
        else:
            losses.append(-(1 - eps) * _logsig(beta * x) - eps * _logsig(-beta * x))
            dx = -beta * ((1 - eps) * _sig(-beta * x) - eps * _sig(beta * x))
        g.append(sgn * dx / B)
    acc = (sum(1.0 for v in z if v > 0) + 0.5 * sum(1.0 for v in z if v == 0)) / B
    return dict(loss=sum(losses) / B, logits=z, metric=m, weights=w, margin=gamma, acc=acc,
                model_mse=mm, ref_mse=rm, g=g, flipped=flipped)


def spec_grad(model, target, g):
    """Spec section 8: d loss / d model_pred from the per-pair coefficients."""
    model = np.asarray(model, np.float64)
    R, N = model.shape
    B = R // 2
    target = np.asarray(target, np.float64)
    if target.shape[0] == B:
        target = np.concatenate([target, target], 0)
    out = np.empty_like(model)
    for i in range(B):
        out[i] = g[i] * (-2.0 / N) * (model[i] - target[i])
        out[i + B] = g[i] * (2.0 / N) * (model[i + B] - target[i + B])
    return out
