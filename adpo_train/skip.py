"""Skipping the whole update of a step whose loss is not finite, without a host sync.

``nonfinite`` is a 0-d bool tensor on the device.  When it is set:

* the optimiser changes nothing: parameters (weight decay included), both Adam moments and
  the step count.  ``AdamW(fused=True)`` takes the flag as ``found_inf`` (the mechanism
  ``torch.amp.GradScaler`` uses; the fused kernel skips the update and undoes its step
  increment on the device).  Other AdamW implementations reject ``found_inf``: their
  parameters and state are snapshotted and put back with ``torch.where`` (on CUDA their step
  count lives on the host, so that costs a sync: fused is the default there).  Under fp16
  mixed precision accelerate's ``GradScaler`` owns ``found_inf``; a non-finite loss gives
  non-finite gradients, which it already skips (and it lowers its scale, as it should);
* each EMA annotator's update is multiplied by zero, which leaves it exactly as it was
  (``s + 0 * (p - s) = s``; :meth:`adpo_train.annotators.EMAWeights.step`);
* the host-side counters (the LR schedule, the EMA decay schedule, the global step) cannot
  see the flag without a sync, so the trainer reconciles them at its next host sync (every
  ``--logging_steps``): :func:`rewind` takes the skipped steps back, so they count towards
  neither ``--max_train_steps`` nor the schedules.  Between two syncs the learning rate may
  run ahead by the skipped steps.
"""
from __future__ import annotations

import torch

from .fsdp import local


def optimizer_step(accel_optimizer, nonfinite: torch.Tensor) -> None:
    """``accel_optimizer.step()`` (an accelerate ``AcceleratedOptimizer``), skipped where ``nonfinite``."""
    raw = getattr(accel_optimizer, "optimizer", accel_optimizer)
    if getattr(accel_optimizer, "scaler", None) is not None:
        accel_optimizer.step()  # GradScaler (fp16) finds the non-finite gradients itself and skips
        return
    if not isinstance(raw, torch.optim.Adam | torch.optim.AdamW):
        # another optimiser (bitsandbytes' AdamW8bit, DeepSpeed's): zero gradients is all we can do on the
        # device; its moments and weight decay still move this step
        for g in getattr(raw, "param_groups", []):
            for p in g["params"]:
                if p.grad is not None:
                    p.grad.masked_fill_(nonfinite, 0.0)
        accel_optimizer.step()
        return
    if raw.defaults.get("fused"):
        raw.found_inf = nonfinite.to(torch.float32)
        try:
            accel_optimizer.step()
        finally:
            del raw.found_inf
        return
    # under FSDP parameters and state are DTensors: their local shards are put back, rank by rank
    params = [p for g in raw.param_groups for p in g["params"] if p.grad is not None]
    before = [local(p).clone() for p in params]
    state_before = [{k: local(v).clone() for k, v in raw.state[p].items() if torch.is_tensor(v)} for p in params]
    accel_optimizer.step()
    with torch.no_grad():
        for p, old, st in zip(params, before, state_before):
            p_local = local(p)
            p_local.copy_(torch.where(nonfinite, old, p_local))
            for k, v in raw.state[p].items():
                if torch.is_tensor(v):
                    v_local = local(v)
                    v_local.copy_(torch.where(nonfinite, st[k] if k in st else torch.zeros_like(v_local), v_local))


@torch.no_grad()
def ema_step(annotators, nonfinite: torch.Tensor) -> None:
    """One EMA update of every annotator (:class:`adpo_train.annotators.Annotators`, either strategy),
    a no-op (bit for bit) where ``nonfinite``."""
    annotators.step(~nonfinite)


def rewind(skipped: int, lr_scheduler, annotators, num_processes: int = 1) -> None:
    """Take ``skipped`` steps back from the host-side schedules (called at a host sync)."""
    if skipped <= 0:
        return
    sched = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's wrapper steps it num_processes times
    sched.last_epoch -= skipped * num_processes + 1
    sched.step()  # re-applies the learning rate of the rewound step
    for ema in getattr(annotators, "emas", []) or []:
        ema.optimization_step -= skipped
