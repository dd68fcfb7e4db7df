"""Label-flip robustness and minority detection, in miniature (a CPU in minutes).

The paper (arXiv 2503.16921) claims that (1) mislabelled "minority" pairs hurt
Diffusion-DPO, (2) its minority-instance-aware metric ``m`` finds them (the fraction of
flipped pairs rises with ``m``, Fig. 3), and (3) Adaptive-DPO keeps near-clean
performance with up to 30% flipped labels, ahead of DPO and of robust-DPO (label
smoothing).  This module checks those claims where the ground truth is known:

* data: 2-D points from a fixed ring of ``N_MODES`` Gaussians; a small MLP
  epsilon-predictor conditioned on ``t`` with a linear DDPM schedule is pretrained on it
  and becomes the frozen reference;
* reward: ``r(x) = -||x - x*||`` with ``x*`` the centre of mode 0 (known, bounded above);
* pairs: drawn from the reference, labelled by the reward (deterministically, or by a
  Bradley-Terry coin with ``--bt-temp``); a fixed fraction of labels is then flipped at
  random (0/10/20/30%), the same flips for every method;
* methods: ``dpo`` (``AdaptiveDPOConfig.dpo(beta)``), ``robust`` (``loss_type="robust"``,
  ``label_smoothing`` = flip rate), ``adaptive`` (``AdaptiveDPOConfig.paper()`` with
  ``beta``/``rho`` rescaled for the toy; two EMA annotators of the policy with decays
  0.9999 and 0.5 on diffusers' schedule, 2 warm-up steps; spec section 9),
  ``adaptive-k1`` (the same with the 0.9999 annotator only) and ``adaptive-k0`` (no
  annotator: ``m = 1 - sigmoid(rho0 z)``, spec section 4; ``rho0`` chosen per seed on
  the clean DPO run, see :func:`rho0_from_clean`);
* measured: the true reward of samples from each fine-tuned model minus that of the
  reference (same sampling noise), during and after training; the metric's AUROC and
  average precision at finding the flipped pairs of each training batch.  For ``dpo``
  and ``robust`` the same metric is computed on the side ("shadow" annotators, no effect
  on training) so that every row reports detection quality;
* cost: the matmul/conv FLOPs of one post-warm-up step of each run (``FlopCounterMode``;
  shadow annotators not counted), and of the trainer's step on a LoRA UNet
  (:mod:`adpo_train.experiments.cost`), both relative to DPO.

Run ``python -m adpo_train.experiments.label_flip --help``; results and the reading are
in ``docs/method-study.md``.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import adpo_kernels as ak

METHODS = ("dpo", "robust", "adaptive", "adaptive-k1", "adaptive-k0")
N_MODES = 8
RADIUS = 2.0
MODE_STD = 0.2
TARGET = (RADIUS, 0.0)  # the reward peaks at the centre of mode 0
EMA_DECAYS = (0.9999, 0.5)  # spec section 9
# The annotators each method's loss uses.  With one annotator, the slow one: the 0.5 EMA trails
# the policy by about a step, so alone it would agree with the policy and make the metric ~0.
ANNOTATORS = {"dpo": (), "robust": (), "adaptive": EMA_DECAYS, "adaptive-k1": EMA_DECAYS[:1], "adaptive-k0": ()}
PAPER_BATCH = 16  # pairs per device in the paper's run, the batch its rho = 15 was set for


@dataclass(frozen=True)
class Settings:
    """Every knob of the experiment; ``Settings.quick()`` is the CI preset."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    flip_rates: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3)
    methods: tuple[str, ...] = METHODS
    timesteps: int = 100
    hidden: int = 128
    pretrain_steps: int = 3000
    pretrain_batch: int = 512
    pretrain_lr: float = 2e-3
    n_pairs: int = 4096
    bt_temp: float = 0.0  # 0: deterministic labels from the reward; > 0: Bradley-Terry coin
    steps: int = 600
    batch: int = 64  # pairs per step
    lr: float = 3e-4
    beta: float = 10.0
    rho: Optional[float] = None  # None: 15 * sqrt(batch / 16), see rho_for()
    rho0: Optional[float] = None  # adaptive-k0's rho; None: per seed from the clean DPO run, rho0_from_clean()
    ema_warmup_steps: int = 2
    shadow_metric: bool = True  # compute the metric (no effect) during dpo / robust runs too
    eval_every: int = 50
    n_eval: int = 2000
    threads: int = 1

    @classmethod
    def quick(cls, **kw) -> "Settings":
        base = dict(seeds=(0,), pretrain_steps=1500, n_pairs=2048, steps=300, eval_every=100,
                    n_eval=1000)
        base.update(kw)
        return cls(**base)

    def rho_for(self) -> float:
        # With logits_normalize each row of Z has unit L2 norm over the batch, so a typical
        # entry is ~1/sqrt(B); keep rho * |z_normalised| where the paper's rho=15 at B=16 put it.
        return self.rho if self.rho is not None else 15.0 * math.sqrt(self.batch / PAPER_BATCH)


