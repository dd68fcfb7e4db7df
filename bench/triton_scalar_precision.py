"""The Triton scalar stage's precision (issue 22): it runs in float32, the C++ and CUDA ones in float64.

``python -m bench.triton_scalar_precision`` (CPU: the Triton interpreter) feeds the same float32 MSEs
(2 + K, 2, B), with per-pair differences of 1e-7 .. 1e-4 (small |z|, where a difference of two
nearly equal MSEs is everything), to ``adpo::triton_pairs`` and to ``adpo::cpu_pairs`` in float64 for
every configuration of the test grid, and prints the worst error of each output relative to that
output's largest magnitude.  docs/csrc.md quotes the result.
"""
from __future__ import annotations

import math
import os


def measure(trials: int = 3, B: int = 16, K: int = 2, seed: int = 0) -> dict:
    import torch

    import adpo_kernels.triton  # noqa: F401 - registers the triton ops
    from adpo_kernels.dispatch import BACKENDS
    from tests.utils import config_grid

    BACKENDS["cpu"].unavailable()  # loads the C++ ops
    names = ("loss", "logits", "metric", "weights", "margin", "implicit_acc", "grad_coef")
    worst = {n: (0.0, "", 0.0) for n in names}
    g = torch.Generator().manual_seed(seed)
    for scale in (1e-7, 1e-6, 1e-5, 1e-4):
        for name, cfg, ready in config_grid():
            for _ in range(trials):
                base = 0.5 + torch.rand(2 + K, 1, B, generator=g, dtype=torch.float64)
                mse = (base + scale * torch.randn(2 + K, 2, B, generator=g, dtype=torch.float64)).float()
                mp = torch.randn(2 * B, 4, generator=g)
                f, i = cfg.op_params(ready)
                tri = torch.ops.adpo.triton_pairs(mse, mp, mp, 0, B, f, i)
                exact = torch.ops.adpo.cpu_pairs(mse.double(), mp.double(), mp.double(), 0, B, f, i)
                for k, n in enumerate(names):
                    a, e = tri[k].double(), exact[k].double()
                    den = e.abs().max().item()
                    if den == 0 or not math.isfinite(den):
                        continue
                    err = (a - e).abs().max().item() / den
                    if err > worst[n][0]:
                        worst[n] = (err, name, scale)
    return worst


def main() -> int:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    for n, (err, cfg, scale) in measure().items():
        print(f"{n:12s} worst error / max|exact| = {err:.3g}" + (f"  ({cfg}, MSE differences ~{scale:g})" if cfg else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
