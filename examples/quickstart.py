"""Use the fused Adaptive-DPO loss in your own diffusion training step.

    python examples/quickstart.py

A toy stand-in for a UNet predicts the noise of a paired batch; two EMA copies act as
annotators.  Prints the loss and per-pair diagnostics for a few steps.
"""
import copy

import torch

import adpo_kernels as ak

torch.manual_seed(0)
B, C, H, W = 4, 4, 16, 16  # 4 preference pairs of 4x16x16 latents
net = torch.nn.Sequential(torch.nn.Conv2d(C, 32, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(32, C, 3, padding=1))
ref_net = copy.deepcopy(net).requires_grad_(False)
emas = [copy.deepcopy(net).requires_grad_(False) for _ in (0.9999, 0.5)]
opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
loss_fn = ak.AdaptiveDPOLoss(ak.AdaptiveDPOConfig.paper())

x_w, x_l = torch.randn(B, C, H, W), torch.randn(B, C, H, W)
for step in range(5):
    noise = torch.randn(B, C, H, W)  # shared by winner and loser: pass (B, ...) as target
    noisy = torch.cat([x_w, x_l]) * 0.8 + noise.repeat(2, 1, 1, 1) * 0.6
    with torch.no_grad():
        ref_pred = ref_net(noisy)
        annotators = [e(noisy) for e in emas]
    out = loss_fn(net(noisy), ref_pred, noise, annotators, annotators_ready=step >= 2)
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    with torch.no_grad():
        for e, decay in zip(emas, (0.9999, 0.5)):
            for pe, p in zip(e.parameters(), net.parameters()):
                pe.lerp_(p, 1 - decay)
    print(f"step {step}: loss {out.loss.item():.4f}  acc {out.implicit_acc.item():.2f}  "
          f"metric {[round(v, 3) for v in out.metric.tolist()]}  weights {[round(v, 3) for v in out.weights.tolist()]}")
print("backends:", {k: ("usable" if not v else v[0]) for k, v in ak.available_backends().items()})
