"""The result type every backend returns."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AdaptiveDPOOutput:
    """Loss and per-pair diagnostics of one call.

    ``loss`` is the only field that carries a gradient (to ``model_pred``); every other
    field is detached.  All fields are in the accumulation dtype: float32, or float64
    for float64 inputs.

    Attributes:
        loss: scalar, mean over this process's pairs.
        logits: ``(B,)`` pair logits ``z_i`` (before any flip).
        metric: ``(B,)`` minority metric ``m_i`` (zeros when ``adaptive=False`` or
            during annotator warm-up).
        weights: ``(B,)`` instance weights ``w_i``.
        margin: ``(B,)`` adaptive margins ``gamma_i``.
        implicit_acc: scalar, ``mean [z > 0] + 0.5 mean [z == 0]``.
        model_mse, ref_mse: ``(2B,)`` per-row MSE of the policy and the reference.
    """

    loss: torch.Tensor
    logits: torch.Tensor
    metric: torch.Tensor
    weights: torch.Tensor
    margin: torch.Tensor
    implicit_acc: torch.Tensor
    model_mse: torch.Tensor
    ref_mse: torch.Tensor

    @property
    def nonfinite(self) -> torch.Tensor:
        """Bool scalar tensor: some input row held NaN/Inf (so the loss is not finite).

        Non-finite inputs are not an error: they propagate to the loss, as in plain
        torch, and this flag lets a trainer skip the step without a host sync.
        """
        return ~(torch.isfinite(self.model_mse).all() & torch.isfinite(self.ref_mse).all()
                 & torch.isfinite(self.loss))
