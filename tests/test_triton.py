"""The Triton backend against the float64 torch reference.

On a machine without a GPU the kernels run in the Triton interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1); each program costs milliseconds there, so the
shapes are small, chosen so that rows split into several chunks with a ragged last
block.  On a GPU machine (no interpreter) the same tests run natively on CUDA tensors, and
the ``test_cuda_*`` tests add bigger shapes, 4000 pairs and tensors over 2^31 elements.

Tolerance: the fused result may be at most twice as far from the float64 reference
(run on the same, already rounded, inputs) as the torch reference run in the input
dtype is, plus a few fp32 ulps of the quantity's magnitude (plus one ulp of the input
dtype for the gradient, which is rounded to it).
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch

import adpo_kernels as ak
from adpo_kernels import AdaptiveDPOConfig
from adpo_kernels.dispatch import BACKENDS

from .gpu_cases import assert_grad_close, check_64bit_offsets, run_misaligned, side_stream_waits
from .nan_cases import CASES as NAN_CASES, check_metric_relative_precision, check_nan_case
from .utils import DTYPES, assert_close, config_grid, make_inputs

GRID = config_grid()
GRID_IDS = [g[0] for g in GRID]
FIELDS = ("loss", "logits", "metric", "weights", "margin", "implicit_acc", "model_mse", "ref_mse")
FP32_EPS = 2.0 ** -23
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (the interpreter tests cover the CPU)")

triton_reasons = BACKENDS["triton"].unavailable()
pytestmark = pytest.mark.skipif(bool(triton_reasons), reason=f"triton backend unusable: {triton_reasons}")
if not triton_reasons:
    from adpo_kernels.triton import _common, mse as _mse_module

    INTERPRETED = _common.is_interpreted(_mse_module._mse_partial_kernel)
else:
    INTERPRETED = False
# The suite runs on CPU tensors in the interpreter, natively on the GPU otherwise.
DEVICE = "cpu" if INTERPRETED else "cuda"
needs_device = pytest.mark.skipif(not INTERPRETED and not HAS_CUDA,
                                  reason="no GPU and the Triton interpreter is off (TRITON_INTERPRET != 1)")
interpreter_only = pytest.mark.skipif(not INTERPRETED, reason="runs on CPU tensors in the Triton interpreter")


def _run(backend, model, ref, target, annots, cfg, ready):
    model = model.detach().clone().requires_grad_(True)
    out = ak.adaptive_dpo_loss(model, ref, target, annots, cfg, ready, backend=backend)
    out.loss.backward()
    return out, model.grad


def compare(cfg, ready, B, S, dtype, K, shared, seed=0, device=None):
    """Triton vs float64 reference, with the same-dtype torch reference as the yardstick."""
    device = device or DEVICE
    model, ref, target, annots = make_inputs(B, S, dtype, K=K, shared_target=shared, seed=seed, device=device)
    out_t, grad_t = _run("triton", model, ref, target, annots, cfg, ready)
    out_s, grad_s = _run("torch", model, ref, target, annots, cfg, ready)
    out_d, grad_d = _run("torch", model.double(), ref.double(), target.double(),
                         [a.double() for a in annots], cfg, ready)
    pairs = [(f, getattr(out_t, f), getattr(out_s, f), getattr(out_d, f)) for f in FIELDS]
    pairs.append(("grad", grad_t, grad_s, grad_d))
    for name, t, s, d in pairs:
        assert t.dtype == (dtype if name == "grad" else torch.float32), f"{name}: dtype {t.dtype}"
        assert t.device == model.device, f"{name}: device {t.device}"
        d = d.double().cpu()
        what = f"{name} ({dtype}, K={K}, B={B}, S={S})"
        if name == "grad":
            assert_grad_close(t, s, d, dtype, what)
            continue
        err_s = (s.double().cpu() - d).abs().max().item()
        atol = 2 * err_s + 8 * FP32_EPS * d.abs().max().item() + 1e-30
        assert_close(t, d, atol=atol, rtol=0.0, name=what)
    return out_t


# -- every option combination -----------------------------------------------------------

@needs_device
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,cfg,ready", GRID, ids=GRID_IDS)
def test_config_grid(name, cfg, ready, dtype):
    """B = 10 so that flipping flips some pairs; shared target; K = 2."""
    compare(cfg, ready, B=10, S=(3, 7), dtype=dtype, K=2, shared=True, seed=1)


@needs_device
@pytest.mark.parametrize("K", [0, 1, 3])
@pytest.mark.parametrize("name,cfg,ready", GRID, ids=GRID_IDS)
def test_config_grid_annotators(name, cfg, ready, K):
    """Every option with 0, 1 and 3 annotators; full (per-row) target; B not a power of two."""
    compare(cfg, ready, B=6, S=(11,), dtype=torch.float32, K=K, shared=False, seed=2 + K)


# -- awkward shapes ------------------------------------------------------------------------

# N: 1, odd, prime below one interpreter block (256), exactly one block, prime above one
# chunk (512: two chunks), three chunks with a ragged tail.
SHAPES = [(1, (1,)), (3, (7,)), (5, (97,)), (2, (16, 16)), (3, (521,)), (1, (1031,)), (7, (3, 5, 7))]
SHAPE_CASES = [(B, S, shared, DTYPES[i % 3], i % 4)
               for i, ((B, S), shared) in enumerate(itertools.product(SHAPES, (True, False)))]


@pytest.mark.parametrize("B,S,shared,dtype,K", SHAPE_CASES,
                         ids=[f"B{c[0]}-N{torch.Size(c[1]).numel()}-{'shared' if c[2] else 'full'}-"
                              f"{str(c[3])[6:]}-K{c[4]}" for c in SHAPE_CASES])
@needs_device
def test_awkward_shapes(B, S, shared, dtype, K):
    cfg = AdaptiveDPOConfig(beta=300.0, rho=40.0, margin_type="quadratic", logits_normalize=True,
                            std_standardize=True, flip_ratio=0.5, flip_threshold=0.0)
    out = compare(cfg, True, B=B, S=S, dtype=dtype, K=K, shared=shared, seed=B + K)
    assert out.logits.shape == (B,) and out.model_mse.shape == (2 * B,)


@needs_device
def test_many_annotators():
    """K = 7 needs two reduction launches (six predictions per launch)."""
    cfg = AdaptiveDPOConfig(beta=300.0, rho=40.0, logits_normalize=True, weight_normalize=True)
    compare(cfg, True, B=3, S=(600,), dtype=torch.bfloat16, K=7, shared=True, seed=7)


@needs_device
def test_strided_and_stacked_inputs():
    """Non-contiguous model_pred, annotators as one (K, 2B, *S) tensor."""
    cfg = AdaptiveDPOConfig.paper()
    model, ref, target, annots = make_inputs(4, (6, 10), torch.float32, K=2, seed=11, device=DEVICE)
    stacked = torch.stack(annots)
    m_nc = model.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    assert not m_nc.is_contiguous()
    out_t = ak.adaptive_dpo_loss(m_nc, ref, target, stacked, cfg, backend="triton")
    out_t.loss.backward()
    out_d, grad_d = _run("torch", model.double(), ref.double(), target.double(),
                         [a.double() for a in annots], cfg, True)
    assert m_nc.grad.device == model.device
    assert_close(out_t.loss, out_d.loss, 1e-6, 1e-5, "loss")
    assert_close(out_t.metric, out_d.metric, 1e-6, 1e-5, "metric")
    assert_close(m_nc.grad, grad_d, 1e-7, 1e-5, "grad")


# -- the scalar stage alone: large batches, sync_stats slices --------------------------------

def _mse_of(model, ref, target, annots):
    """(2 + K, 2, B) float32 MSEs computed by torch (the scalar stage's input)."""
    rows = model.shape[0]
    mse = torch.stack([ak.reference.row_mse(p.double(), target.double()) for p in [model, ref, *annots]])
    return mse.float().view(len(annots) + 2, 2, rows // 2).to(DEVICE)


def _pairs(mse, offset, num_pairs, cfg, ready, model, target):
    f, i = cfg.op_params(ready)
    return torch.ops.adpo.triton_pairs(mse, model.detach().reshape(model.shape[0], -1).to(mse.device),
                                       target.reshape(target.shape[0], -1).to(mse.device), offset, num_pairs, f, i)


@needs_device
@pytest.mark.parametrize("name", ["flip", "all-opts", "ipo-quadratic"])
def test_pairs_large_batch(name):
    """B = 3000 pairs (several blocks of the one-program scalar stage), flip quantile exact."""
    cfg, ready = next((c, r) for n, c, r in GRID if n == name)
    B, K = 3000, 2
    model, ref, target, annots = make_inputs(B, (2,), torch.float64, K=K, seed=5, requires_grad=False)
    mse = _mse_of(model, ref, target, annots)
    # the float64 reference on inputs whose MSEs are exactly the float32 ones given to the kernel
    d = _mse_rows_as_inputs(mse)
    exp = ak.adaptive_dpo_loss(*d, config=cfg, annotators_ready=ready, backend="torch")
    loss, logits, metric, weights, margin, acc, g = _pairs(mse, 0, B, cfg, ready, d[0], d[2])
    scale = lambda x: 8 * FP32_EPS * x.abs().max().item() + 1e-30  # noqa: E731
    for field, got in [("logits", logits), ("metric", metric), ("weights", weights), ("margin", margin)]:
        want = getattr(exp, field)
        assert_close(got, want, 4 * scale(want), 1e-4, field)
    assert_close(loss, exp.loss, 0.0, 1e-5, "loss")
    assert_close(acc, exp.implicit_acc, 1e-6, 0.0, "implicit_acc")
    # the per-pair gradient coefficients g_i = d loss / d z_i (which carry the flips' signs), from
    # the reference's gradient: with N = 1 and target 0, d loss / d x_w = g * (-2) * x_w
    g_ref = _grad_coef_of_reference(d, cfg, ready)
    assert_close(g, g_ref, 4 * scale(g_ref), 1e-4, "grad_coef")
    if name == "flip":  # the reference (not the kernel) says which pairs flip: some, at most the ratio
        unflipped = _grad_coef_of_reference(d, AdaptiveDPOConfig(**{**cfg.__dict__, "flip_ratio": 0.0}), ready)
        n_flipped = int((torch.sign(g_ref) != torch.sign(unflipped)).sum())
        assert 0 < n_flipped <= round(cfg.flip_ratio * B), n_flipped


def _grad_coef_of_reference(d, cfg, ready):
    B = d[0].shape[0] // 2
    m = d[0].detach().clone().requires_grad_(True)
    exp = ak.adaptive_dpo_loss(m, *d[1:], config=cfg, annotators_ready=ready, backend="torch")
    (grad,) = torch.autograd.grad(exp.loss, m)
    return -grad[:B, 0] / (2 * m[:B, 0].detach())


def _mse_rows_as_inputs(mse):
    """float64 (model, ref, target, annots) with N = 1 whose row MSEs equal ``mse``."""
    P, _, B = mse.shape
    rows = mse.double().reshape(P, 2 * B).sqrt()
    target = torch.zeros(2 * B, 1, dtype=torch.float64)
    preds = [rows[p].reshape(2 * B, 1) for p in range(P)]
    return preds[0].clone().requires_grad_(True), preds[1], target, preds[2:]


@needs_device
def test_pairs_sync_stats_slices():
    """Two simulated processes: each owns a slice, statistics over the gathered batch."""
    cfg = AdaptiveDPOConfig(beta=400.0, rho=30.0, logits_normalize=True, weight_normalize=True,
                            margin_type="linear", flip_ratio=0.25, flip_threshold=0.0)
    B, K = 9, 2
    model, ref, target, annots = make_inputs(B, (5,), torch.float32, K=K, seed=8)
    mse = _mse_of(model, ref, target, annots)
    full = _pairs(mse, 0, B, cfg, True, model, target)
    rows = lambda x, lo, hi: torch.cat([x[lo:hi], x[B + lo:B + hi]])  # noqa: E731
    parts = [_pairs(mse, lo, hi - lo, cfg, True, rows(model, lo, hi), target[lo:hi]) for lo, hi in ((0, 4), (4, 9))]
    for k in (1, 2, 3, 4):  # logits, metric, weights, margin: the slices of the whole
        assert torch.equal(torch.cat([parts[0][k], parts[1][k]]), full[k])
    # loss / acc are local means, g carries 1 / num_pairs
    assert_close(parts[0][0] * 4 + parts[1][0] * 5, full[0] * B, 1e-6, 1e-5, "loss")
    assert_close(torch.cat([parts[0][6] * 4, parts[1][6] * 5]), full[6] * B, 1e-9, 1e-5, "g")


SYNC_CFG = AdaptiveDPOConfig(beta=400.0, rho=30.0, logits_normalize=True, std_standardize=True,
                              weight_normalize=True, margin_type="quadratic", flip_ratio=0.3,
                              flip_threshold=0.0, sync_stats=True)
SYNC_B, SYNC_SPLIT = 7, (3, 4)


def _rank_rows(x, rank):
    lo = sum(SYNC_SPLIT[:rank])
    hi = lo + SYNC_SPLIT[rank]
    return torch.cat([x[lo:hi], x[SYNC_B + lo:SYNC_B + hi]]) if x.shape[0] == 2 * SYNC_B else x[lo:hi]


@interpreter_only
def test_sync_stats_two_processes(tmp_path):
    """Two gloo processes with 3 and 4 pairs reproduce one process with 7 (statistics global)."""
    from bench.launch import torchrun

    # tests/triton_sync_worker.py: each rank's log kept, its first error in the failure message
    torchrun(["-m", "tests.triton_sync_worker", str(tmp_path)], tmp_path / "logs", timeout=300)
    model, ref, target, annots = make_inputs(SYNC_B, (40,), torch.float32, K=2, seed=21)
    whole, grad = _run("triton", model, ref, target, annots, SYNC_CFG, True)
    for rank, n in enumerate(SYNC_SPLIT):
        got = torch.load(os.path.join(tmp_path, f"{rank}.pt"))
        for f in ("logits", "metric", "weights", "margin", "model_mse", "ref_mse"):
            assert_close(got[f], _rank_rows(getattr(whole, f), rank) if f.endswith("mse") else
                         getattr(whole, f)[sum(SYNC_SPLIT[:rank]):][:n], 1e-7, 1e-5, f"rank {rank} {f}")
        # the local loss is the mean over the local pairs: its gradient is B/n times the global one
        assert_close(got["grad"], _rank_rows(grad, rank) * (SYNC_B / n), 1e-8, 1e-5, f"rank {rank} grad")


# -- determinism, poisoned outputs, op checks ---------------------------------------------

def _everything(model, ref, target, annots, cfg):
    out, grad = _run("triton", model, ref, target, annots, cfg, True)
    return [getattr(out, f) for f in FIELDS] + [grad]


@needs_device
def test_bitwise_deterministic():
    cfg = AdaptiveDPOConfig(beta=300.0, rho=40.0, logits_normalize=True, flip_ratio=0.3, flip_threshold=0.0)
    inputs = make_inputs(5, (1031,), torch.bfloat16, K=3, seed=9, device=DEVICE)
    a, b = _everything(*inputs, cfg), _everything(*inputs, cfg)
    for name, x, y in zip(FIELDS + ("grad",), a, b):
        assert torch.equal(x, y), f"{name} differs between two identical runs"


@needs_device
def test_poisoned_outputs_are_overwritten(monkeypatch):
    cfg = AdaptiveDPOConfig.paper(flip_ratio=0.3, flip_threshold=0.0)
    inputs = make_inputs(5, (600,), torch.float16, K=2, seed=10, device=DEVICE)
    clean = _everything(*inputs, cfg)
    real_alloc = _common.alloc
    monkeypatch.setattr(_common, "alloc", lambda *a: real_alloc(*a).fill_(float("nan")))
    poisoned = _everything(*inputs, cfg)
    for name, x, y in zip(FIELDS + ("grad",), clean, poisoned):
        assert torch.isfinite(y).all(), f"{name}: NaN left from the poisoned buffer"
        assert torch.equal(x, y), f"{name}: differs after poisoning"


def _op_samples(dtype=torch.float32, device=None):
    device = device or DEVICE
    model, ref, target, annots = make_inputs(3, (300,), dtype, K=2, seed=12, device=device)
    m2, r2, t2 = model.detach().reshape(6, -1), ref.reshape(6, -1), target.reshape(3, -1)
    a2 = [a.reshape(6, -1) for a in annots]
    mse = torch.ops.adpo.triton_mse(m2, r2, t2, a2)
    f, i = AdaptiveDPOConfig.paper(flip_ratio=0.3).op_params(True)
    g = torch.randn(3, device=device)
    return [
        (torch.ops.adpo.triton_mse.default, (m2, r2, t2, a2)),
        (torch.ops.adpo.triton_mse.default, (m2, r2, t2, [])),
        (torch.ops.adpo.triton_pairs.default,
         (mse.view(4, 2, 3), m2.clone().requires_grad_(True), t2, 0, 3, f, i)),
        (torch.ops.adpo.triton_pairs.default,  # pairs 1 and 2 of 3: this process's rows only
         (mse.view(4, 2, 3), m2[[1, 2, 4, 5]].clone().requires_grad_(True), t2[1:3], 1, 2, f, i)),
        (torch.ops.adpo.triton_pairs_bwd.default, (torch.tensor(1.5, device=device), g, m2, t2)),
    ]


@needs_device
@pytest.mark.parametrize("idx", range(5))
def test_opcheck(idx):
    op, args = _op_samples()[idx]
    torch.library.opcheck(op, args)


@needs_device
def test_op_argument_errors():
    m, r, t = (torch.randn(n, 8, device=DEVICE) for n in (4, 4, 3))
    with pytest.raises(ValueError, match="target"):
        torch.ops.adpo.triton_mse(m, r, t, [])
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        torch.ops.adpo.triton_mse(m.double(), r.double(), t[:2].double(), [])
    mse = torch.ops.adpo.triton_mse(m, r, t[:2], []).view(2, 2, 2)
    f, i = AdaptiveDPOConfig().op_params(True)
    with pytest.raises(ValueError, match="local pairs"):
        torch.ops.adpo.triton_pairs(mse, m, t[:2], 1, 2, f, i)
    with pytest.raises(ValueError, match="2 \\* num_pairs"):
        torch.ops.adpo.triton_pairs(mse, m, t[:2], 0, 1, f, i)


@needs_device
def test_pair_logits_and_public_api():
    model, ref, target, _ = make_inputs(4, (33,), torch.float16, seed=13, device=DEVICE)
    z = ak.pair_logits(model, ref, target, backend="triton")
    z_ref = ak.pair_logits(model.double(), ref.double(), target.double(), backend="torch")
    assert z.dtype == torch.float32
    assert_close(z, z_ref, 1e-6, 1e-4, "pair_logits")
    out = ak.AdaptiveDPOLoss(beta=200.0, backend="triton")(model, ref, target)
    assert torch.isfinite(out.loss)
    with pytest.raises(NotImplementedError, match="dtype"):
        ak.adaptive_dpo_loss(model.double(), ref.double(), target.double(), backend="triton")


@needs_device
def test_compile_fullgraph():
    """torch.compile(fullgraph=True) of a training step: the ops are opaque nodes (fake impls, autograd)."""
    torch._dynamo.reset()
    _compile_step_check(AdaptiveDPOConfig.paper(flip_ratio=0.3, flip_threshold=0.0), device=DEVICE)


def _compile_step_check(cfg, device):
    model, ref, target, annots = make_inputs(3, (4, 5), torch.float32, K=2, seed=14, device=device)
    lin = torch.nn.Linear(5, 5, device=device)
    x = model.detach()

    def step(x, ref, target, annots):
        out = ak.adaptive_dpo_loss(lin(x), ref, target, annots, cfg, backend="triton")
        return out.loss, out.metric

    compiled = torch.compile(step, fullgraph=True)
    losses, grads = [], []
    for fn in (compiled, step):
        lin.zero_grad(set_to_none=True)
        loss, metric = fn(x, ref, target, annots)
        loss.backward()
        losses.append((loss.detach(), metric))
        grads.append(lin.weight.grad.clone())
    assert_close(losses[0][0], losses[1][0], 1e-6, 1e-5, "compiled loss")
    assert_close(losses[0][1], losses[1][1], 1e-6, 1e-5, "compiled metric")
    assert_close(grads[0], grads[1], 1e-6, 1e-5, "compiled grad")


def test_kernels_compile_natively_for_sm90():
    """The interpreter cannot see native code-generation errors: lower every kernel through
    Triton's CUDA backend for sm_90 (no GPU needed) and require no register spills."""
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("triton has no NVIDIA backend here")
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-m", "adpo_kernels.triton._aot", "--arch", "90", "--quick"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]


@needs_device
@pytest.mark.parametrize("case", list(NAN_CASES))
def test_nan_rule_matches_reference(case):
    """One NaN rule in every backend (tests/nan_cases.py); natively on a GPU this is where a
    NaN-dropping tl.minimum / tl.maximum would show."""
    check_nan_case("triton", case, device=DEVICE)


@needs_device
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_views(dtype):
    """Pointers one element past a 16-byte boundary (no divisibility hint natively)."""
    run_misaligned("triton", dtype, DEVICE)


@needs_device
@pytest.mark.parametrize("K", [0, 2])
def test_metric_relative_precision(K):
    """sigmoid(-rho z), not 1 - sigmoid(rho z): no cancellation at the default rho."""
    check_metric_relative_precision("triton", K, device=DEVICE)


# -- on a GPU ---------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("B,S,shared,dtype,K", SHAPE_CASES + [(16, (4, 64, 64), True, torch.bfloat16, 2),
                                                             (3, (70001,), False, torch.float16, 3)])
