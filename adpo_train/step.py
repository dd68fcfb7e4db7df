"""The forwards of one training step, shared by the trainer, the multi-process test and the
benchmark.

* :func:`step_inputs`: noise and timesteps drawn for the *global* batch from one generator
  that every process seeds alike, each process keeping its own rows, so P processes with B
  pairs each see exactly the draws that one process with P*B pairs sees (with
  ``--sync_batch_stats`` the loss then equals the single-process loss up to float rounding);
* :class:`StepModels`: the policy forward with grad (through the DDP wrapper, so gradients
  are all-reduced), the reference and annotator forwards under no_grad on the unwrapped
  (possibly compiled) UNet: adapters disabled, EMA weights swapped in place, one mixed-batch
  forward (:class:`~adpo_train.annotators.MixedBatchAnnotators`), or a frozen reference UNet
  copy (full fine-tune);
* :func:`compile_unet`: ``torch.compile`` in place (``nn.Module.compile``), so the module
  object, its parameters and its state-dict keys stay the same.
"""
from __future__ import annotations

from typing import Optional

import torch


def compile_unet(unet, backend: str = "inductor", mode: Optional[str] = None):
    """Compile ``unet``'s forward in place.  Static shapes: every step has the same batch shape.

    Adapter toggling (``disable_adapters``), the in-place EMA swaps (parameters are graph
    inputs, not constants) and grad/no-grad each hit a cached graph after the first step, so
    steady-state steps never recompile (tests/test_train_scale_compile.py counts).
    """
    import torch._dynamo

    # one graph per (grad mode, adapters on/off, mixed-batch routing) state: leave room
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    unet.compile(backend=backend, mode=mode, dynamic=False)
    return unet


def step_inputs(batch: dict, scheduler, gen: torch.Generator, device, weight_dtype, *, rank: int = 0,
                world: int = 1, encoders=None, vae=None, vae_gen=None, channels_last: bool = False,
                vae_chunk: Optional[int] = None) -> dict:
    """Noisy latents, timesteps, conditioning and target of one micro-batch (rows ``[winners; losers]``)."""
    with torch.no_grad():
        if "latents" in batch:
            lat = batch["latents"].to(device, torch.float32)
            text = batch["text"].to(device, weight_dtype)
            pooled = batch["pooled"].to(device, weight_dtype) if "pooled" in batch else None
        else:
            from .conditioning import encode_images

            lat = encode_images(vae, batch["pixels"], vae_gen, vae_chunk).float()
            ids = {k: batch[k] for k in ("input_ids", "input_ids_2") if k in batch}
            text, pooled = encoders.encode(**ids)
            text = text.to(weight_dtype)
            pooled = None if pooled is None else pooled.to(weight_dtype)
        B = lat.shape[0]
        latents = torch.cat([lat[:, 0], lat[:, 1]])
        # the global batch's draws, this process's rows (world == 1: exactly the single-process stream)
        noise = torch.randn((B * world, *lat.shape[2:]), generator=gen, device=device)[rank * B:(rank + 1) * B]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (B * world,), generator=gen,
                          device=device).long()[rank * B:(rank + 1) * B]
        noise2, t2 = noise.repeat(2, 1, 1, 1), t.repeat(2)
        noisy = scheduler.add_noise(latents, noise2, t2).to(weight_dtype)
        if channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        v_pred = scheduler.config.prediction_type == "v_prediction"
        target = scheduler.get_velocity(latents, noise2, t2) if v_pred else noise
        added = None
        if pooled is not None:
            tid = batch["time_ids"].to(device, weight_dtype)
            added = {"text_embeds": pooled.repeat(2, 1), "time_ids": torch.cat([tid[:, 0], tid[:, 1]])}
    return {"noisy": noisy, "t": t2, "enc": text.repeat(2, 1, 1), "added": added, "target": target, "B": B}


class StepModels:
    """The UNet forwards of a step.

    ``unet``: what the optimiser trains (possibly DDP-wrapped); ``base``: the unwrapped module
    (possibly compiled in place) used for every no-grad forward, so DDP never sees them;
    ``reference``: a frozen UNet (full fine-tune) or None (LoRA: adapters disabled);
    ``annotators``: an :class:`~adpo_train.annotators.Annotators` (swapped weights or one mixed-batch
    forward) or None.
    """

    def __init__(self, unet, base, reference=None, annotators=None):
        self.unet, self.base, self.reference_unet, self.annotators = unet, base, reference, annotators

    @staticmethod
    def _call(module, noisy, t, enc, added):
        kw = {} if added is None else {"added_cond_kwargs": added}
        return module(noisy, t, enc, return_dict=False, **kw)[0]

    def policy(self, x: dict) -> torch.Tensor:
        return self._call(self.unet, x["noisy"], x["t"], x["enc"], x["added"])

    @torch.no_grad()
    def reference(self, x: dict) -> torch.Tensor:
        if self.reference_unet is not None:
            return self._call(self.reference_unet, x["noisy"], x["t"], x["enc"], x["added"])
        self.base.disable_adapters()
        try:
            return self._call(self.base, x["noisy"], x["t"], x["enc"], x["added"])
        finally:
            self.base.enable_adapters()

    @torch.no_grad()
    def reference_and_annotators(self, x: dict, ready: bool):
        """``(reference prediction, [annotator predictions] or None)``; annotators only when ``ready``."""
        if self.annotators is None or not ready:
            return self.reference(x), None
        return self.annotators.predict_with_reference(lambda *a: self._call(self.base, *a),
                                                      lambda: self.reference(x), x["noisy"].shape[0],
                                                      x["noisy"], x["t"], x["enc"], x["added"])

    def loss(self, x: dict, cfg, ready: bool, backend: str = "auto"):
        """Reference and annotators (no grad), then the policy with grad and the loss."""
        import adpo_kernels as ak

        ref, ann = self.reference_and_annotators(x, ready)
        model_pred = self.policy(x)
        dt = model_pred.dtype
        return ak.adaptive_dpo_loss(model_pred, ref.to(dt), x["target"].to(dt),
                                    [a.to(dt) for a in ann] if ann else None, config=cfg,
                                    annotators_ready=ready, backend=backend)
