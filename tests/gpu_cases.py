"""GPU checks shared by the CUDA and Triton suites (they skip without a GPU).

Each is written to fail when the kernels are wrong, not merely to run: the side stream
really delays the inputs, misaligned views really are misaligned, the big case really
crosses 2^31 elements.  The parts that need no GPU (the misaligned-view construction, the
tolerance rule) are exercised on CPU by tests/test_cpu_kernels.py.
"""
from __future__ import annotations

import pytest
import torch

from adpo_kernels import AdaptiveDPOConfig, adaptive_dpo_loss

from .utils import FIELDS, assert_close, make_inputs, run_backend

FP32_EPS = 2.0 ** -23


def misaligned(x: torch.Tensor, device) -> torch.Tensor:
    """A contiguous copy of ``x`` on ``device`` whose data pointer is one element past a
    16-byte boundary (so ``.contiguous()`` keeps it and the 16-byte vector paths cannot run)."""
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=device)
    v = buf[1:].view(x.shape)
    v.copy_(x.detach())
    assert v.is_contiguous() and v.data_ptr() % 16 != 0
    return v


def assert_grad_close(t, s, d, dtype, what):
    """The fused gradient ``t`` against the float64 one ``d`` (``s``: torch in ``dtype``).

    1. Norm-wise, like every other output: within twice torch's error plus 8 fp32 ulps of
       the largest element, plus one ulp of ``dtype`` relative (the fused value may round
       to the other neighbour).
    2. Element by element: ``grad[r, n] = g_r (+-2/N) (x - t)`` shares the coefficient
       ``g_r`` along a row, so every element's relative error must equal its row's common
       (median) relative error up to its own rounding, one ulp of ``dtype`` and 16 fp32
       ulps.  A bound on the largest element alone would let the small ones be anything.
    """
    t, s, d = t.double().cpu(), s.double().cpu(), d.double().cpu()
    scale = d.abs().max().item()
    atol = 2 * (s - d).abs().max().item() + 8 * FP32_EPS * scale + 1e-300
    assert_close(t, d, atol=atol, rtol=torch.finfo(dtype).eps, name=what + " (norm-wise)")
    t2, d2 = t.reshape(t.shape[0], -1), d.reshape(d.shape[0], -1)
    assert torch.equal(t2[d2 == 0], d2[d2 == 0]), f"{what}: non-zero where the exact gradient is 0"
    zero = d2.abs() < torch.finfo(dtype).tiny  # 0 and subnormals (fp16): the norm-wise rule covers them
    rel = torch.where(zero, 0.0, (t2 - d2) / torch.where(zero, 1.0, d2))
    for r in range(t2.shape[0]):
        nz = ~zero[r]
        if not nz.any():
            continue
        common = rel[r, nz].median()
        dev = (rel[r] - common).abs().masked_fill(zero[r], 0.0)
        tol = torch.finfo(dtype).eps + 16 * FP32_EPS
        if dev.max() > tol:
            n = int(dev.argmax())
            raise AssertionError(f"{what}: grad[{r}, {n}] = {t2[r, n].item():.9g} vs {d2[r, n].item():.9g}: relative "
                                 f"error {rel[r, n].item():.3g}, its row's is {common.item():.3g} (tol {tol:.3g})")


def check_fused(backend, out, grad, model, ref, target, annots, cfg, what=""):
    """The fused ``out`` / ``grad`` (computed by the caller on any device) against the
    float64 reference: outputs within twice torch's same-dtype error + 8 fp32 eps of the
    scale, the gradient by :func:`assert_grad_close`."""
    cpu = lambda x: x.detach().cpu()  # noqa: E731
    model, ref, target, annots = cpu(model), cpu(ref), cpu(target), [cpu(a) for a in annots]
    peer, peer_grad = run_backend("torch", model, ref, target, annots, cfg)
    d = torch.float64
    exact, exact_grad = run_backend("torch", model.to(d), ref.to(d), target.to(d), [a.to(d) for a in annots], cfg)
    for f in FIELDS:
        a, p, e = getattr(out, f).double().cpu(), getattr(peer, f).double(), getattr(exact, f)
        atol = 2 * (p - e).abs().max().item() + 8 * FP32_EPS * e.abs().max().item() + 1e-30
        assert_close(a, e, atol=atol, rtol=0, name=f"{backend} {what}{f}")
    assert_grad_close(grad, peer_grad, exact_grad, model.dtype, f"{backend} {what}grad")


