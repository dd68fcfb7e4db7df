"""Shared test helpers: input factories and a verbose allclose."""
from __future__ import annotations

import itertools

import torch

from adpo_kernels import AdaptiveDPOConfig

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Machine epsilon-ish scale of each dtype, for dtype-aware tolerances.
EPS = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def make_inputs(B, S, dtype=torch.float32, K=0, shared_target=True, seed=0, device="cpu",
                requires_grad=True, scale=0.05):
    """Fresh random predictions near a target (like a trained denoiser), never zeros.

    The policy, reference and annotators are the target plus small independent noise,
    so that pair logits are O(scale^2) like real ones and the metric is non-trivial.
    """
    g = torch.Generator().manual_seed(seed)
    shape = (2 * B,) + tuple(S)
    tshape = ((B,) if shared_target else (2 * B,)) + tuple(S)
    target = torch.randn(tshape, generator=g, dtype=torch.float64)
    full_t = target.repeat((2,) + (1,) * len(S)) if shared_target else target

    def near():
        return full_t + scale * torch.randn(shape, generator=g, dtype=torch.float64) * (
            1 + torch.rand((2 * B,) + (1,) * len(S), generator=g, dtype=torch.float64))

    model = near().to(dtype).to(device).requires_grad_(requires_grad)
    ref = near().to(dtype).to(device)
    annots = [near().to(dtype).to(device) for _ in range(K)]
    return model, ref, target.to(dtype).to(device), annots


def assert_close(actual, expected, atol, rtol, name="tensor"):
    """allclose that names the first mismatching index and the worst error."""
    actual = torch.as_tensor(actual).detach().double().cpu()
    expected = torch.as_tensor(expected).detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    both_nan = torch.isnan(actual) & torch.isnan(expected)
    err = (actual - expected).abs()
    bad = ~((err <= atol + rtol * expected.abs()) | both_nan)
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        worst = int(torch.where(both_nan, 0, err).flatten().argmax())
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements differ; first at {idx}: "
            f"actual {actual[idx].item():.9g} vs expected {expected[idx].item():.9g}; "
            f"max abs err {err.flatten()[worst].item():.3g} at flat index {worst} (atol {atol}, rtol {rtol})")


def config_grid():
    """The option combinations every backend is tested on (name, config, annotators_ready)."""
    base = dict(beta=500.0, rho=50.0)
    out = [("dpo", AdaptiveDPOConfig.dpo(500.0), True),
           ("paper", AdaptiveDPOConfig.paper(), True),
           ("warmup", AdaptiveDPOConfig(margin_type="linear", **base), False)]
    for wt, mt in itertools.product(("linear", "quadratic", "sqrt", "exp"), (None, "linear", "quadratic")):
        out.append((f"sigmoid-{wt}-{mt}", AdaptiveDPOConfig(weight_type=wt, margin_type=mt, **base), True))
    for lt, mt in itertools.product(("ipo",), (None, "linear", "quadratic")):
        out.append((f"ipo-{mt}", AdaptiveDPOConfig(loss_type=lt, margin_type=mt, **base), True))
    for lt in ("hinge", "robust", "conservative"):
        out.append((lt, AdaptiveDPOConfig(loss_type=lt, label_smoothing=0.1, **base), True))
    out += [
        ("lognorm", AdaptiveDPOConfig(logits_normalize=True, margin_type="quadratic", **base), True),
        ("stdstd", AdaptiveDPOConfig(std_standardize=True, **base), True),
        ("wnorm", AdaptiveDPOConfig(weight_normalize=True, **base), True),
        ("all-opts", AdaptiveDPOConfig(logits_normalize=True, std_standardize=True, weight_normalize=True,
                                       margin_type="linear", **base), True),
        ("flip", AdaptiveDPOConfig(flip_ratio=0.3, flip_threshold=0.0, margin_type="linear", **base), True),
        ("flip-ipo", AdaptiveDPOConfig(loss_type="ipo", flip_ratio=0.3, flip_threshold=0.0, margin_type="quadratic",
                                       **base), True),
    ]
    return out


FIELDS = ("loss", "logits", "metric", "weights", "margin", "implicit_acc", "model_mse", "ref_mse")


def run_backend(backend, model, ref, target, annots, cfg, ready=True, device=None):
    """Outputs and d loss / d model_pred of one public call (inputs moved to ``device`` if given)."""
    from adpo_kernels import adaptive_dpo_loss

    mv = (lambda x: x.detach().to(device)) if device is not None else (lambda x: x.detach())  # noqa: E731
    m = mv(model).clone().requires_grad_(True)
    out = adaptive_dpo_loss(m, mv(ref), mv(target), [mv(a) for a in annots], cfg, ready, backend=backend)
    out.loss.backward()
    return out, m.grad


def check_vs_reference(backend, model, ref, target, annots, cfg, ready=True, what="", device=None):
    """A fused backend is at most twice as far from the float64 oracle as torch in the same
    dtype is, plus 8 accumulation-dtype eps of the quantity's scale; outputs and gradient."""
    out, grad = run_backend(backend, model, ref, target, annots, cfg, ready, device)
    peer, peer_grad = run_backend("torch", model, ref, target, annots, cfg, ready, device)
    d = torch.float64
    exact, exact_grad = run_backend("torch", model.to(d), ref.to(d), target.to(d), [a.to(d) for a in annots],
                                    cfg, ready, device="cpu")
    acc_eps = 1e-13 if model.dtype == torch.float64 else 1e-6
    want_device = torch.device(device) if device is not None else model.device
    for f in FIELDS:
        a, p, e = getattr(out, f), getattr(peer, f), getattr(exact, f)
        assert a.device.type == want_device.type and a.dtype == p.dtype, \
            f"{what}{f}: {a.dtype} on {a.device}, torch gives {p.dtype}"
        scale = e.double().abs().max().item()
        peer_err = (p.double().cpu() - e.double()).abs().max().item()
        assert_close(a, e, atol=2 * peer_err + 8 * acc_eps * max(scale, 1e-30), rtol=0, name=what + f)
    assert grad.dtype == model.dtype and grad.shape == model.shape
    scale = exact_grad.abs().max().item()
    peer_err = (peer_grad.double().cpu() - exact_grad).abs().max().item()
    assert_close(grad, exact_grad, atol=2 * peer_err + 8 * acc_eps * scale, rtol=0, name=what + "grad")
    return out, grad
