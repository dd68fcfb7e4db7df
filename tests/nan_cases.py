"""NaN inputs: one rule for every backend (docs/math.md, "Non-finite inputs").

The rule is torch's, as the reference computes it: NaN propagates through arithmetic,
min / max / clamp (``min(std, 1)``, the L2-norm guard, relu) and sort (NaN last); a
comparison with NaN is false (a pair whose metric is NaN is not flipped, and a NaN flip
threshold flips nothing).  Each case puts one NaN where it reaches a different rule; every
output field and the gradient must be NaN exactly where the float64 reference's are, and
close to it elsewhere.  Native Triton ``tl.minimum`` / ``tl.maximum`` drop NaN unless asked
(``propagate_nan``); the interpreter keeps it, so on CPU the Triton run cannot see that
difference, the GPU run can (and ``tests/test_static_proofs.py`` checks the PTX).
"""
from __future__ import annotations

import torch

from adpo_kernels import AdaptiveDPOConfig

from .utils import FIELDS, assert_close, make_inputs, run_backend

_BASE = dict(beta=500.0, rho=50.0)

# name -> (config, B, K, which tensor gets the NaN: "model" / "ref" / "annot", row)
CASES = {
    # the batch L2 norm of logits_normalize is NaN: clamp_min keeps it, every metric NaN
    "norm-guard": (AdaptiveDPOConfig.paper(), 5, 2, "ref", 1),
    # one pair's metric is NaN (sorted last): finite quantile, that pair is not flipped
    "flip-nan-last": (AdaptiveDPOConfig(flip_ratio=0.3, flip_threshold=0.0, **_BASE), 10, 0, "model", 2),
    # the quantile's rank lands on the NaN: threshold NaN, nothing flips
    "flip-threshold-nan": (AdaptiveDPOConfig(flip_ratio=0.1, flip_threshold=0.0, **_BASE), 4, 0, "model", 5),
    # an annotator's logit is NaN: d = min(std, 1) must stay NaN (native min would give 1)
    "stability-min": (AdaptiveDPOConfig(margin_type="linear", **_BASE), 6, 2, "annot", 3),
    # relu of a NaN hinge argument
    "hinge-relu": (AdaptiveDPOConfig(loss_type="hinge", **_BASE), 4, 1, "ref", 6),
}


def nan_inputs(case: str, dtype=torch.float32, device="cpu"):
    cfg, B, K, where, row = CASES[case]
    model, ref, target, annots = make_inputs(B, (3, 5), dtype, K=K, seed=len(case), device=device,
                                             requires_grad=False)
    bad = {"model": model, "ref": ref, "annot": annots[0] if annots else None}[where]
    bad[row, 1, 2] = float("nan")
    return cfg, model, ref, target, annots


def check_nan_case(backend: str, case: str, device=None):
    """``backend``'s outputs and gradient have the float64 reference's NaN pattern and are
    within twice torch's own same-dtype error (+ 8 fp32 eps of the scale) elsewhere."""
    cfg, model, ref, target, annots = nan_inputs(case)
    out, grad = run_backend(backend, model, ref, target, annots, cfg, device=device)
    peer, peer_grad = run_backend("torch", model, ref, target, annots, cfg, device=device)
    d = torch.float64
    exact, exact_grad = run_backend("torch", model.to(d), ref.to(d), target.to(d), [a.to(d) for a in annots],
                                    cfg, device="cpu")
    pairs = [(f, getattr(out, f), getattr(peer, f), getattr(exact, f)) for f in FIELDS]
    pairs.append(("grad", grad, peer_grad, exact_grad))
    nan_somewhere = False
    for name, a, p, e in pairs:
        a, p, e = a.detach().double().cpu(), p.detach().double().cpu(), e.detach().double()
        nan_e = torch.isnan(e)
        nan_somewhere |= bool(nan_e.any())
        assert torch.equal(torch.isnan(p), nan_e), f"{case}/{name}: torch's own NaN pattern differs in this dtype"
        mism = torch.isnan(a) != nan_e
        if mism.any():
            idx = tuple(int(i) for i in mism.nonzero()[0])
            raise AssertionError(f"{backend} {case}/{name}: NaN pattern differs from the reference first at "
                                 f"{idx}: got {a[idx].item()}, expected {e[idx].item()}")
        fin = ~nan_e
        if fin.any():
            scale = e[fin].abs().max().item()
            peer_err = (p[fin] - e[fin]).abs().max().item()
            assert_close(a[fin], e[fin], atol=2 * peer_err + 8e-6 * scale + 1e-30, rtol=0,
                         name=f"{backend} {case}/{name} (finite part)")
    assert nan_somewhere, f"{case}: the NaN reached no output"
    return out


def check_metric_relative_precision(backend: str, K: int, device=None):
    """The metric ``1 - sigmoid(rho z)`` element by element, relative: at the default rho
    = 1e4 most pairs have ``rho |z| >> 1`` and ``m`` spans many decades; computed as
    ``1 - sigmoid`` in fp32 it would be 0 (or off by 1e-3 relative) where the float64
    value is 1e-12.  Each element must be within twice torch's own fp32 error plus the
    relative error that z's fp32 rounding implies (``rho * dz``, about 1e-4) plus 1e-5."""
    cfg = AdaptiveDPOConfig()  # rho = 1e4
    model, ref, target, annots = make_inputs(64, (40,), torch.float32, K=K, seed=31 + K, requires_grad=False)
    out, _ = run_backend(backend, model, ref, target, annots, cfg, device=device)
    peer, _ = run_backend("torch", model, ref, target, annots, cfg, device=device)
    d = torch.float64
    exact, _ = run_backend("torch", model.to(d), ref.to(d), target.to(d), [a.to(d) for a in annots], cfg, device="cpu")
    a, p, e = out.metric.double().cpu(), peer.metric.double().cpu(), exact.metric
    assert e.min() < 1e-8 and e.max() > 1e-2, f"inputs do not span the metric's range: {e.min()}..{e.max()}"
    # fp32 MSEs make z off by a few ulps of the MSEs, and dm/dz = -rho m (1 - m): a relative
    # error of m up to rho * dz, whatever the backend (torch's own error is that, by luck smaller)
    dz = 8 * 2.0 ** -23 * max(exact.model_mse.abs().max().item(), exact.ref_mse.abs().max().item())
    bad = (a - e).abs() > 2 * (p - e).abs() + (1e-5 + cfg.rho * dz) * e.abs()
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(f"{backend} K={K}: metric[{i}] = {a[i].item():.6g}, float64 {e[i].item():.6g}, "
                             f"torch fp32 {p[i].item():.6g} ({int(bad.sum())} of {bad.numel()} pairs off)")
