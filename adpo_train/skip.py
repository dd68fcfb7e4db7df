"""Skipping the whole update of a step whose loss is not finite, without a host sync.

``nonfinite`` is a 0-d bool tensor on the device.  When it is set:

* the optimiser changes nothing: parameters (weight decay included), both Adam moments and
  the step count.  ``AdamW(fused=True)`` takes the flag as ``found_inf`` (the mechanism
  ``torch.amp.GradScaler`` uses; the fused kernel skips the update and undoes its step
  increment on the device; torch >= 2.4 has the same on the CPU).  Other AdamW implementations
  reject ``found_inf``.  On the CPU (the trainer's default there is the for-loop AdamW, whose
  bits the published loop shares; the fused CPU kernel rounds differently) the flag is already
  computed when it is read, so reading it costs no sync: a finite step is a plain ``step()``,
  a skipped one does not call it.  On a GPU their parameters and state are snapshotted and put
  back with ``torch.where`` (their step count lives on the host, so that costs a sync and two
  copies of everything trained: fused is the default there).  Under fp16
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
    if nonfinite.device.type == "cpu":
        # the CPU computed the flag already: reading it waits for nothing, and a finite step then costs
        # exactly a step (the snapshot below cost ~2x the optimiser step in copies).  The flag agrees on
        # every rank (it includes the all-reduced gradient norm), so every rank takes the same branch.
        if not bool(nonfinite):
            accel_optimizer.step()
        return
    _step_and_restore(accel_optimizer, raw, nonfinite)


def _step_and_restore(accel_optimizer, raw, nonfinite: torch.Tensor) -> None:
    """Step, then put the snapshot of parameters and state back where ``nonfinite`` (no host read)."""
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
