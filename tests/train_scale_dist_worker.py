"""Worker of tests/test_train_scale_ddp.py (no tests here).

Under ``torchrun --nproc_per_node 2`` (accelerate DDP over gloo) or in-process (one process),
builds the tiny LoRA UNet with two EMA annotators that differ from the policy, takes this
process's share of one global batch of synthetic pairs through the trainer's own sampler and
``step_inputs`` (global noise stream), computes the Adaptive-DPO loss with
``sync_stats=True`` through :class:`adpo_train.step.StepModels` (policy through the DDP
wrapper, reference and annotators on the unwrapped module), backpropagates through
``accelerator.backward`` and saves the loss and the (all-reduced) LoRA gradients, once in
float32 and once in float64 (the test's yardstick for float32's rounding).
"""
import itertools
import os
import sys

import torch

VARIANTS = ("swap", "mixed")
DTYPES = (torch.float32, torch.float64)


def run(out_dir: str, pairs_per_process: int, variants=VARIANTS, dtypes=DTYPES) -> dict:
    """``{(variant, dtype): {loss, weights, metric, grads}}`` of this process."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    import adpo_kernels as ak
    from adpo_train.annotators import EMAAnnotators, MixedBatchAnnotators
    from adpo_train.data import PairBatchSampler, SyntheticPairDataset, collate_cached
    from adpo_train.models import add_lora, build_unet, text_shape
    from adpo_train.step import StepModels, step_inputs

    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    rank, world = acc.process_index, acc.num_processes
    cfg = ak.AdaptiveDPOConfig(beta=500.0, rho=15.0, logits_normalize=True, margin_type="quadratic",
                               sync_stats=True)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012)
    tokens, width, _ = text_shape("tiny")
    data = SyntheticPairDataset(16, (4, 16, 16), (tokens, width), seed=5)
    sampler = PairBatchSampler(len(data), pairs_per_process, seed=3, rank=rank, world=world)
    batch = collate_cached([data[i] for i in next(iter(sampler))])
    results = {}
    for variant, dtype in itertools.product(variants, dtypes):
        unet = build_unet("tiny", seed=0)
        torch.manual_seed(0)  # peft's gaussian LoRA init draws from the global generator
        named = add_lora(unet, 4)
        unet.to(dtype)  # keeps the Parameter objects: ``params`` below stays valid
        names, params = [n for n, _ in named], [p for _, p in named]
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for p in params:  # LoRA B starts at zero: make the policy differ from the reference
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        ann_cls = MixedBatchAnnotators if variant == "mixed" else EMAAnnotators
        ann = ann_cls(unet, params, names, [0.9, 0.5]) if variant == "mixed" else ann_cls(params, names, [0.9, 0.5])
        with torch.no_grad():
            for ema in ann.emas:  # annotators that differ from the policy and from each other
                for s in ema.shadow_params:
                    s.add_(0.05 * torch.randn(s.shape, generator=g))
        opt = torch.optim.SGD(params, lr=0.0)
        ddp_unet, opt = acc.prepare(unet, opt)
        models = StepModels(ddp_unet, acc.unwrap_model(ddp_unet), None, ann)
        gen = torch.Generator().manual_seed(7)
        x = step_inputs(batch, sched, gen, acc.device, dtype, rank=rank, world=world)
        out = models.loss(x, cfg, ready=True)
        acc.backward(out.loss)
        results[variant, dtype] = {"loss": out.loss.detach(), "weights": out.weights, "metric": out.metric,
                            "grads": {n: p.grad.detach().clone() for n, p in zip(names, params)}}
        acc.free_memory()
    torch.save({"results": results, "rank": rank, "world": world, "index": batch["index"]},
               os.path.join(out_dir, f"rank{rank}-of-{world}.pt"))
    return results


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]))
