"""Worker of tests/test_train_scale_ddp.py (no tests here).

Under ``torchrun --nproc_per_node 2`` (accelerate DDP over gloo) or in-process (one process),
builds the tiny LoRA UNet with two EMA annotators that differ from the policy, takes this
process's share of one global batch of synthetic pairs through the trainer's own sampler and
``step_inputs`` (global noise stream), computes the Adaptive-DPO loss with
``sync_stats=True`` through :class:`adpo_train.step.StepModels` (policy through the DDP
wrapper, reference and annotators on the unwrapped module), backpropagates through
``accelerator.backward`` and saves the loss and the (all-reduced) LoRA gradients, once in
float32 and once in float64 (the test's yardstick for float32's rounding).

The FSDP variants (``--distributed fsdp``; two processes only) shard the UNet with the
trainer's own :func:`adpo_train.fsdp.shard_unet` and EMA annotators over the local shards,
for LoRA (``fsdp-lora``, compared with one process's ``swap``) and for a full fine-tune with a
sharded frozen reference (``fsdp-full``, compared with one process's ``full``).  Every variant
then takes one AdamW step; gradients and updated parameters are saved gathered (whole).
"""
import itertools
import os
import sys

import torch

VARIANTS = ("swap", "mixed")
SINGLE_VARIANTS = VARIANTS + ("full",)  # one process
MULTI_VARIANTS = VARIANTS + ("fsdp-lora", "fsdp-full")  # two processes
SAME_AS = {"fsdp-lora": "swap", "fsdp-full": "full"}  # what each FSDP variant must equal
DTYPES = (torch.float32, torch.float64)


def run(out_dir: str, pairs_per_process: int, variants=None, dtypes=DTYPES) -> dict:
    """``{(variant, dtype): {loss, weights, metric, grads, params}}`` of this process."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    import adpo_kernels as ak
    from adpo_train.data import PairBatchSampler, SyntheticPairDataset, collate_cached
    from adpo_train.models import text_shape
    from adpo_train.step import step_inputs

    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    rank, world = acc.process_index, acc.num_processes
    variants = variants or (MULTI_VARIANTS if world > 1 else SINGLE_VARIANTS)
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
        models, names, params, opt = _build(variant, dtype, acc)
        gen = torch.Generator().manual_seed(7)
        x = step_inputs(batch, sched, gen, acc.device, dtype, rank=rank, world=world)
        out = models.loss(x, cfg, ready=True)
        acc.backward(out.loss)
        grads = {n: _whole(p.grad).detach().clone() for n, p in zip(names, params)}
        opt.step()
        results[variant, dtype] = {"loss": out.loss.detach(), "weights": out.weights, "metric": out.metric,
                                   "grads": grads, "params": {n: _whole(p).detach().clone()
                                                              for n, p in zip(names, params)}}
        acc.free_memory()
    torch.save({"results": results, "rank": rank, "world": world, "index": batch["index"]},
               os.path.join(out_dir, f"rank{rank}-of-{world}.pt"))
    return results


def _whole(t):
    from adpo_train import fsdp

    return fsdp.full_tensor(t)


def _build(variant: str, dtype, acc):
    """``(StepModels, names, trained parameters, optimizer)`` of one variant: the tiny UNet, trained
    parameters that differ from the reference, two EMA annotators that differ from both."""
    import copy

    from adpo_train import fsdp
    from adpo_train.annotators import EMAAnnotators, MixedBatchAnnotators
    from adpo_train.models import add_lora, build_unet
    from adpo_train.step import StepModels

    full = variant in ("full", "fsdp-full")
    unet = build_unet("tiny", seed=0)
    g = torch.Generator().manual_seed(11)
    reference = None
    if full:
        unet.to(dtype)
        reference = copy.deepcopy(unet).requires_grad_(False).eval()
        names = [n for n, _ in unet.named_parameters()]
    else:
        torch.manual_seed(0)  # peft's gaussian LoRA init draws from the global generator
        names = [n for n, _ in add_lora(unet, 4)]
        unet.to(dtype)  # keeps the Parameter objects
    with torch.no_grad():  # LoRA B starts at zero, a copy equals its reference: make the policy differ
        by_name = dict(unet.named_parameters())
        for n in names:
            by_name[n].add_((0.05 if not full else 0.01) * torch.randn(by_name[n].shape, generator=g, dtype=dtype))
    if variant.startswith("fsdp"):
        mesh = fsdp.device_mesh(acc.device)
        policy = fsdp.mixed_precision_policy("no")
        fsdp.shard_unet(unet, mesh, policy)
        if reference is not None:
            fsdp.shard_unet(reference, mesh, policy)
    by_name = dict(unet.named_parameters())
    params = [by_name[n] for n in names]
    if variant == "mixed":
        ann = MixedBatchAnnotators(unet, params, names, [0.9, 0.5])
    else:
        swap_done = (lambda: fsdp.reshard(unet)) if variant.startswith("fsdp") else None
        ann = EMAAnnotators(params, names, [0.9, 0.5], after_swap=swap_done)
    with torch.no_grad():
        for ema in ann.emas:  # annotators that differ from the policy and from each other (whole-tensor noise,
            for s, p in zip(ema.shadow_params, params):  # this rank's part of it under FSDP)
                noise = 0.05 * torch.randn(p.shape, generator=g, dtype=dtype)
                s.add_(fsdp.local(_distribute(noise, p)))
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    if variant.startswith("fsdp"):  # sharded already; accelerate would wrap it in DDP
        return StepModels(unet, unet, reference, ann), names, params, opt
    wrapped, opt = acc.prepare(unet, opt)
    return StepModels(wrapped, acc.unwrap_model(wrapped), reference, ann), names, params, opt


def _distribute(t, like):
    """``t`` laid out like parameter ``like`` (sharded like it under FSDP, else ``t`` itself)."""
    from adpo_train import fsdp

    if not fsdp.is_dtensor(like):
        return t
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t, like.device_mesh, like.placements)


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]))