def run_misaligned(backend, dtype, device, K=2, S=(3, 40)):
    """Every input a misaligned view (N = 120 is a multiple of 8, so only the pointers stop
    the vector paths); outputs and gradient checked against the reference."""
    cfg = AdaptiveDPOConfig.paper(flip_ratio=0.3, flip_threshold=0.0)
    model, ref, target, annots = make_inputs(5, S, dtype, K=K, shared_target=True, seed=23, requires_grad=False)
    m = misaligned(model, device).detach().requires_grad_(True)
    assert m.data_ptr() % 16 != 0
    out = adaptive_dpo_loss(m, misaligned(ref, device), misaligned(target, device),
                            [misaligned(a, device) for a in annots], cfg, backend=backend)
    out.loss.backward()
    check_fused(backend, out, m.grad, model, ref, target, annots, cfg, what=f"misaligned {dtype}: ")


def side_stream_waits(backend):
    """The op (forward and backward) runs on the caller's current stream: on a side stream
    whose input is written only after ``torch.cuda._sleep``, a launch on any other stream
    reads the NaN that the buffer holds before the sleep (the default stream is idle, so it
    would run at once)."""
    cfg = AdaptiveDPOConfig.paper()
    model, ref, target, annots = make_inputs(4, (8, 12), torch.bfloat16, K=1, shared_target=False, seed=6)
    dev = lambda x: x.detach().cuda()  # noqa: E731
    base, base_grad = run_backend(backend, model, ref, target, annots, cfg, device="cuda")
    src, r, t, a = dev(model), dev(ref), dev(target), [dev(x) for x in annots]
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        # contiguous, so the op reads this very buffer (a non-contiguous input would be copied
        # by torch on s first, and a wrong-stream kernel would read the copy's stale memory)
        buf = torch.full_like(src, float("nan"))
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU clock cycles on s
        buf.copy_(src)
        m = buf.detach().requires_grad_(True)
        out = adaptive_dpo_loss(m, r, t, a, cfg, backend=backend)
        out.loss.backward()
    torch.cuda.synchronize()
    assert torch.isfinite(out.loss), f"{backend}: the op read its input before the stream's pending copy"
    assert torch.equal(out.loss, base.loss), f"{backend}: loss {out.loss.item()} != {base.loss.item()}"
    assert torch.equal(m.grad, base_grad), f"{backend}: gradient differs from the default-stream run"


def check_64bit_offsets(backend, N):
    """More than 2^31 elements per tensor (2 rows of N > 2^30): rows beyond int32 offsets.
    N % 16 == 0 takes the vector paths, N odd the scalar ones."""
    need = 36 << 30  # bf16 model, ref, grad (4 GiB each), target, creation and float64 check temporaries
    free = torch.cuda.mem_get_info()[0]
    if free < need:
        pytest.skip(f"needs {need >> 30} GiB of free GPU memory, {free >> 30} GiB free")
    assert 2 * N > 2 ** 31
    check_long_rows(backend, N, "cuda", step=2 ** 28)


def check_long_rows(backend, N, device, step):
    """One pair of bf16 rows of N elements (``check_64bit_offsets`` with N > 2^30 on a GPU;
    small N on the CPU checks this function's own arithmetic): both MSEs against float64
    sums over slices of ``step`` elements (no full-size float64 copies), and the first and
    last 1000 gradient elements of both rows against the closed form of spec section 8."""
    B = 1
    g = torch.Generator(device=device).manual_seed(0)
    target = torch.randn(B, N, device=device, generator=g, dtype=torch.bfloat16)
    model = target.repeat(2, 1)
    model += 0.05 * torch.randn(2 * B, N, device=device, generator=g, dtype=torch.bfloat16)
    model.requires_grad_(True)
    ref = target.repeat(2, 1)
    ref += 0.05 * torch.randn(2 * B, N, device=device, generator=g, dtype=torch.bfloat16)
    out = adaptive_dpo_loss(model, ref, target, config=AdaptiveDPOConfig.dpo(100.0), backend=backend)
    out.loss.backward()
    for name, x in (("model", model.detach()), ("ref", ref)):
        exp = torch.stack([sum(((x[r, s:s + step].double() - target[0, s:s + step].double()) ** 2).sum()
                               for s in range(0, N, step)) / N for r in range(2 * B)])
        got = out.model_mse if name == "model" else out.ref_mse
        assert_close(got, exp, 0.0, 1e-4, f"{backend} N={N} {name}_mse")  # fp32 partial sums
    z = (out.ref_mse[0] - out.ref_mse[1]) - (out.model_mse[0] - out.model_mse[1])
    g0 = -100.0 * torch.sigmoid(-100.0 * z)  # d loss / d z for B = 1
    m = model.detach()
    for row, sign in ((0, -1.0), (1, 1.0)):  # the last row starts past 2^31 bytes, ends past 2^31 elements
        for sl in (slice(0, 1000), slice(N - 1000, N)):
            exp_g = g0 * (sign * 2.0 / N) * (m[row, sl].double() - target[0, sl].double())
            assert_close(model.grad[row, sl], exp_g, 1e-30, 2 ** -7, f"{backend} N={N} grad[{row}, {sl}]")
