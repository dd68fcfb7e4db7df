"""The CUDA kernels (csrc/cuda, backend "cuda") against the float64 torch reference.

They run only on a GPU machine; elsewhere every test here skips with the reason (the
CUDA sources are still compiled and linked by CI: see tests/test_build.py).
"""
from __future__ import annotations

import pytest
import torch

from adpo_kernels import AdaptiveDPOConfig, adaptive_dpo_loss, dispatch
from tests import utils
from tests.utils import FIELDS, config_grid, make_inputs

REASONS = dispatch.BACKENDS["cuda"].unavailable()
pytestmark = pytest.mark.skipif(bool(REASONS), reason=f"CUDA backend not usable here: {'; '.join(REASONS)}")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GRID = config_grid()
CHUNK_FP32 = 256 * 8 * 4  # csrc/cuda/kernels.h: MSE_THREADS * MSE_ITERS * 16 bytes / 4 bytes


def run(backend, model, ref, target, annots, cfg, ready=True, device="cuda"):
    return utils.run_backend(backend, model, ref, target, annots, cfg, ready, device)


def check_vs_reference(model, ref, target, annots, cfg, ready=True, what=""):
    return utils.check_vs_reference("cuda", model, ref, target, annots, cfg, ready, what, device="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("idx", range(len(GRID)), ids=[g[0] for g in GRID])
def test_grid_matches_reference(idx, dtype):
    name, cfg, ready = GRID[idx]
    K = 0 if name == "dpo" else 1 + idx % 3
    model, ref, target, annots = make_inputs(6, (4, 16, 16), dtype, K=K, shared_target=idx % 2 == 0, seed=idx)
    check_vs_reference(model, ref, target, annots, cfg, ready, what=f"{name}/{dtype}: ")


SHAPES = {
    "B1": (1, (4, 8)),
    "odd-N (scalar path)": (3, (3, 5, 7)),
    "N1": (2, (1,)),
    "chunks+tail": (2, (2 * CHUNK_FP32 + 40,)),
    "big-batch": (700, (4, 8)),   # B > the scalar stage's 512 threads, flip over 700 pairs
    "sdxl-ish": (4, (4, 64, 64)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_awkward_shapes(shape, dtype):
    B, S = SHAPES[shape]
    cfg = AdaptiveDPOConfig(beta=500.0, rho=50.0, margin_type="linear", logits_normalize=True,
                            std_standardize=True, flip_ratio=0.5, flip_threshold=0.0)
    for shared in (True, False):
        model, ref, target, annots = make_inputs(B, S, dtype, K=2, shared_target=shared, seed=B)
        check_vs_reference(model, ref, target, annots, cfg, what=f"{shape}/{dtype}/shared={shared}: ")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_deterministic(dtype):
    cfg = AdaptiveDPOConfig.paper(flip_ratio=0.25, flip_threshold=0.0)
    inputs = make_inputs(16, (4, 64, 64), dtype, K=2, seed=3)
    runs = []
    for _ in range(3):
        out, grad = run("cuda", *inputs, cfg)
        runs.append([getattr(out, f) for f in FIELDS] + [grad])
    for res in runs[1:]:
        for a, b in zip(runs[0], res):
            assert torch.equal(a, b)


def test_matches_cpu_kernel():
    if dispatch.BACKENDS["cpu"].unavailable():
        pytest.skip("CPU extension not built")
    cfg = AdaptiveDPOConfig.paper()
    inputs = make_inputs(8, (4, 32, 32), torch.float32, K=2, seed=4)
    out_g, grad_g = run("cuda", *inputs, cfg)
    out_c, grad_c = run("cpu", *inputs, cfg, device="cpu")
    for f in FIELDS:
        torch.testing.assert_close(getattr(out_g, f).cpu(), getattr(out_c, f), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_g.cpu(), grad_c, rtol=1e-5, atol=1e-9)


def test_side_stream_and_non_contiguous():
    cfg = AdaptiveDPOConfig.paper()
    model, ref, target, annots = make_inputs(4, (8, 12), torch.bfloat16, K=1, shared_target=False, seed=6)
    base, base_grad = run("cuda", model, ref, target, annots, cfg)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        m = model.detach().cuda().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
        out = adaptive_dpo_loss(m, ref.cuda(), target.cuda(), [a.cuda() for a in annots], cfg, backend="cuda")
        out.loss.backward()
    s.synchronize()
    assert torch.equal(out.loss, base.loss) and torch.equal(m.grad, base_grad)


def test_opcheck_cuda_ops():
    model, ref, target, annots = make_inputs(3, (4, 8), torch.float32, K=2, shared_target=False, seed=1,
                                             requires_grad=False, device="cuda")
    flat = lambda x: x.reshape(x.shape[0], -1)  # noqa: E731
    mp, rp, t, an = flat(model), flat(ref), flat(target), [flat(a) for a in annots]
    torch.library.opcheck(torch.ops.adpo.cuda_mse.default, (mp, rp, t, an))
    torch.library.opcheck(torch.ops.adpo.cuda_mse.default, (mp, rp, t[:3].contiguous(), []))
    mse3 = torch.ops.adpo.cuda_mse(mp, rp, t, an).view(4, 2, 3).contiguous()
    fp, ip = AdaptiveDPOConfig.paper(flip_ratio=0.3, flip_threshold=0.0).op_params(True)
    torch.library.opcheck(torch.ops.adpo.cuda_pairs.default, (mse3, mp.clone().requires_grad_(True), t, 0, 3, fp, ip))
    torch.library.opcheck(torch.ops.adpo.cuda_pairs_bwd.default,
                          (torch.tensor(0.5, device="cuda"), torch.randn(3, device="cuda"), mp, t))


def test_float64_ops_match_cpu_ops():
    """fp64 is not offered by dispatch for CUDA, but the kernels handle it: check the ops."""
    if dispatch.BACKENDS["cpu"].unavailable():
        pytest.skip("CPU extension not built")
    model, ref, target, annots = make_inputs(5, (3, 33), torch.float64, K=2, seed=2, requires_grad=False)
    flat = lambda x: x.reshape(x.shape[0], -1)  # noqa: E731
    args = [flat(model), flat(ref), flat(target), [flat(a) for a in annots]]
    cpu = torch.ops.adpo.cpu_mse(*args)
    gpu = torch.ops.adpo.cuda_mse(*[a.cuda() for a in args[:3]], [a.cuda() for a in args[3]])
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-13, atol=0)
    fp, ip = AdaptiveDPOConfig.paper(flip_ratio=0.4, flip_threshold=0.0).op_params(True)
    mse3 = cpu.view(4, 2, 5).contiguous()
    c = torch.ops.adpo.cpu_pairs(mse3, args[0], args[2], 0, 5, fp, ip)
    g = torch.ops.adpo.cuda_pairs(mse3.cuda(), args[0].cuda(), args[2].cuda(), 0, 5, fp, ip)
    for a, b in zip(g, c):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-12, atol=1e-15)
