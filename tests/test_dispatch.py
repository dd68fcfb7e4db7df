"""Backend selection: auto order, forced backends, the environment override, errors."""
import pytest
import torch

import adpo_kernels as ak
from adpo_kernels import dispatch

from .utils import make_inputs


def test_available_backends_shape():
    av = ak.available_backends()
    assert set(av) == {"torch", "cpu", "triton", "cuda"}
    assert av["torch"] == []
    for name, reasons in av.items():
        assert isinstance(reasons, list) and all(isinstance(r, str) and r for r in reasons), name
    if not torch.cuda.is_available():
        assert any("CUDA" in r for r in av["cuda"])


def test_auto_on_cpu_prefers_cpu_extension_then_torch():
    chosen = dispatch.select("auto", torch.device("cpu"), torch.float32, 2).name
    assert chosen == ("cpu" if not ak.available_backends()["cpu"] else "torch")


def test_unknown_backend():
    model, ref, target, _ = make_inputs(2, (4,))
    with pytest.raises(ValueError, match=r"backend: expected 'auto' or one of \['cpu', 'cuda', 'torch', 'triton'\], got 'fortran'"):
        ak.adaptive_dpo_loss(model, ref, target, backend="fortran")


def test_forced_backend_that_cannot_run_raises_with_reasons():
    model, ref, target, _ = make_inputs(2, (4,))
    with pytest.raises(NotImplementedError, match=r"backend 'cuda' cannot run this call: .+"):
        ak.adaptive_dpo_loss(model, ref, target, backend="cuda")


def test_env_override(monkeypatch):
    model, ref, target, _ = make_inputs(2, (4,))
    monkeypatch.setenv("ADPO_BACKEND", "cuda")
    with pytest.raises(NotImplementedError, match="backend 'cuda'"):
        ak.adaptive_dpo_loss(model, ref, target)
    monkeypatch.setenv("ADPO_BACKEND", "nope")
    with pytest.raises(ValueError, match="ADPO_BACKEND: expected"):
        ak.adaptive_dpo_loss(model, ref, target)
    monkeypatch.setenv("ADPO_BACKEND", "torch")
    assert dispatch.select("auto", torch.device("cpu"), torch.float32, 0).name == "torch"
    # an explicit backend argument wins over the environment
    monkeypatch.setenv("ADPO_BACKEND", "cuda")
    assert dispatch.select("torch", torch.device("cpu"), torch.float32, 0).name == "torch"


def test_nothing_can_run_lists_every_backend():
    with pytest.raises(NotImplementedError, match=r"no backend can run a call on meta") as info:
        dispatch.select("auto", torch.device("meta"), torch.float32, 0)
    assert "torch: device 'meta' not supported" in str(info.value)
