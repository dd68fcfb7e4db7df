"""The shared tolerance (tests/utils.py: check_close_to_exact) can fail: it catches a wrong small
element of a bf16 gradient, and a large fp32 entry off by tens of ulps, and passes torch itself."""
import pytest
import torch

from adpo_kernels import AdaptiveDPOConfig

from .utils import check_close_to_exact, make_inputs, run_backend


def _grads(dtype):
    model, ref, target, annots = make_inputs(4, (3, 50), dtype, K=2, seed=3)
    cfg = AdaptiveDPOConfig.paper()
    _, peer = run_backend("torch", model, ref, target, annots, cfg)
    d = torch.float64
    _, exact = run_backend("torch", model.to(d), ref.to(d), target.to(d), [a.to(d) for a in annots], cfg)
    return peer, exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_torch_itself_passes(dtype):
    peer, exact = _grads(dtype)
    check_close_to_exact(peer, peer, exact, torch.float32, "grad")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_small_element_set_to_zero_fails(dtype):
    peer, exact = _grads(dtype)
    small = exact.abs().flatten()
    i = int(torch.where(small > 0.001 * small.max(), small, float("inf")).argmin())  # ~0.1% of the max
    bad = peer.clone().flatten()
    bad[i] = 0
    with pytest.raises(AssertionError, match="elements further"):
        check_close_to_exact(bad.view_as(peer), peer, exact, torch.float32, "grad")


def test_a_large_fp32_entry_off_by_64_ulps_fails():
    peer, exact = _grads(torch.float32)
    bad = peer.clone().flatten()
    i = int(exact.abs().flatten().argmax())
    bad[i] = bad[i] * (1 + 64 * torch.finfo(torch.float32).eps)
    with pytest.raises(AssertionError, match="elements further"):
        check_close_to_exact(bad.view_as(peer), peer, exact, torch.float32, "grad")
