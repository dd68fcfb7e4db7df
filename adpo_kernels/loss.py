"""The public loss functions and module."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import _validate, dispatch
from ._validate import Annotators
from .config import AdaptiveDPOConfig
from .output import AdaptiveDPOOutput


def adaptive_dpo_loss(model_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor,
                      annotator_preds: Annotators = None, config: Optional[AdaptiveDPOConfig] = None,
                      annotators_ready: bool = True, backend: str = "auto") -> AdaptiveDPOOutput:
    """Adaptive-DPO (or plain Diffusion-DPO) loss of a paired batch.

    Args:
        model_pred: ``(2B, *S)`` policy predictions, rows ``[winners; losers]``.  The
            only input that receives a gradient.
        ref_pred: ``(2B, *S)`` reference predictions.  Treated as a constant even if it
            requires grad.
        target: ``(2B, *S)``, or ``(B, *S)`` when both halves share the noise
            (epsilon-prediction); the shared target is never repeated in memory.
        annotator_preds: ``None``, K tensors ``(2B, *S)`` or one ``(K, 2B, *S)`` tensor:
            the EMA annotators' predictions on the same inputs (constants).
        config: an :class:`AdaptiveDPOConfig` (default: ``AdaptiveDPOConfig()``).
        annotators_ready: ``False`` during annotator warm-up: the metric is then 0.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"triton"`` or ``"cuda"``; the
            ``ADPO_BACKEND`` environment variable overrides ``"auto"``.

    Returns:
        :class:`AdaptiveDPOOutput`.  Non-finite inputs are not an error: they propagate
        to the loss, and ``out.nonfinite`` flags them.
    """
    config = AdaptiveDPOConfig() if config is None else config
    _validate.check_call(config, annotators_ready, backend)
    annotators = _validate.check_inputs(model_pred, ref_pred, target, annotator_preds)
    impl = dispatch.select(backend, model_pred.device, model_pred.dtype, len(annotators))
    return impl.forward(model_pred, ref_pred, target, annotators, config, annotators_ready)


def dpo_loss(model_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor,
             beta: float = 2500.0, backend: str = "auto") -> AdaptiveDPOOutput:
    """Plain Diffusion-DPO, ``mean_i -log sigmoid(beta * z_i)`` (see :func:`adaptive_dpo_loss`)."""
    return adaptive_dpo_loss(model_pred, ref_pred, target, None, AdaptiveDPOConfig.dpo(beta),
                             backend=backend)


@torch.no_grad()
def pair_logits(pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor,
                backend: str = "auto") -> torch.Tensor:
    """``(B,)`` pair logits ``z_i = ref_diff_i - (mse(pred)_i - mse(pred)_{i+B})``, no grad.

    For annotators and logging; accumulation dtype (fp32, fp64 for fp64 inputs).
    """
    _validate.check_call(AdaptiveDPOConfig(), True, backend)
    _validate.check_inputs(pred, ref_pred, target)
    impl = dispatch.select(backend, pred.device, pred.dtype, 0)
    mse = impl.row_mse(pred, ref_pred, target)
    B = pred.shape[0] // 2
    return (mse[1, :B] - mse[1, B:]) - (mse[0, :B] - mse[0, B:])


class AdaptiveDPOLoss(nn.Module):
    """:func:`adaptive_dpo_loss` as a module; the config is validated at construction."""

    def __init__(self, config: Optional[AdaptiveDPOConfig] = None, backend: str = "auto", **options):
        super().__init__()
        if config is not None and options:
            raise TypeError("AdaptiveDPOLoss: pass either config or keyword options, not both")
        self.config = config if config is not None else AdaptiveDPOConfig(**options)
        _validate.check_call(self.config, True, backend)
        if backend != "auto" and backend not in dispatch.BACKENDS:
            raise ValueError(f"backend: expected 'auto' or one of {sorted(dispatch.BACKENDS)}, got {backend!r}")
        self.backend = backend

    def forward(self, model_pred, ref_pred, target, annotator_preds: Annotators = None,
                annotators_ready: bool = True) -> AdaptiveDPOOutput:
        return adaptive_dpo_loss(model_pred, ref_pred, target, annotator_preds, self.config,
                                 annotators_ready, self.backend)

    def extra_repr(self) -> str:
        return f"config={self.config}, backend={self.backend!r}"