def rho0_from_clean(logits: np.ndarray, batch: int) -> float:
    """adaptive-k0's rho by the rule of :meth:`Settings.rho_for`, on logits of a clean-label run.

    The paper's ``rho = 15`` acts on batch-normalised logits at 16 pairs, where a typical
    entry is ``15 * z / ||z|| = 15 * z / (4 rms(z))``.  Without annotators the spec does not
    normalise (``m = 1 - sigmoid(rho z)``), so the same scale needs ``rho0 = 3.75 / rms(z)``;
    ``rms(z)`` is the median over steps of the per-batch RMS of the clean DPO run's logits.
    """
    z = np.asarray(logits, dtype=np.float64).reshape(-1, batch)
    return float(15.0 / math.sqrt(PAPER_BATCH) / np.median(np.sqrt((z ** 2).mean(1))))


# -- the toy diffusion problem ---------------------------------------------------------

def sample_data(n: int, gen: torch.Generator) -> torch.Tensor:
    k = torch.randint(0, N_MODES, (n,), generator=gen)
    ang = 2 * math.pi * k.double() / N_MODES
    centres = RADIUS * torch.stack([torch.cos(ang), torch.sin(ang)], 1).float()
    return centres + MODE_STD * torch.randn(n, 2, generator=gen)


def reward(x: torch.Tensor) -> torch.Tensor:
    return -torch.linalg.vector_norm(x - torch.tensor(TARGET), dim=-1)


