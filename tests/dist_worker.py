"""Run under torchrun (2 processes, gloo): each rank computes the loss on its share of
one global batch with sync_stats=True and saves what it got for the test to compare."""
import os
import sys

import torch
import torch.distributed as dist

import adpo_kernels as ak
from adpo_kernels import AdaptiveDPOConfig

from tests.utils import make_inputs

CONFIGS = {
    "lognorm-quad": AdaptiveDPOConfig(beta=500.0, rho=50.0, logits_normalize=True, margin_type="quadratic"),
    "all-opts": AdaptiveDPOConfig(beta=500.0, rho=50.0, logits_normalize=True, std_standardize=True,
                                  weight_normalize=True, margin_type="linear"),
    "flip": AdaptiveDPOConfig(beta=500.0, rho=50.0, flip_ratio=0.3, flip_threshold=0.0, margin_type="linear"),
    "ipo": AdaptiveDPOConfig(beta=500.0, rho=50.0, loss_type="ipo", margin_type="quadratic"),
}


def local_slice(x, lo, hi, B):
    return torch.cat([x[lo:hi], x[B + lo:B + hi]])


def main(out_dir, splits):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    splits = [int(s) for s in splits.split(",")]
    B = sum(splits)
    lo = sum(splits[:rank])
    hi = lo + splits[rank]
    backends = [b for b in ("torch", "cpu") if not ak.available_backends()[b]]
    results = {}
    for name, cfg in CONFIGS.items():
        cfg = cfg.replace(sync_stats=True)
        for backend in backends:
            model, ref, target, annots = make_inputs(B, (3, 8, 8), torch.float32, K=2, seed=42)
            m = local_slice(model.detach(), lo, hi, B).requires_grad_(True)
            out = ak.adaptive_dpo_loss(m, local_slice(ref, lo, hi, B), target[lo:hi],
                                       [local_slice(a, lo, hi, B) for a in annots], config=cfg, backend=backend)
            out.loss.backward()
            results[(name, backend)] = dict(loss=out.loss.detach(), metric=out.metric, weights=out.weights,
                                           margin=out.margin, grad=m.grad)
    torch.save(dict(results=results, lo=lo, hi=hi, backends=backends), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
