"""FLOPs of one training step of each label-flip method, on a real diffusion UNet.

The toy's own cost is counted inside each toy run (``label_flip.finetune``).  A 2-D MLP
trained in full is not how the method is used, so the same count is made here on the
trainer's step (:class:`adpo_train.step.StepModels`) with a UNet and LoRA adapters:
policy forward and backward (LoRA: the backward still runs through the whole frozen
UNet for the input gradients, but computes weight gradients only for the adapters),
the reference forward (adapters disabled), and one forward per EMA annotator.  Counted
with ``torch.utils.flop_counter.FlopCounterMode``: every matmul / convolution /
attention FLOP, backward included; elementwise work (the loss, the EMA updates) is not
counted, and it is small next to a UNet forward.

    flops(K annotators) / flops(DPO) = (F_pol + B_pol + F_ref + K F) / (F_pol + B_pol + F_ref)

so the ratio depends on the backward-to-forward ratio of the model, which is why it is
measured on both the toy (full fine-tune, backward ~2x forward) and a LoRA UNet.
"""
from __future__ import annotations

from typing import Sequence

import torch

UNET_SPEC = dict(unet="tiny", rank=4, pairs=8)  # the trainer's CPU benchmark suite (bench/train.py)


def unet_step_flops(annotator_decays: Sequence[float], cfg, unet: str = UNET_SPEC["unet"],
                    rank: int = UNET_SPEC["rank"], pairs: int = UNET_SPEC["pairs"]) -> int:
    """Matmul/conv FLOPs of one trainer step (loss forward + backward) with ``len(annotator_decays)`` annotators."""
    from torch.utils.flop_counter import FlopCounterMode

    from adpo_train.annotators import EMAAnnotators
    from adpo_train.models import add_lora, build_unet, set_attention, text_shape
    from adpo_train.step import StepModels

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_unet(unet)
        set_attention(model, "sdpa", log=lambda *a: None)
        named = add_lora(model, rank)
        model.train()
        params = [p for _, p in named]
        ann = EMAAnnotators(params, [n for n, _ in named], annotator_decays) if annotator_decays else None
        models = StepModels(model, model, None, ann)
        c, ss = model.config.in_channels, model.config.sample_size
        tokens, width, _ = text_shape(unet)
        x = dict(noisy=torch.randn(2 * pairs, c, ss, ss), t=torch.randint(0, 1000, (pairs,)).repeat(2),
                 enc=torch.randn(pairs, tokens, width).repeat(2, 1, 1), added=None,
                 target=torch.randn(pairs, c, ss, ss), B=pairs)
        with FlopCounterMode(display=False) as fc:
            out = models.loss(x, cfg, ready=True, backend="torch")
            out.loss.backward()
    return int(fc.get_total_flops())
