"""Backend selection: auto order, forced backends, the environment override, errors."""
import pytest
import torch

import adpo_kernels as ak
from adpo_kernels import dispatch

from .utils import assert_close, make_inputs


def test_available_backends_shape():
    av = ak.available_backends()
    assert set(av) == {"torch", "cpu", "triton", "cuda"}
    assert av["torch"] == []
    for name, reasons in av.items():
        assert isinstance(reasons, list) and all(isinstance(r, str) and r for r in reasons), name
    if not torch.cuda.is_available():
        assert any("CUDA" in r for r in av["cuda"])


def _fake_usable(monkeypatch, *usable):
    """Only the fused backends in ``usable`` load (whatever this machine built)."""
    monkeypatch.setattr(dispatch.FusedBackend, "unavailable",
                        lambda self: [] if self.name in usable else [f"{self.name} faked missing"])


# The documented priority (README, docs): CUDA extension > Triton > torch on a GPU; the C++
# kernels > torch on the CPU; float64 only on the C++ kernels and torch.
AUTO_CASES = [
    ("cpu", torch.float32, ("cpu", "triton", "cuda"), "cpu"),
    ("cpu", torch.float64, ("cpu",), "cpu"),
    ("cpu", torch.float32, ("triton", "cuda"), "torch"),
    ("cuda", torch.float32, ("cpu", "triton", "cuda"), "cuda"),
    ("cuda", torch.bfloat16, ("cpu", "triton"), "triton"),
    ("cuda", torch.float16, ("cpu",), "torch"),
    ("cuda", torch.float64, ("cpu", "triton", "cuda"), "torch"),
]


@pytest.mark.parametrize("device,dtype,usable,want", AUTO_CASES)
def test_auto_priority(monkeypatch, device, dtype, usable, want):
    monkeypatch.delenv("ADPO_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter would let triton take CPU tensors
    _fake_usable(monkeypatch, *usable)
    assert dispatch.select("auto", torch.device(device), dtype, 2).name == want


def test_auto_uses_the_built_cpu_kernels_here():
    """With the extension built (CI requires it), a float32 CPU call runs the C++ kernels."""
    if ak.available_backends()["cpu"]:
        pytest.skip(f"CPU extension not usable: {ak.available_backends()['cpu']}")
    model, ref, target, _ = make_inputs(2, (4,))
    assert dispatch.select("auto", model.device, model.dtype, 0).name == "cpu"


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


def test_nothing_can_run_lists_every_backend(monkeypatch):
    _fake_usable(monkeypatch, "cpu")
    with pytest.raises(NotImplementedError, match=r"no backend can run a call on meta") as info:
        dispatch.select("auto", torch.device("meta"), torch.float32, 0)
    msg = str(info.value)
    for name in dispatch.BACKENDS:
        assert f"  {name}: " in msg, f"{name} missing from: {msg}"
    assert "torch: device 'meta' not supported" in msg and "cuda: cuda faked missing" in msg


@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_compile_fullgraph_step(backend):
    """torch.compile(fullgraph=True) of a step that calls the loss: one graph, the C++ ops in it
    (opaque nodes with fake impls and autograd), and the eager step's results.  The Triton
    backend's compile test is in test_triton.py.  Compiled and eager steps round differently:
    the tolerance is 4x the eager float32 step's measured error against its float64 twin."""
    if ak.available_backends()["cpu"]:
        pytest.skip(f"CPU extension not usable: {ak.available_backends()['cpu']}")
    from torch._inductor.compile_fx import compile_fx

    torch._dynamo.reset()
    cfg = ak.AdaptiveDPOConfig.paper(flip_ratio=0.3, flip_threshold=0.0)
    seen = []

    def inspect_then_inductor(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return compile_fx(gm, example_inputs)

    def run(fn, dtype):
        model, ref, target, annots = make_inputs(3, (4, 5), dtype, K=2, seed=14)
        torch.manual_seed(0)
        lin = torch.nn.Linear(5, 5, dtype=dtype)
        out = fn(lin, model.detach(), ref, target, annots)
        out[0].backward()
        return [x.detach().double() for x in out] + [lin.weight.grad.double()]

    def step(lin, x, ref, target, annots):
        out = ak.adaptive_dpo_loss(lin(x), ref, target, annots, cfg, backend=backend)
        return out.loss, out.metric, out.weights

    got = run(torch.compile(step, fullgraph=True, backend=inspect_then_inductor), torch.float32)
    assert any("adpo.cpu_pairs" in t for t in seen) and any("adpo.cpu_mse" in t for t in seen), seen
    eager, exact = run(step, torch.float32), run(step, torch.float64)
    for name, g, e, x in zip(("loss", "metric", "weights", "grad"), got, eager, exact):
        tol = 4 * float((e - x).abs().max()) + 8 * torch.finfo(torch.float32).eps * float(x.abs().max())
        assert_close(g, e, atol=tol, rtol=0, name=f"compiled {name}")
