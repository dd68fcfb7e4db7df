"""Every option of the Diffusion-DPO / Adaptive-DPO loss in one frozen dataclass.

The math each option controls is written down in ``docs/math.md`` (a restatement of
``shared/spec/ADAPTIVE_DPO.md``, sections 3-8).  The fused backends receive the
config as two flat lists (:meth:`AdaptiveDPOConfig.op_params`) so that one torch
op schema serves every variant; the mode switches become compile-time constants
inside the kernels.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "conservative")
WEIGHT_TYPES = ("linear", "quadratic", "sqrt", "exp")
MARGIN_TYPES = (None, "linear", "quadratic")

# Metric modes handed to the kernels (see op_params).
METRIC_OFF = 0  # adaptive=False: m = 0, w = 1, gamma = 0, no flipping (plain DPO)
METRIC_WARMUP = 1  # adaptive, annotators not ready: m = 0, weights and margin from m = 0
METRIC_ON = 2  # adaptive and ready: the full metric of spec section 4

# Indices into the float list of op_params.
F_BETA, F_RHO, F_TAU, F_INTERCEPT, F_BETA_IPO, F_EPS, F_FLIP_RATIO, F_FLIP_THRESHOLD = range(8)
# Indices into the int list of op_params.
(I_LOSS, I_WEIGHT, I_MARGIN, I_METRIC, I_LOGITS_NORMALIZE, I_STD_STANDARDIZE,
 I_WEIGHT_NORMALIZE, I_FLIP) = range(8)


def _positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"AdaptiveDPOConfig.{name}: expected a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"AdaptiveDPOConfig.{name}: expected a finite value > 0, got {value!r}")


@dataclass(frozen=True)
class AdaptiveDPOConfig:
    """Options of :func:`adpo_kernels.adaptive_dpo_loss`.

    Attributes:
        beta: inverse temperature on the pair logit ``z`` (this package's convention,
            ``loss = -log sigmoid(beta * z)``; diffusers' ``train_diffusion_dpo.py``
            (SD1.5/2.x) ``beta_dpo`` equals ``beta``, its ``train_diffusion_dpo_sdxl.py``
            ``beta_dpo`` equals ``2 * beta``, the Adaptive-DPO script's ``beta_dpo``
            equals ``beta``).
        adaptive: score pairs with the minority metric and weight/margin/flip them.
            ``False`` is plain Diffusion-DPO: metric 0, weights 1, margin 0.
        rho: scale of the logits inside the metric's sigmoid.
        weight_type: ``linear | quadratic | sqrt | exp`` (spec section 5).
        tau, intercept: the weight function's slope ``tau`` and intercept ``c``.
        margin_type: ``None | "linear" | "quadratic"`` adaptive margin.
        loss_type: ``sigmoid | ipo | hinge | robust | conservative``.
        beta_ipo: IPO's own beta.
        label_smoothing: ``eps`` of the robust and conservative losses, in [0, 0.5).
        logits_normalize, std_standardize, weight_normalize: metric options (K >= 1).
        flip_ratio, flip_threshold: label flipping of high-metric pairs (section 7).
        sync_stats: compute batch statistics over all processes of the default
            ``torch.distributed`` group (no effect when it is not initialised).
    """

    beta: float = 2500.0
    adaptive: bool = True
    rho: float = 1e4
    weight_type: str = "linear"
    tau: float = 10.0
    intercept: float = 1.0
    margin_type: Optional[str] = None
    loss_type: str = "sigmoid"
    beta_ipo: float = 100.0
    label_smoothing: float = 0.0
    logits_normalize: bool = False
    std_standardize: bool = False
    weight_normalize: bool = False
    flip_ratio: float = 0.0
    flip_threshold: float = 1.0
    sync_stats: bool = False

    def __post_init__(self) -> None:
        for name in ("beta", "rho", "tau", "intercept", "beta_ipo"):
            _positive(name, getattr(self, name))
        for name in ("adaptive", "logits_normalize", "std_standardize", "weight_normalize", "sync_stats"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"AdaptiveDPOConfig.{name}: expected a bool, got {getattr(self, name)!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"AdaptiveDPOConfig.loss_type: expected one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.weight_type not in WEIGHT_TYPES:
            raise ValueError(f"AdaptiveDPOConfig.weight_type: expected one of {WEIGHT_TYPES}, got {self.weight_type!r}")
        if self.margin_type not in MARGIN_TYPES:
            raise ValueError(f"AdaptiveDPOConfig.margin_type: expected one of {MARGIN_TYPES}, got {self.margin_type!r}")
        eps = self.label_smoothing
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0.0 <= eps < 0.5):
            raise ValueError(f"AdaptiveDPOConfig.label_smoothing: expected a number in [0, 0.5), got {eps!r}")
        r = self.flip_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0.0 <= r <= 1.0):
            raise ValueError(f"AdaptiveDPOConfig.flip_ratio: expected a number in [0, 1], got {r!r}")
        h = self.flip_threshold
        if isinstance(h, bool) or not isinstance(h, (int, float)) or not math.isfinite(h):
            raise ValueError(f"AdaptiveDPOConfig.flip_threshold: expected a finite number, got {h!r}")

    # -- presets ---------------------------------------------------------------------
    @classmethod
    def paper(cls, **overrides) -> "AdaptiveDPOConfig":
        """The configuration published for the paper's SD1.5 run (spec section 9)."""
        base = dict(beta=1000.0, adaptive=True, rho=15.0, logits_normalize=True, std_standardize=False,
                    weight_type="linear", tau=10.0, intercept=1.0, margin_type="quadratic")
        base.update(overrides)
        return cls(**base)

    @classmethod
    def dpo(cls, beta: float = 2500.0, **overrides) -> "AdaptiveDPOConfig":
        """Plain Diffusion-DPO: ``mean -log sigmoid(beta * z)``."""
        return cls(beta=beta, adaptive=False, **overrides)

    def replace(self, **changes) -> "AdaptiveDPOConfig":
        return dataclasses.replace(self, **changes)

    # -- kernel parameters -------------------------------------------------------------
    def metric_mode(self, annotators_ready: bool) -> int:
        if not self.adaptive:
            return METRIC_OFF
        return METRIC_ON if annotators_ready else METRIC_WARMUP

    def op_params(self, annotators_ready: bool) -> tuple[list[float], list[int]]:
        """The flat (floats, ints) lists the fused ops take; indices are the F_* / I_* constants."""
        floats = [float(self.beta), float(self.rho), float(self.tau), float(self.intercept),
                  float(self.beta_ipo), float(self.label_smoothing), float(self.flip_ratio),
                  float(self.flip_threshold)]
        mode = self.metric_mode(annotators_ready)
        ints = [LOSS_TYPES.index(self.loss_type), WEIGHT_TYPES.index(self.weight_type),
                MARGIN_TYPES.index(self.margin_type), mode, int(self.logits_normalize),
                int(self.std_standardize), int(self.weight_normalize),
                int(mode != METRIC_OFF and self.flip_ratio > 0.0)]
        return floats, ints