def test_cuda_shapes(B, S, shared, dtype, K):
    cfg = AdaptiveDPOConfig(beta=300.0, rho=40.0, margin_type="quadratic", logits_normalize=True,
                            std_standardize=True, flip_ratio=0.5, flip_threshold=0.0)
    compare(cfg, True, B=B, S=S, dtype=dtype, K=K, shared=shared, seed=B + K, device="cuda")


@needs_cuda
def test_cuda_deterministic_and_large_batch():
    cfg = AdaptiveDPOConfig.paper(flip_ratio=0.2, flip_threshold=0.0, std_standardize=True, weight_normalize=True)
    inputs = make_inputs(32, (4, 128, 128), torch.bfloat16, K=2, seed=15, device="cuda")
    a, b = _everything(*inputs, cfg), _everything(*inputs, cfg)
    for name, x, y in zip(FIELDS + ("grad",), a, b):
        assert torch.equal(x, y), f"{name} differs between two identical runs"
    compare(cfg, True, B=4000, S=(8,), dtype=torch.float32, K=3, shared=True, seed=16, device="cuda")


@needs_cuda
@pytest.mark.parametrize("N", [2 ** 30 + 17, 2 ** 30 + 32], ids=["odd-N", "N%16"])
def test_cuda_64bit_offsets(N):
    """More than 2^31 elements per tensor: rows at offsets beyond int32."""
    check_64bit_offsets("triton", N)


@needs_cuda
def test_cuda_side_stream():
    side_stream_waits("triton")