class Schedule:
    """Linear-beta DDPM schedule; ``abar_T`` ~ 0.002, so ``x_T`` is close to pure noise."""

    def __init__(self, T: int, beta_min: float = 1e-4, beta_max: float = 0.12):
        self.T = T
        self.betas = torch.linspace(beta_min, beta_max, T)
        self.alphas = 1.0 - self.betas
        self.abar = torch.cumprod(self.alphas, 0)

    def noise(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        a = self.abar[t].unsqueeze(-1)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps


class EpsMLP(nn.Module):
    """``eps_theta(x_t, t)``: a 4-layer SiLU MLP on ``[x_t, sinusoidal(t / T)]``."""

    def __init__(self, T: int, hidden: int = 128, n_freq: int = 8):
        super().__init__()
        self.T = T
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freq).float(), persistent=False)
        self.net = nn.Sequential(nn.Linear(2 + 2 * n_freq, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ang = (t.float() / self.T).unsqueeze(-1) * self.freqs
        return self.net(torch.cat([x, torch.sin(ang), torch.cos(ang)], -1))


@torch.no_grad()
def sample(model: nn.Module, sched: Schedule, n: int, seed: int) -> torch.Tensor:
    """Ancestral DDPM sampling (``sigma_t^2 = beta_t``) with its own fixed noise stream."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=gen)
    for t in reversed(range(sched.T)):
        eps = model(x, torch.full((n,), t, dtype=torch.long))
        b, a, ab = sched.betas[t], sched.alphas[t], sched.abar[t]
        x = (x - b / (1 - ab).sqrt() * eps) / a.sqrt()
        if t > 0:
            x = x + b.sqrt() * torch.randn(n, 2, generator=gen)
    return x


def pretrain_reference(s: Settings, sched: Schedule, seed: int) -> EpsMLP:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(10_000 + seed)
    model = EpsMLP(s.timesteps, s.hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=s.pretrain_lr, weight_decay=0.0)
    lr_at = lambda i: s.pretrain_lr * 0.5 * (1 + math.cos(math.pi * i / s.pretrain_steps))  # noqa: E731
    for i in range(s.pretrain_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(i)
        x0 = sample_data(s.pretrain_batch, gen)
        t = torch.randint(0, s.timesteps, (s.pretrain_batch,), generator=gen)
        eps = torch.randn(s.pretrain_batch, 2, generator=gen)
        loss = ((model(sched.noise(x0, t, eps), t) - eps) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# -- preference pairs ----------------------------------------------------------------

@dataclass
class Pairs:
    winners: torch.Tensor  # (P, 2), as labelled (after flips)
    losers: torch.Tensor
    flipped: torch.Tensor  # (P,) bool: the label disagrees with the reward (our flip)


def draw_pairs(ref: nn.Module, sched: Schedule, s: Settings, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean pairs from the reference: ``(winners, losers)`` by the reward (or a BT coin)."""
    x = sample(ref, sched, 2 * s.n_pairs, seed=20_000 + seed)
    a, b = x[: s.n_pairs], x[s.n_pairs:]
    diff = reward(a) - reward(b)
    if s.bt_temp > 0:
        gen = torch.Generator().manual_seed(30_000 + seed)
        a_wins = torch.rand(s.n_pairs, generator=gen) < torch.sigmoid(diff / s.bt_temp)
    else:
        a_wins = diff > 0
    m = a_wins.unsqueeze(-1)
    return torch.where(m, a, b), torch.where(m, b, a)


def flip_labels(winners: torch.Tensor, losers: torch.Tensor, rate: float, seed: int) -> Pairs:
    """Swap exactly ``round(rate * P)`` pairs chosen at random."""
    P = winners.shape[0]
    gen = torch.Generator().manual_seed(40_000 + seed)
    flipped = torch.zeros(P, dtype=torch.bool)
    flipped[torch.randperm(P, generator=gen)[: int(round(rate * P))]] = True
    m = flipped.unsqueeze(-1)
    return Pairs(torch.where(m, losers, winners), torch.where(m, winners, losers), flipped)


# -- annotators ----------------------------------------------------------------------

class EMA:
    """EMA copy of a model on diffusers' ``EMAModel`` schedule (spec section 9).

    Update ``n`` (1-based) uses ``decay_n = min(decay, (1 + s) / (10 + s))`` with
    ``s = n - 1``, and the first update (``s = 0``) copies the weights.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        s = self.updates
        d = 0.0 if s <= 0 else min(self.decay, (1 + s) / (10 + s))
        for pe, p in zip(self.model.parameters(), model.parameters()):
            pe.lerp_(p, 1.0 - d)
        self.updates += 1


# -- detection quality ---------------------------------------------------------------

def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); NaN without both classes."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # mid-ranks: every member of a run of equal scores gets the run's mean rank (1-based)
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    mid = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(mid, counts)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """``sum_k (R_k - R_{k-1}) P_k`` over distinct score thresholds, highest first; NaN without positives."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    n_pos = int(labels.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    tp = np.cumsum(y)
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # the last index of each tie group
    tp_at, n_at = tp[last], last + 1
    precision, recall = tp_at / n_at, tp_at / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


# -- fine-tuning ---------------------------------------------------------------------

def loss_config(method: str, s: Settings, flip_rate: float, rho0: Optional[float] = None) -> ak.AdaptiveDPOConfig:
    if method == "dpo":
        return ak.AdaptiveDPOConfig.dpo(s.beta)
    if method == "robust":
        return ak.AdaptiveDPOConfig.dpo(s.beta, loss_type="robust", label_smoothing=flip_rate)
    if method in ("adaptive", "adaptive-k1"):
        return ak.AdaptiveDPOConfig.paper(beta=s.beta, rho=s.rho_for())
    if method == "adaptive-k0":  # the paper preset; with K = 0 logits_normalize has no effect (spec section 4)
        if rho0 is None:
            raise ValueError("loss_config: adaptive-k0 needs rho0 (Settings.rho0 or rho0_from_clean)")
        return ak.AdaptiveDPOConfig.paper(beta=s.beta, rho=rho0)
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")


def diverged(reward_: float, reward_ref: float) -> bool:
    """The fine-tuned samples ended at least twice as far from the target as the reference's (or not finite)."""
    return not math.isfinite(reward_) or reward_ < 2.0 * reward_ref


@dataclass
class RunResult:
    method: str
    flip_rate: float
    seed: int
    rho: float  # the rho of the metric recorded (dpo / robust: the shadow metric's)
    reward_ref: float
    reward: float
    curve_steps: list = field(default_factory=list)
    curve_gain: list = field(default_factory=list)
    metric: Optional[np.ndarray] = None  # pooled over post-warm-up steps
    logits: Optional[np.ndarray] = None
    weights: Optional[np.ndarray] = None
    flipped: Optional[np.ndarray] = None
    flops: int = 0  # matmul/conv FLOPs of one post-warm-up step (FlopCounterMode; shadow metric not counted)
    logit_rms_end: float = float("nan")  # RMS of the pair logits z over the last eval_every steps
    seconds: float = 0.0

    def row(self) -> dict:
        m, z, w, f = self.metric, self.logits, self.weights, self.flipped
        has = f is not None and f.any() and (~f).any()
        return dict(
            method=self.method, flip_rate=self.flip_rate, seed=self.seed, rho=self.rho,
            reward_ref=self.reward_ref, reward=self.reward, gain=self.reward - self.reward_ref,
            metric_auroc=auroc(m, f) if has and m is not None else float("nan"),
            metric_ap=average_precision(m, f) if has and m is not None else float("nan"),
            logit_auroc=auroc(-z, f) if has else float("nan"),
            logit_ap=average_precision(-z, f) if has else float("nan"),
            weight_ratio=(float(w[f].mean() / w[~f].mean()) if has and self.method.startswith("adaptive")
                          else float("nan")),
            diverged=int(diverged(self.reward, self.reward_ref)), logit_rms_end=self.logit_rms_end,
            flops=self.flops, seconds=self.seconds)


def finetune(method: str, flip_rate: float, seed: int, ref: EpsMLP, sched: Schedule, pairs: Pairs,
             s: Settings, reward_ref: float, rho0: Optional[float] = None) -> RunResult:
    cfg = loss_config(method, s, flip_rate, rho0)
    own = ANNOTATORS[method]
    # dpo / robust: the paper's metric on the side ("shadow"), no effect on their training
    shadow = not cfg.adaptive and s.shadow_metric
    shadow_cfg = loss_config("adaptive", s, flip_rate)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(50_000 + seed)  # same batches for every method
    policy = copy.deepcopy(ref)
    for p in policy.parameters():
        p.requires_grad_(True)
    policy.train()
    annotators = [EMA(policy, d) for d in (EMA_DECAYS if shadow else own)]
    opt = torch.optim.AdamW(policy.parameters(), lr=s.lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    P, B = pairs.winners.shape[0], s.batch
    rec_m, rec_z, rec_w, rec_f = [], [], [], []
    rho = (shadow_cfg if shadow else cfg).rho if (shadow or cfg.adaptive) else float("nan")
    res = RunResult(method, flip_rate, seed, rho, reward_ref, float("nan"), [0], [0.0])  # step 0: the reference
    t0 = time.perf_counter()
    for step in range(1, s.steps + 1):
        idx = torch.randint(0, P, (B,), generator=gen)
        t = torch.randint(0, s.timesteps, (B,), generator=gen)
        eps = torch.randn(B, 2, generator=gen)
        x0 = torch.cat([pairs.winners[idx], pairs.losers[idx]])
        tt = torch.cat([t, t])
        xt = sched.noise(x0, tt, torch.cat([eps, eps]))
        # The metric (and the annotators) start after ema_warmup_steps optimisation steps, as in the trainer.
        ready = step > s.ema_warmup_steps
        count = step == s.ema_warmup_steps + 1  # one step with everything on: its FLOPs are the method's cost
        with (FlopCounterMode(display=False) if count else nullcontext()) as fc:
            model_pred = policy(xt, tt)
            with torch.no_grad():
                ref_pred = ref(xt, tt)
                ann = [a.model(xt, tt) for a in annotators] if own and ready else None
            out = ak.adaptive_dpo_loss(model_pred, ref_pred, eps, ann, config=cfg, annotators_ready=ready)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
        if count:
            res.flops = int(fc.get_total_flops())
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        if ready:
            if cfg.adaptive:
                m, w = out.metric, out.weights
            elif shadow:  # the EMA weights are those of before this step's update, as in an adaptive run
                with torch.no_grad():
                    sh = [a.model(xt, tt) for a in annotators]
                m = ak.adaptive_dpo_loss(model_pred.detach(), ref_pred, eps, sh, config=shadow_cfg).metric
                w = torch.ones_like(m)
            else:
                m = w = None
            if m is not None:
                rec_m.append(m)
                rec_w.append(w)
            rec_z.append(out.logits)
            rec_f.append(pairs.flipped[idx])
        for a in annotators:
            a.update(policy)
        if step % s.eval_every == 0 or step == s.steps:
            policy.eval()
            r = reward(sample(policy, sched, s.n_eval, seed=60_000 + seed)).mean().item()
            policy.train()
            res.curve_steps.append(step)
            res.curve_gain.append(r - reward_ref)
            res.reward = r
    res.seconds = time.perf_counter() - t0
    if rec_m:
        res.metric = torch.cat(rec_m).numpy()
        res.weights = torch.cat(rec_w).numpy()
    if rec_z:
        res.logits = torch.cat(rec_z).numpy()
        res.flipped = torch.cat(rec_f).numpy()
        res.logit_rms_end = float(np.sqrt(np.mean(res.logits[-s.eval_every * B:].astype(np.float64) ** 2)))
    return res


# -- the grid and its report ---------------------------------------------------------

def run_grid(s: Settings, log=print) -> list[RunResult]:
    torch.set_num_threads(s.threads)
    sched = Schedule(s.timesteps)
    results = []
    for seed in s.seeds:
        t0 = time.perf_counter()
        ref = pretrain_reference(s, sched, seed)
        reward_ref = reward(sample(ref, sched, s.n_eval, seed=60_000 + seed)).mean().item()
        data_reward = reward(sample_data(s.n_eval, torch.Generator().manual_seed(70_000 + seed))).mean().item()
        clean_w, clean_l = draw_pairs(ref, sched, s, seed)
        log(f"seed {seed}: reference pretrained in {time.perf_counter() - t0:.1f}s, "
            f"reward {reward_ref:.3f} (data {data_reward:.3f})")
        done, rho0 = {}, s.rho0
        if "adaptive-k0" in s.methods and rho0 is None:
            # chosen on clean labels only: the clean DPO run (the grid's own row when it has one)
            clean = finetune("dpo", 0.0, seed, ref, sched, flip_labels(clean_w, clean_l, 0.0, seed), s, reward_ref)
            done[("dpo", 0.0)] = clean
            rho0 = rho0_from_clean(clean.logits, s.batch)
            log(f"  adaptive-k0: rho0 = {rho0:.4g} from the clean DPO run")
        for rate in s.flip_rates:
            pairs = flip_labels(clean_w, clean_l, rate, seed)
            for method in s.methods:
                r = done.get((method, rate)) or finetune(method, rate, seed, ref, sched, pairs, s, reward_ref, rho0)
                row = r.row()
                log(f"  {method:11s} flip {rate:.0%}: gain {row['gain']:+.3f}  metric AUROC "
                    f"{row['metric_auroc']:.3f} AP {row['metric_ap']:.3f}  ({r.seconds:.1f}s)")
                results.append(r)
    return results


def _mean_std(v: Sequence[float]) -> tuple[float, float]:
    a = np.asarray([x for x in v if not math.isnan(x)], dtype=np.float64)
    if len(a) == 0:
        return float("nan"), float("nan")
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else float("nan"))


SUMMARY_FIELDS = ("gain", "metric_auroc", "metric_ap", "logit_auroc", "logit_ap", "weight_ratio", "rho", "flops",
                  "logit_rms_end")


def unet_flops(methods: Sequence[str], s: Settings) -> dict:
    """FLOPs of one trainer step on the LoRA UNet of :mod:`.cost`, per method (the loss options do not change it)."""
    from .cost import unet_step_flops

    return {m: unet_step_flops(ANNOTATORS[m], loss_config(m, s, 0.0, rho0=1.0)) for m in methods}


def summarise(results: list[RunResult], s: Settings, unet: Optional[dict] = None) -> list[dict]:
    """Mean and std over seeds per (method, flip rate); FLOPs per step also relative to DPO's."""
    rows = [r.row() for r in results]
    unet = unet or {}
    clean = {}
    for m in s.methods:
        g = [r["gain"] for r in rows if r["method"] == m and r["flip_rate"] == 0.0]
        clean[m] = _mean_std(g)[0] if g else float("nan")
    out = []
    for rate in s.flip_rates:
        for m in s.methods:
            sel = [r for r in rows if r["method"] == m and r["flip_rate"] == rate]
            if not sel:
                continue
            row = dict(method=m, flip_rate=rate, n_seeds=len(sel), n_diverged=sum(r["diverged"] for r in sel))
            for f in SUMMARY_FIELDS:
                row[f + "_mean"], row[f + "_std"] = _mean_std([r[f] for r in sel])
            # the gain as a fraction of a clean (0% flips) run's gain on the same seed: of clean
            # DPO, and of the same method (how much of its own clean gain survives the flips)
            for key, base_method in (("gain_vs_clean_dpo", "dpo"), ("gain_vs_own_clean", m)):
                base = {r["seed"]: r["gain"] for r in rows
                        if r["method"] == base_method and r["flip_rate"] == 0.0}
                ratios = [r["gain"] / base[r["seed"]] for r in sel if base.get(r["seed"], 0) > 0]
                # a mean over the seeds whose clean run gained would hide the others: all or nothing
                row[key + "_mean"], row[key + "_std"] = _mean_std(ratios if len(ratios) == len(sel) else [])
            dpo_flops = [r["flops"] for r in rows if r["method"] == "dpo"]
            row["flops_vs_dpo"] = row["flops_mean"] / dpo_flops[0] if dpo_flops else float("nan")
            row["unet_flops"] = unet.get(m, float("nan"))
            row["unet_flops_vs_dpo"] = unet.get(m, float("nan")) / unet.get("dpo", float("nan"))
            out.append(row)
    return out


def _fmt(mean: float, std: float, digits: int = 3, pct: bool = False) -> str:
    if math.isnan(mean):
        return "–"
    if pct:
        return f"{100 * mean:.0f}%" + ("" if math.isnan(std) else f" ± {100 * std:.0f}")
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")


def markdown_table(summary: list[dict]) -> str:
    lines = ["| flips | method | reward gain vs ref | % of clean-DPO gain | % of own clean gain "
             "| metric AUROC | metric AP | AUROC of -z | w(flipped)/w(clean) | FLOPs/step vs DPO: toy, UNet |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary:
        lines.append(
            f"| {r['flip_rate']:.0%} | {r['method']} | {_fmt(r['gain_mean'], r['gain_std'])}"
            + (f" ({r['n_diverged']} of {r['n_seeds']} diverged)" if r["n_diverged"] else "") + " "
            f"| {_fmt(r['gain_vs_clean_dpo_mean'], r['gain_vs_clean_dpo_std'], pct=True)} "
            f"| {_fmt(r['gain_vs_own_clean_mean'], r['gain_vs_own_clean_std'], pct=True)} "
            f"| {_fmt(r['metric_auroc_mean'], r['metric_auroc_std'])} "
            f"| {_fmt(r['metric_ap_mean'], r['metric_ap_std'])} "
            f"| {_fmt(r['logit_auroc_mean'], r['logit_auroc_std'])} "
            f"| {_fmt(r['weight_ratio_mean'], r['weight_ratio_std'], 2)} "
            f"| {_fmt(r['flops_vs_dpo'], float('nan'), 2)}, {_fmt(r['unet_flops_vs_dpo'], float('nan'), 2)} |")
    return "\n".join(lines) + "\n"


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def plot_flip_fraction(results: list[RunResult], path: str, n_bins: int = 10, min_count: int = 50) -> None:
    """Fig. 3 style: fraction of flipped pairs per bin of the metric, pooled over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = [m for m in METHODS if any(r.method == m and r.metric is not None for r in results)]
    rates = sorted({r.flip_rate for r in results if r.flip_rate > 0})
    fig, axes = plt.subplots(1, len(methods), figsize=(3.6 * len(methods), 3.2), sharey=True, squeeze=False)
    colours = plt.get_cmap("viridis")(np.linspace(0.1, 0.85, max(len(rates), 1)))
    for ax, method in zip(axes[0], methods):
        for c, rate in zip(colours, rates):
            sel = [r for r in results if r.method == method and r.flip_rate == rate and r.metric is not None]
            if not sel:
                continue
            m = np.concatenate([r.metric for r in sel])
            f = np.concatenate([r.flipped for r in sel])
            edges = np.linspace(0.0, max(float(m.max()), 1e-6), n_bins + 1)
            b = np.clip(np.digitize(m, edges[1:-1]), 0, n_bins - 1)
            cnt = np.bincount(b, minlength=n_bins)
            frac = np.bincount(b, weights=f.astype(float), minlength=n_bins) / np.maximum(cnt, 1)
            keep = cnt >= min_count
            centres = 0.5 * (edges[1:] + edges[:-1])
            ax.plot(centres[keep], frac[keep], "o-", color=c, label=f"{rate:.0%} flipped", ms=4)
            ax.axhline(rate, color=c, ls=":", lw=1)
        ax.set_title(f"{method}" + ("" if method.startswith("adaptive") else " (shadow metric)"), fontsize=10)
        ax.set_xlabel("minority metric m (bin centre)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction of flipped pairs in bin")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Flipped pairs per metric bin (dotted: base rate; bins with >= {min_count} pairs)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


COLOURS = {"dpo": "tab:blue", "robust": "tab:orange", "adaptive": "tab:green", "adaptive-k1": "tab:purple",
           "adaptive-k0": "tab:red"}


def plot_gain_vs_compute(summary: list[dict], path: str, rate: float = 0.2) -> None:
    """Reward gain at ``rate`` flips (mean, +- one std over seeds) vs FLOPs per step relative to DPO."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rates = sorted({r["flip_rate"] for r in summary})
    rate = min(rates, key=lambda x: abs(x - rate))  # the nearest rate the grid has
    sel = [r for r in summary if r["flip_rate"] == rate]
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.2), sharey=True)
    for ax, key, name in ((axes[0], "flops_vs_dpo", "toy MLP, full fine-tune"),
                          (axes[1], "unet_flops_vs_dpo", "tiny SD-style UNet, LoRA")):
        for r in sel:
            std = 0.0 if math.isnan(r["gain_std"]) else r["gain_std"]
            ax.errorbar([r[key]], [r["gain_mean"]], yerr=[std], fmt="o", capsize=3,
                        color=COLOURS.get(r["method"]), label=r["method"])
        ax.set_xlabel(f"FLOPs per step / DPO's ({name})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"reward gain at {rate:.0%} flips")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Reward gain vs compute per step, {rate:.0%} labels flipped (mean +- std over seeds)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


GAIN_FLOOR = -0.5  # lower edge of the curves plot (a gain is >= 0 unless a run goes astray)


def plot_curves(results: list[RunResult], path: str) -> None:
    """Reward gain over the reference vs fine-tuning step, mean and spread over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rates = sorted({r.flip_rate for r in results})
    methods = [m for m in METHODS if any(r.method == m for r in results)]
    fig, axes = plt.subplots(1, len(rates), figsize=(3.3 * len(rates), 3.0), sharey=True, squeeze=False)
    colours = COLOURS
    for ax, rate in zip(axes[0], rates):
        off = []
        for method in methods:
            sel = [r for r in results if r.method == method and r.flip_rate == rate]
            if not sel:
                continue
            steps = np.asarray(sel[0].curve_steps)
            g = np.asarray([r.curve_gain for r in sel])
            mu = g.mean(0)
            n_off = int((g.min(1) < GAIN_FLOOR).sum())
            if n_off:
                off.append(f"{method}: {n_off}/{len(sel)} seeds")
            ax.plot(steps, mu, color=colours[method], label=method)
            if len(sel) > 1:
                sd = g.std(0, ddof=1)
                ax.fill_between(steps, mu - sd, mu + sd, color=colours[method], alpha=0.2)
        ax.set_title(f"{rate:.0%} labels flipped", fontsize=10)
        ax.set_ylim(bottom=GAIN_FLOOR, top=min(ax.get_ylim()[1], 3.0))  # diverged runs would flatten the rest
        if off:
            ax.text(0.03, 0.03, "below the axis:\n" + "\n".join(off), transform=ax.transAxes, fontsize=7,
                    va="bottom")
        ax.set_xlabel("fine-tuning step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("reward gain over reference")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(results: list[RunResult], s: Settings, out_dir: str, seconds: float, argv) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    rows = [r.row() for r in results]
    summary = summarise(results, s, unet_flops(sorted({r.method for r in results}), s))
    write_csv(os.path.join(out_dir, "runs.csv"), rows)
    write_csv(os.path.join(out_dir, "summary.csv"), summary)
    table = markdown_table(summary)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table)
    plot_flip_fraction(results, os.path.join(out_dir, "flip_fraction.png"))
    plot_curves(results, os.path.join(out_dir, "reward_curves.png"))
    plot_gain_vs_compute(summary, os.path.join(out_dir, "gain_vs_compute.png"))
    info = dict(command=" ".join(["python -m adpo_train.experiments.label_flip"] + list(argv)),
                settings={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()},
                rho_used=s.rho_for(), seconds=round(seconds, 1), machine=platform.platform(),
                processor=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                torch=torch.__version__, python=platform.python_version())
    with open(os.path.join(out_dir, "run_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    return dict(rows=rows, summary=summary, table=table, info=info)


def parse_args(argv: Optional[list[str]]) -> tuple[Settings, str, list[str]]:
    p = argparse.ArgumentParser(
        prog="adpo-train experiment label-flip",
        description="Label-flip robustness, minority detection and cost of DPO / robust-DPO / Adaptive-DPO "
                    "(K = 2, 1, 0 annotators) "
                    "on a 2-D toy diffusion problem with a known reward (see docs/method-study.md).")
    p.add_argument("--quick", action="store_true", help="the CI preset: 1 seed, 300 steps (about a minute)")
    p.add_argument("--out", default=None, help="output folder (default outputs/label_flip[_quick])")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0-4; --quick: 0)")
    p.add_argument("--flip-rates", type=float, nargs="+", help="label-flip rates (default 0 0.1 0.2 0.3)")
    p.add_argument("--methods", nargs="+", choices=METHODS, help="methods (default all)")
    p.add_argument("--steps", type=int, help="fine-tuning steps per run")
    p.add_argument("--batch", type=int, help="pairs per step")
    p.add_argument("--lr", type=float, help="fine-tuning learning rate (AdamW)")
    p.add_argument("--beta", type=float, help="DPO beta (this package's convention, loss = -log sigmoid(beta z))")
    p.add_argument("--rho", type=float, help="metric rho (default 15 * sqrt(batch / 16))")
    p.add_argument("--rho0", type=float, help="adaptive-k0's rho (default: per seed from the clean DPO run)")
    p.add_argument("--bt-temp", type=float, help="Bradley-Terry labels with this temperature (default: "
                                                    "deterministic labels)")
    p.add_argument("--n-pairs", type=int, help="size of the preference data set")
    p.add_argument("--pretrain-steps", type=int, help="reference pretraining steps")
    p.add_argument("--no-shadow-metric", action="store_true",
                   help="do not compute the metric on the side during dpo / robust runs")
    p.add_argument("--threads", type=int, help="torch CPU threads (default 1)")
    a = p.parse_args(argv)
    kw = {}
    for name, key in (("seeds", "seeds"), ("flip_rates", "flip_rates"), ("methods", "methods")):
        if getattr(a, name) is not None:
            kw[key] = tuple(getattr(a, name))
    for name in ("steps", "batch", "lr", "beta", "rho", "rho0", "bt_temp", "n_pairs", "pretrain_steps", "threads"):
        if getattr(a, name) is not None:
            kw[name] = getattr(a, name)
    if a.no_shadow_metric:
        kw["shadow_metric"] = False
    s = Settings.quick(**kw) if a.quick else Settings(**kw)
    out = a.out or os.path.join("outputs", "label_flip_quick" if a.quick else "label_flip")
    return s, out, list(argv if argv is not None else sys.argv[1:])


def main(argv: Optional[list[str]] = None) -> int:
    s, out_dir, args = parse_args(argv)
    t0 = time.perf_counter()
    results = run_grid(s)
    report = write_report(results, s, out_dir, time.perf_counter() - t0, args)
    print()
    print(report["table"])
    print(f"wrote {out_dir}/{{runs.csv,summary.csv,table.md,flip_fraction.png,reward_curves.png,"
          f"gain_vs_compute.png,run_info.json}}"
          f" in {report['info']['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
