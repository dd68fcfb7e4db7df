"""CI wheel leg (.ci/wheel.sh): the fused loss of an installed adpo_kernels on the cpu backend.

Checks where the C++ kernels came from (``--expect``), that the loss, logits and gradient
match the float64 reference as well as torch's own computation in the same dtype does
(the rule of tests/utils.py: error <= 2x torch's + 8 accumulation-dtype eps of the
quantity's scale), and saves the outputs (``--out``) so that two
environments' kernels can be compared bit for bit.
"""
import argparse
import json
import time

t0 = time.monotonic()
import torch  # noqa: E402

import adpo_kernels as ak  # noqa: E402
from adpo_kernels import AdaptiveDPOConfig, adaptive_dpo_loss  # noqa: E402

EPS = {torch.float64: 1e-13, torch.float32: 1e-6, torch.bfloat16: 1e-6}  # of the accumulation dtype


def inputs(dtype, B=3, N=4099, K=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(B, N, generator=g, dtype=torch.float64)
    near = lambda: target.repeat(2, 1) + 0.05 * torch.randn(2 * B, N, generator=g, dtype=torch.float64)  # noqa: E731
    return near(), near(), target, [near() for _ in range(K)]


def run(backend, dtype, m, r, t, a, cfg):
    x = m.to(dtype).requires_grad_()
    out = adaptive_dpo_loss(x, r.to(dtype), t.to(dtype), [y.to(dtype) for y in a], cfg, backend=backend)
    out.loss.backward()
    return {"loss": out.loss.detach(), "logits": out.logits, "grad": x.grad}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--expect", required=True, help="comma-separated allowed origins of the cpu backend")
    p.add_argument("--out")
    args = p.parse_args()
    cfg = AdaptiveDPOConfig.paper()
    saved = {}
    for dtype in EPS:
        m, r, t, a = inputs(dtype)
        fused, same, truth = run("cpu", dtype, m, r, t, a, cfg), run("torch", dtype, m, r, t, a, cfg), \
            run("torch", torch.float64, m, r, t, a, cfg)
        for k in fused:
            err = (fused[k].double() - truth[k]).abs().max().item()
            err_torch = (same[k].double() - truth[k]).abs().max().item()
            bound = 2 * err_torch + 8 * EPS[dtype] * truth[k].abs().max().item()
            assert err <= bound, f"{dtype} {k}: error {err:.3g} > {bound:.3g} (torch's own {err_torch:.3g})"
        saved[str(dtype)] = fused
    cpu = ak.available_backends(detail=True)["cpu"]
    assert cpu["origin"] in args.expect.split(","), cpu
    isa = ak._C.cpu_isa()
    if args.out:
        torch.save({"isa": isa, "outputs": saved}, args.out)
    print(json.dumps({"origin": cpu["origin"], "isa": isa, "seconds": round(time.monotonic() - t0, 1),
                      "module": ak._C.__file__, "how": cpu["how"]}))


if __name__ == "__main__":
    main()
