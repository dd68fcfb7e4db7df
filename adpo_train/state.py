"""The trainer's mutable state and its one training step, shared by the trainer loop and the
benchmark (``bench/train.py``), so the benchmark times exactly what users run.

:func:`train_step` runs one micro-batch (rows stacked ``[winners; losers]``) under
``accelerator.accumulate``:

1. :func:`~adpo_train.step.step_inputs`: latents, conditioning, one noise draw and one
   timestep per pair;
2. :meth:`~adpo_train.step.StepModels.loss`: reference and annotator forwards (no grad),
   the policy forward and ``adpo_kernels.adaptive_dpo_loss``; then backward;
3. at an optimisation-step boundary (``accelerator.sync_gradients``): gradient clipping, the
   optimiser step, skipped on the device when the loss or the all-reduced gradient norm is
   not finite (:mod:`adpo_train.skip`), one EMA update of every annotator, ``global_step += 1``;
4. the micro-batch's metrics summed into :attr:`TrainState.buf` on the device (one slot per
   name in :data:`FIELDS`), read by the trainer once per ``--logging_steps``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from . import fsdp, skip
from .step import StepModels, step_inputs

# Device-side metric buffer: one slot per field, summed over optimisation steps between logs.
FIELDS = ("loss", "implicit_acc", "weight_mean", "metric_mean", "logit_mean", "model_mse", "ref_mse",
          "grad_norm", "nonfinite", "micro_batches", "skipped_steps", "flipped_weight_sum", "flipped_count",
          "clean_weight_sum", "clean_count")
F = {name: i for i, name in enumerate(FIELDS)}
_COUNTERS = torch.tensor([name in ("nonfinite", "micro_batches", "skipped_steps") for name in FIELDS])


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """What one step does, fixed for a run."""

    ema_warmup_steps: int = 0  # optimisation steps before the annotators join the loss
    loss_backend: str = "auto"
    max_grad_norm: Optional[float] = None  # None or <= 0: no clipping
    dump_pairs: bool = False  # keep per-pair (step, index, logit, metric, weight, flipped) rows
    channels_last: bool = False
    vae_chunk: Optional[int] = None  # images per VAE encode (image path)


@dataclasses.dataclass
class TrainState:
    """Everything one step reads or changes.  A checkpoint holds it through :meth:`state_dict` (registered
    with accelerate's checkpointing) and :meth:`rank_state` (one file per rank)."""

    accelerator: Any
    models: StepModels
    optimizer: Any
    lr_scheduler: Any
    params: list  # the trained parameters (LoRA, or the whole UNet)
    noise_scheduler: Any  # diffusers DDPM-style scheduler: add_noise, get_velocity
    cfg: Any  # adpo_kernels.AdaptiveDPOConfig
    gen: torch.Generator  # noise and timesteps: one stream for the global batch, alike on every rank
    weight_dtype: torch.dtype
    options: StepOptions = dataclasses.field(default_factory=StepOptions)
    annotators: Any = None
    vae_gen: Optional[torch.Generator] = None  # VAE latent samples (image path): one stream per rank
    text_encoder: Any = None  # image path only
    vae: Any = None  # image path only
    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    num_corrupt_seen: int = 0
    skipped_total: int = 0
    steps_since_log: int = 0
    buf: Optional[torch.Tensor] = None
    nonfinite: Optional[torch.Tensor] = None
    pair_rows: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        device = self.accelerator.device
        if self.buf is None:
            self.buf = torch.zeros(len(FIELDS), dtype=torch.float64, device=device)
        if self.nonfinite is None:
            self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    # -- checkpointing ---------------------------------------------------------------------------
    # What every rank holds alike is this object's state_dict, registered with accelerate's checkpointing
    # (``accelerator.register_for_checkpointing``: saved by the main process with save_state, restored by
    # load_state); what differs per rank is rank_state (a file per rank, written by the trainer).
    COUNTERS = ("global_step", "epoch", "batch_in_epoch", "skipped_total", "steps_since_log")

    def state_dict(self) -> dict:
        """The step and data position, the noise generator (one stream, alike on every rank) and the EMA
        annotators (their step counts; their weights too unless they are FSDP shards, which DCP saves)."""
        out = {k: getattr(self, k) for k in self.COUNTERS}
        out["noise_generator"] = self.gen.get_state()
        if self.annotators is not None:
            out["ema_meta"] = self.annotators.state_meta()
            if not self.sharded_annotators:
                out["ema"] = self.annotators.state_tensors()
        return out

    def load_state_dict(self, state: dict) -> None:
        for k in self.COUNTERS:
            setattr(self, k, int(state[k]))
        self.gen.set_state(state["noise_generator"])
        if self.annotators is not None:
            if "ema" in state:
                self.annotators.load({k: v.to(self.device) for k, v in state["ema"].items()}, state["ema_meta"])
            else:
                self.annotators.weights.load_meta(state["ema_meta"])

    @property
    def sharded_annotators(self) -> bool:
        return self.annotators is not None and any(fsdp.is_dtensor(p) for p in self.annotators.params)

    def rank_state(self) -> dict[str, torch.Tensor]:
        """This rank's own part: the VAE's sampling generator, the metric buffer, the corrupt pairs seen."""
        out = {"metrics": self.buf.cpu(), "num_corrupt_seen": torch.tensor(self.num_corrupt_seen)}
        if self.vae_gen is not None:
            out["vae_generator"] = self.vae_gen.get_state()
        return out

    def load_rank_state(self, state: dict[str, torch.Tensor]) -> None:
        self.buf.copy_(state["metrics"])
        self.num_corrupt_seen = int(state["num_corrupt_seen"])
        if "vae_generator" in state and self.vae_gen is not None:
            self.vae_gen.set_state(state["vae_generator"])


@dataclasses.dataclass
class StepMetrics:
    """What :func:`train_step` hands back: the loss output (device tensors), the clipped gradient
    norm (a device tensor at a step boundary with clipping, else None), whether the annotators
    were in the loss, and whether an optimisation step ended (``synced``)."""

    out: Any
    grad_norm: Optional[torch.Tensor]
    ready: bool
    synced: bool


def train_step(state: TrainState, batch: dict) -> StepMetrics:
    """One micro-batch: forwards, loss, backward; at a step boundary the (maybe skipped) update."""
    acc, opts = state.accelerator, state.options
    world = acc.num_processes
    with acc.accumulate(state.models.unet):
        x = step_inputs(batch, state.noise_scheduler, state.gen, state.device, state.weight_dtype,
                        rank=acc.process_index, world=world, encoders=state.text_encoder, vae=state.vae,
                        vae_gen=state.vae_gen, channels_last=opts.channels_last, vae_chunk=opts.vae_chunk)
        ready = state.global_step >= opts.ema_warmup_steps
        out = state.models.loss(x, state.cfg, ready, opts.loss_backend)
        acc.backward(out.loss)
        state.nonfinite |= out.nonfinite
        grad_norm = _update(state) if acc.sync_gradients else _accumulate(state)
        state.lr_scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
        _record(state, batch, out, grad_norm)
    synced = acc.sync_gradients
    if synced:
        if state.annotators is not None:
            skip.ema_step(state.annotators, state.nonfinite)
        state.nonfinite.zero_()
        state.global_step += 1
        state.steps_since_log += 1
    return StepMetrics(out, grad_norm, ready, synced)


def _accumulate(state: TrainState) -> None:
    state.optimizer.step()  # accelerate makes this a no-op while accumulating
    return None


def _update(state: TrainState) -> Optional[torch.Tensor]:
    """Clip, decide (identically on every rank) whether the step is finite, step the optimiser."""
    acc, max_norm, nonfinite = state.accelerator, state.options.max_grad_norm, state.nonfinite
    grad_norm = None
    if max_norm and max_norm > 0:
        grad_norm = fsdp.full_tensor(acc.clip_grad_norm_(state.params, max_norm))  # FSDP: a replicated DTensor
    if acc.num_processes > 1:  # the all-reduced (FSDP: reduce-scattered) gradients decide, alike on every rank
        norm = grad_norm if grad_norm is not None else fsdp.grad_norm(state.params).to(state.device)
        nonfinite |= ~torch.isfinite(norm)
    skip.optimizer_step(state.optimizer, nonfinite)
    state.buf[F["skipped_steps"]] += nonfinite.double()
    if grad_norm is not None:  # a skipped step's norm is not a measurement
        grad_norm = torch.where(nonfinite, torch.zeros_like(grad_norm), grad_norm)
    return grad_norm


@torch.no_grad()
def _record(state: TrainState, batch: dict, out, grad_norm: Optional[torch.Tensor]) -> None:
    """Sum the micro-batch's metrics into the device buffer (no host sync)."""
    device = state.device
    w = out.weights
    fl = batch["flipped"].to(device)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    row = torch.stack([out.loss.detach().double(), out.implicit_acc.double(), w.mean().double(),
                       out.metric.mean().double(), out.logits.mean().double(),
                       out.model_mse.mean().double(), out.ref_mse.mean().double(),
                       grad_norm.double() if isinstance(grad_norm, torch.Tensor) else zero,
                       out.nonfinite.double(), torch.ones((), dtype=torch.float64, device=device), zero,
                       (w * fl).sum().double(), fl.sum().double(),
                       (w * ~fl).sum().double(), (~fl).sum().double()])
    # a non-finite micro-batch adds only to its counters (the averages stay finite)
    state.buf += torch.where(out.nonfinite & ~_COUNTERS.to(device), 0.0, row)
    if state.options.dump_pairs:
        state.pair_rows.append(torch.stack([torch.full_like(out.logits, state.global_step + 1),
                                            batch["index"].to(device, out.logits.dtype), out.logits,
                                            out.metric, w, fl.to(out.logits.dtype)], 1))
