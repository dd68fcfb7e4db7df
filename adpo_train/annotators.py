"""EMA annotators over the LoRA parameters, evaluated by swapping weights in place.

The Adaptive-DPO reference script keeps EMA copies of the trainable weights (decays
0.9999 and 0.5) and evaluates them on the policy's noisy inputs (spec section 9).
Only the LoRA parameters differ between the policy and its EMA copies, so the EMA of
the LoRA parameters alone is exact.  Each annotator is a diffusers ``EMAModel`` over
those parameters (its decay schedule: ``min(decay, (1 + t) / (10 + t))``, the first
update copies).  To evaluate annotator k, the live LoRA parameters are saved into one
preallocated backup, overwritten with the EMA shadow, the UNet runs under no_grad,
and the backup is copied back: no extra UNet exists, and the policy's weights return
bit for bit.  Annotator forwards must run before the policy's grad-enabled forward
(the in-place swap would otherwise invalidate tensors saved for backward).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch


class EMAAnnotators:
    """K EMA copies of ``params`` (diffusers ``EMAModel`` semantics), swapped in place for evaluation."""

    def __init__(self, params: Sequence[torch.nn.Parameter], names: Sequence[str], decays: Sequence[float]):
        from diffusers.training_utils import EMAModel

        self.params = list(params)
        self.names = list(names)
        self.decays = [float(d) for d in decays]
        self.emas = [EMAModel(self.params, decay=d, min_decay=0.0, update_after_step=0, use_ema_warmup=False,
                              foreach=True) for d in self.decays]
        self._backup = [p.detach().clone() for p in self.params] if self.decays else []

    def __len__(self) -> int:
        return len(self.emas)

    @property
    def optimization_step(self) -> int:
        return self.emas[0].optimization_step if self.emas else 0

    @torch.no_grad()
    def step(self) -> None:
        """One EMA update of every annotator from the current parameters (after an optimiser step)."""
        for ema in self.emas:
            ema.step(self.params)

    @contextlib.contextmanager
    def swapped(self, k: int):
        """Within the block the live parameters hold annotator ``k``'s EMA weights."""
        with torch.no_grad():
            torch._foreach_copy_(self._backup, [p.detach() for p in self.params])
            torch._foreach_copy_([p.detach() for p in self.params], self.emas[k].shadow_params)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.detach() for p in self.params], self._backup)

    @torch.no_grad()
    def predict(self, forward: Callable[[], torch.Tensor]) -> list[torch.Tensor]:
        """``[forward() under annotator k for k in range(K)]``, all under no_grad."""
        preds = []
        for k in range(len(self.emas)):
            with self.swapped(k):
                preds.append(forward())
        return preds

    # -- checkpointing (safetensors tensors + JSON scalars) ---------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"ema{k}.{name}": s.detach().contiguous().cpu()
                for k, ema in enumerate(self.emas) for name, s in zip(self.names, ema.shadow_params)}

    def state_meta(self) -> dict:
        return {"decays": self.decays, "optimization_steps": [e.optimization_step for e in self.emas]}

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if [float(d) for d in meta["decays"]] != self.decays:
            raise ValueError(f"checkpoint EMA decays {meta['decays']} differ from --ema_decays {self.decays}")
        for k, ema in enumerate(self.emas):
            for name, s in zip(self.names, ema.shadow_params):
                s.copy_(tensors[f"ema{k}.{name}"])
            ema.optimization_step = int(meta["optimization_steps"][k])
