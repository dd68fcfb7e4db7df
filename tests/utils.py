"""Shared test helpers: input factories and a verbose allclose."""
from __future__ import annotations

import itertools

import torch

from adpo_kernels import AdaptiveDPOConfig

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Machine epsilon of each dtype (the spacing of floats just above 1), for dtype-aware tolerances.
EPS = {d: torch.finfo(d).eps for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16)}
# Accumulation noise allowed on top of twice torch's error, in ulps of the accumulation dtype
# (fp32; fp64 for fp64 inputs) times the quantity's magnitude.
ACC_ULPS = 16


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


def check_close_to_exact(actual, peer, exact, acc_dtype, name="tensor", sensitivity=None):
    """``actual`` is at most twice as far from the float64 ``exact`` as torch's ``peer`` in the same
    dtype, both per element and in norm (the flash-attention rule), plus accumulation noise.

    Per element: ``|a - e| <= 2 |p - e| + ulp(dtype) |e| + atol``; the ulp term lets a value rounded
    to its dtype (a bf16 gradient) land on the other neighbour than torch's, so no element may
    be far off however small it is relative to the largest.  Norm-wise:
    ``||a - e|| <= 2 ||p - e|| + sqrt(n) atol``, which bounds the error of the bulk.
    ``atol = ACC_ULPS * max(eps_acc max|e|, max sensitivity)``: ``sensitivity`` is how far the
    float64 result moves when every row's MSE moves by about one accumulation ulp (measured by
    :func:`check_vs_reference`); it is what a different summation order may cost where the
    quantity is a difference of larger ones (logits and margins: beta times a difference of MSEs).
    """
    a, p, e = (torch.as_tensor(x).detach().double().cpu() for x in (actual, peer, exact))
    eps_acc = torch.finfo(acc_dtype).eps
    ulp = torch.finfo(actual.dtype).eps if actual.dtype.is_floating_point else 0.0
    finite = torch.isfinite(e)
    scale = e[finite].abs().max().item() if finite.any() else 0.0
    sens = 0.0 if sensitivity is None else torch.nan_to_num(sensitivity.double().cpu(), 0.0, 0.0, 0.0).max().item()
    atol = ACC_ULPS * max(eps_acc * scale, sens, 1e-300)
    bound = 2 * (p - e).abs() + ulp * e.abs() + atol
    err = (a - e).abs()
    bad = ~((err <= bound) | (torch.isnan(a) & torch.isnan(e)))
    if bad.any():
        i = tuple(int(k) for k in bad.nonzero()[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements further from float64 than 2x torch's error; first at "
            f"{i}: actual {a[i].item():.9g}, torch {p[i].item():.9g}, exact {e[i].item():.9g} (allowed {bound[i].item():.3g})")
    ae, pe = (torch.linalg.vector_norm(torch.where(finite, x - e, 0.0)).item() for x in (a, p))
    norm_bound = 2 * pe + atol * max(int(finite.sum()), 1) ** 0.5
    assert ae <= norm_bound, f"{name}: norm of the error {ae:.3g} > {norm_bound:.3g} (torch's: {pe:.3g})"


def _rows_one_ulp_apart(pred, target, eps, g):
    """``pred`` (float64, ``(2B, ...)``) whose every row's residual ``pred - target`` is scaled by
    ``1 + eps u`` (``u`` uniform in [-1, 1] per row): every row's MSE moves by about one ulp."""
    t = target if target.shape[0] == pred.shape[0] else target.repeat((2,) + (1,) * (target.dim() - 1))
    u = 2 * torch.rand((pred.shape[0],) + (1,) * (pred.dim() - 1), generator=g, dtype=torch.float64) - 1
    return t + (pred - t) * (1 + eps * u)


def check_vs_reference(backend, model, ref, target, annots, cfg, ready=True, what="", device=None):
    """A fused backend against the float64 oracle, outputs and gradient, by
    :func:`check_close_to_exact` (at most twice torch's error in the same dtype)."""
    out, grad = run_backend(backend, model, ref, target, annots, cfg, ready, device)
    peer, peer_grad = run_backend("torch", model, ref, target, annots, cfg, ready, device)
    d = torch.float64
    inputs64 = [model.detach().to(d).cpu(), ref.to(d).cpu(), target.to(d).cpu(), [a.to(d).cpu() for a in annots]]
    exact, exact_grad = run_backend("torch", *inputs64, cfg, ready)
    acc = torch.float64 if model.dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(0)
    m64, r64, t64, a64 = inputs64
    moved = [_rows_one_ulp_apart(x, t64, torch.finfo(acc).eps, g) for x in [m64, r64, *a64]]
    moved = moved[:2] + [t64, moved[2:]]
    near, near_grad = run_backend("torch", *moved, cfg, ready)
    want_device = torch.device(device) if device is not None else model.device
    for f in FIELDS:
        a, p, e = getattr(out, f), getattr(peer, f), getattr(exact, f)
        assert a.device.type == want_device.type and a.dtype == p.dtype, \
            f"{what}{f}: {a.dtype} on {a.device}, torch gives {p.dtype}"
        check_close_to_exact(a, p, e, acc, name=what + f, sensitivity=(getattr(near, f) - e).abs())
    assert grad.dtype == model.dtype and grad.shape == model.shape
    check_close_to_exact(grad, peer_grad, exact_grad, acc, name=what + "grad", sensitivity=(near_grad - exact_grad).abs())
    return out, grad
