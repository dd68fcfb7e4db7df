"""The C++ CPU kernels (csrc/cpu, backend "cpu") against the float64 torch reference.

Tolerance rule (docs/csrc.md): ``err(cpu) <= 2 * err(torch in the same dtype) + atol``,
with errors measured against ``reference.py`` run in float64 on the same inputs, for the
loss, every auxiliary output and the gradient.
"""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import adpo_kernels
from adpo_kernels import AdaptiveDPOConfig, adaptive_dpo_loss, config as cfgmod, dispatch
from tests import utils
from tests.gpu_cases import check_long_rows, run_misaligned
from tests.nan_cases import CASES as NAN_CASES, check_metric_relative_precision, check_nan_case
from tests.utils import FIELDS, assert_close, config_grid, make_inputs

REASONS = dispatch.BACKENDS["cpu"].unavailable()
pytestmark = pytest.mark.skipif(bool(REASONS), reason=f"CPU extension not usable: {REASONS}")

ALL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
ROW_CHUNK = 16384  # csrc/cpu/cpu_kernels.h
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(backend, model, ref, target, annots, cfg, ready=True):
    return utils.run_backend(backend, model, ref, target, annots, cfg, ready)


def check_vs_reference(model, ref, target, annots, cfg, ready=True, what=""):
    return utils.check_vs_reference("cpu", model, ref, target, annots, cfg, ready, what)


# -- the op and the C++ enums ------------------------------------------------------------

def test_extension_registers_cpu_kernels():
    importlib.import_module("adpo_kernels._C")
    for stage in ("mse", "pairs", "pairs_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"adpo::cpu_{stage}", "CPU")
    assert adpo_kernels._C.cpu_isa() in ("avx512", "avx2", "default")


def test_cpp_enums_mirror_config():
    src = open(os.path.join(ROOT, "csrc", "adpo_common.h")).read()

    def enum(name):
        body = re.search(r"enum %s : int \{([^}]*)\}" % name, src).group(1)
        return [item.split("=")[0].strip() for item in body.split(",") if item.strip()]

    assert enum("LossType") == ["LOSS_" + t.upper() for t in cfgmod.LOSS_TYPES]
    assert enum("WeightType") == ["WEIGHT_" + t.upper() for t in cfgmod.WEIGHT_TYPES]
    assert enum("MarginType") == ["MARGIN_" + ("NONE" if t is None else t.upper()) for t in cfgmod.MARGIN_TYPES]
    assert enum("MetricMode") == ["METRIC_OFF", "METRIC_WARMUP", "METRIC_ON"]
    assert (cfgmod.METRIC_OFF, cfgmod.METRIC_WARMUP, cfgmod.METRIC_ON) == (0, 1, 2)
    fnames = [n for n in dir(cfgmod) if n.startswith("F_")]
    inames = [n for n in dir(cfgmod) if n.startswith("I_")]
    assert enum("FParam") == sorted(fnames, key=lambda n: getattr(cfgmod, n)) + ["NUM_F"]
    assert enum("IParam") == sorted(inames, key=lambda n: getattr(cfgmod, n)) + ["NUM_I"]


# -- the option grid -----------------------------------------------------------------------

GRID = config_grid()


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("idx", range(len(GRID)), ids=[g[0] for g in GRID])
def test_grid_matches_reference(idx, dtype):
    name, cfg, ready = GRID[idx]
    K = 0 if name == "dpo" else 1 + idx % 3          # K = 1..3; the metric options need K >= 1
    shared = idx % 2 == 0
    model, ref, target, annots = make_inputs(6, (3, 5, 7), dtype, K=K, shared_target=shared, seed=idx)
    check_vs_reference(model, ref, target, annots, cfg, ready, what=f"{name}/{dtype}/K={K}: ")


@pytest.mark.parametrize("K", [0, 1, 2, 3])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "full"])
@pytest.mark.parametrize("cfg_name", ["sigmoid-linear-quadratic", "all-opts", "ipo-linear", "flip"])
def test_annotator_counts_and_targets(K, shared, cfg_name):
    cfg = dict((n, c) for n, c, _ in GRID)[cfg_name]
    model, ref, target, annots = make_inputs(5, (4, 9), torch.float32, K=K, shared_target=shared, seed=K)
    check_vs_reference(model, ref, target, annots, cfg)


# -- shapes ------------------------------------------------------------------------------

SHAPES = {
    "B1": (1, (4, 6)),
    "N1": (3, (1,)),
    "prime-N": (4, (131,)),
    "odd-5d": (2, (3, 1, 5, 7)),
    "chunk": (2, (ROW_CHUNK,)),
    "chunks+tail": (2, (2 * ROW_CHUNK + 37,)),
    "batch": (37, (3, 3)),
}


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_awkward_shapes(shape, dtype):
    B, S = SHAPES[shape]
    cfg = AdaptiveDPOConfig(beta=500.0, rho=50.0, margin_type="linear", logits_normalize=True,
                            std_standardize=True, flip_ratio=0.5, flip_threshold=0.0)
    for shared in (True, False):
        model, ref, target, annots = make_inputs(B, S, dtype, K=2, shared_target=shared, seed=B)
        check_vs_reference(model, ref, target, annots, cfg, what=f"{shape}/{dtype}/shared={shared}: ")


def test_non_contiguous_inputs_match_contiguous():
    cfg = AdaptiveDPOConfig.paper()
    model, ref, target, annots = make_inputs(4, (6, 10), torch.float32, K=2, shared_target=False, seed=3)

    def strided(x):  # same values, transposed storage
        return x.detach().transpose(1, 2).contiguous().transpose(1, 2)

    nc = [strided(x) for x in (model, ref, target)] + [[strided(a) for a in annots]]
    assert not nc[0].is_contiguous()
    out_c, grad_c = run("cpu", model, ref, target, annots, cfg)
    out_n, grad_n = run("cpu", *nc, cfg)
    for f in FIELDS:
        assert torch.equal(getattr(out_c, f), getattr(out_n, f)), f
    assert torch.equal(grad_c, grad_n)
    # a sliced (offset, strided) target and annotator stack, and an expanded shared target
    model2, ref2, t2, _ = make_inputs(2, (6, 10), torch.float32, seed=4)
    big = torch.full((4, 6, 12), float("nan"))
    big[::2, :, 1:11] = t2
    t_view = big[::2, :, 1:11]  # the shared target as an offset, strided view
    assert not t_view.is_contiguous() and torch.equal(t_view, t2)
    stack = torch.stack(annots)  # annotators as one (K, 2B, *S) tensor
    check_vs_reference(model2, ref2, t_view, [], AdaptiveDPOConfig.dpo(500.0))
    check_vs_reference(model, ref, target, stack, cfg)


# -- determinism ---------------------------------------------------------------------------

def _all_outputs(model, ref, target, annots, cfg):
    out, grad = run("cpu", model, ref, target, annots, cfg)
    return [getattr(out, f) for f in FIELDS] + [grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_deterministic_across_thread_counts(dtype):
    cfg = AdaptiveDPOConfig.paper(flip_ratio=0.25, flip_threshold=0.0)
    inputs = make_inputs(8, (3 * ROW_CHUNK + 5,), dtype, K=2, seed=11)
    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3, 1):
            torch.set_num_threads(threads)
            results.append(_all_outputs(*inputs, cfg))
    finally:
        torch.set_num_threads(old)
    for res in results[1:]:
        for a, b in zip(results[0], res):
            assert torch.equal(a, b)


def test_poisoned_outputs_are_fully_written():
    """With deterministic fill, every torch-allocated buffer (outputs and the kernels'
    scratch) starts as NaN: the results must not change."""
    cfg = AdaptiveDPOConfig(beta=500.0, rho=50.0, margin_type="quadratic", logits_normalize=True,
                            weight_normalize=True, flip_ratio=0.3, flip_threshold=0.0)
    for dtype in ALL_DTYPES:
        inputs = make_inputs(5, (ROW_CHUNK + 3,), dtype, K=2, seed=5)
        clean = _all_outputs(*inputs, cfg)
        old_det = torch.are_deterministic_algorithms_enabled()
        old_fill = torch.utils.deterministic.fill_uninitialized_memory
        try:
            torch.use_deterministic_algorithms(True)
            torch.utils.deterministic.fill_uninitialized_memory = True
            assert torch.isnan(torch.empty(3)).all()  # the poison is on
            poisoned = _all_outputs(*inputs, cfg)
        finally:
            torch.use_deterministic_algorithms(old_det)
            torch.utils.deterministic.fill_uninitialized_memory = old_fill
        for a, b in zip(clean, poisoned):
            assert torch.isfinite(b).all() and torch.equal(a, b)


# -- the ops directly ----------------------------------------------------------------------

def _op_inputs(dtype=torch.float32, K=2, shared=True, B=3, S=(4, 5)):
    model, ref, target, annots = make_inputs(B, S, dtype, K=K, shared_target=shared, seed=1, requires_grad=False)
    flat = lambda x: x.reshape(x.shape[0], -1)  # noqa: E731
    return flat(model), flat(ref), flat(target), [flat(a) for a in annots]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_opcheck_mse(dtype):
    for K, shared in ((0, True), (2, False)):
        mp, rp, t, an = _op_inputs(dtype, K, shared)
        torch.library.opcheck(torch.ops.adpo.cpu_mse.default, (mp, rp, t, an))


@pytest.mark.parametrize("name", ["dpo", "all-opts", "flip", "ipo-quadratic", "warmup"])
def test_opcheck_pairs_and_bwd(name):
    _, cfg, ready = dict((n, (n, c, r)) for n, c, r in GRID)[name]
    mp, rp, t, an = _op_inputs(torch.float32, 0 if name == "dpo" else 2, shared=False)
    mse = torch.ops.adpo.cpu_mse(mp, rp, t, an)
    B = mp.shape[0] // 2
    fp, ip = cfg.op_params(ready)
    mse3 = mse.view(mse.shape[0], 2, B).contiguous()
    mpg = mp.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.adpo.cpu_pairs.default, (mse3, mpg, t, 0, B, fp, ip))
    local = mp[2:].clone().requires_grad_(True)  # this process's pairs 1..B-1 of the global batch
    torch.library.opcheck(torch.ops.adpo.cpu_pairs.default, (mse3, local, t[2:], 1, B - 1, fp, ip))
    gc = torch.randn(B)
    mp_t = mp.t().contiguous().t()  # same values, column-major: the gradient is still contiguous
    for m, target in ((mp, t), (mp, t[:B].contiguous()), (mp_t, t)):
        torch.library.opcheck(torch.ops.adpo.cpu_pairs_bwd.default, (torch.tensor(0.7), gc, m, target))


def test_local_pairs_slice_of_global_batch():
    """sync_stats: with offset/num_pairs the batch statistics use all B_global pairs and
    the outputs are those of the local slice; the loss is the mean over the slice."""
    cfg = AdaptiveDPOConfig.paper(flip_ratio=0.3, flip_threshold=0.0, std_standardize=True)
    mp, rp, t, an = _op_inputs(torch.float64, 2, shared=False, B=7)
    B = 7
    mse3 = torch.ops.adpo.cpu_mse(mp, rp, t, an).view(4, 2, B).contiguous()
    fp, ip = cfg.op_params(True)
    full = torch.ops.adpo.cpu_pairs(mse3, mp, t, 0, B, fp, ip)
    loss_sum = 0.0
    for off, n in ((0, 3), (3, 4)):
        part = torch.ops.adpo.cpu_pairs(mse3, mp[:2 * n], t[:2 * n], off, n, fp, ip)
        for i in (1, 2, 3, 4):
            assert torch.equal(part[i], full[i][off:off + n])
        torch.testing.assert_close(part[6], full[6][off:off + n] * B / n, rtol=1e-12, atol=0)
        loss_sum += part[0].item() * n
    assert abs(loss_sum / B - full[0].item()) < 1e-12


def test_pair_logits_cpu_backend():
    model, ref, target, _ = make_inputs(4, (5, 6), torch.bfloat16, seed=2)
    z = adpo_kernels.pair_logits(model, ref, target, backend="cpu")
    z_torch = adpo_kernels.pair_logits(model, ref, target, backend="torch")
    z_ref = adpo_kernels.pair_logits(model.double(), ref.double(), target.double(), backend="torch")
    assert z.dtype == torch.float32
    utils.check_close_to_exact(z, z_torch, z_ref, torch.float32, name="pair_logits")


def test_degenerate_metrics():
    """Annotators equal to the policy: d = 0 everywhere, so std_standardize falls back to the
    raw metric and weight_normalize sees sum m = 0; model == ref gives z == 0 (acc 0.5)."""
    model, ref, target, _ = make_inputs(4, (3, 4), torch.float32, seed=8)
    annots = [model.detach().clone(), model.detach().clone()]
    for cfg in (AdaptiveDPOConfig(beta=500.0, rho=50.0, std_standardize=True),
                AdaptiveDPOConfig(beta=500.0, rho=50.0, weight_normalize=True, margin_type="linear")):
        check_vs_reference(model, ref, target, annots, cfg)
    out, _ = check_vs_reference(model, model.detach().clone(), target, [], AdaptiveDPOConfig())
    assert out.implicit_acc.item() == 0.5


def test_nonfinite_inputs_propagate_like_torch():
    model, ref, target, annots = make_inputs(3, (4, 4), torch.float32, K=1, seed=9)
    ref = ref.clone()
    ref[1, 0, 0] = float("nan")
    out, grad = run("cpu", model, ref, target, annots, AdaptiveDPOConfig.paper())
    peer, _ = run("torch", model, ref, target, annots, AdaptiveDPOConfig.paper())
    assert bool(out.nonfinite) and bool(peer.nonfinite)
    assert torch.isnan(out.loss) == torch.isnan(peer.loss)


@pytest.mark.parametrize("case", list(NAN_CASES))
def test_nan_rule_matches_reference(case):
    check_nan_case("cpu", case)


@pytest.mark.parametrize("K", [0, 2])
def test_metric_relative_precision(K):
    check_metric_relative_precision("cpu", K)


@pytest.mark.parametrize("N", [3 * ROW_CHUNK + 17, 3 * ROW_CHUNK + 32])
def test_long_rows_check(N):
    """The GPU suites' > 2^31-element check (tests/gpu_cases.py) at a CPU size."""
    check_long_rows("cpu", N, "cpu", step=5000)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_misaligned_views(dtype):
    """The GPU suites' misaligned-view case (tests/gpu_cases.py), run on the CPU kernels."""
    run_misaligned("cpu", dtype, "cpu")


# -- errors --------------------------------------------------------------------------------

def _bad_calls():
    m, r, t, a = make_inputs(2, (3, 4), torch.float32, K=1, seed=0)
    return {
        "odd-rows": (m[:3], r[:3], t, None),
        "ref-dtype": (m, r.double(), t, None),
        "target-shape": (m, r, t[:, :2], None),
        "ref-shape": (m, r[:, :, :3], t, None),
        "annot-shape": (m, r, t, [a[0][:, :2]]),
        "annot-stack-dims": (m, r, t, a[0]),
        "int-dtype": (m.detach().long(), r.long(), t.long(), None),
        "zero-d": (torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0), None),
        "empty": (m[:0], r[:0], t[:0], None),
        "not-a-tensor": (m, [1.0], t, None),
    }


# the argument each bad call's error must name first
BAD_ARGUMENT = {"odd-rows": "model_pred", "ref-dtype": "ref_pred", "target-shape": "target", "ref-shape": "ref_pred",
                "annot-shape": "annotator_preds[0]", "annot-stack-dims": "annotator_preds", "int-dtype": "model_pred",
                "zero-d": "model_pred", "empty": "model_pred", "not-a-tensor": "ref_pred"}


def _no_backend_reached(monkeypatch):
    def reached(*args, **kwargs):
        raise AssertionError("a backend's forward was reached")

    for cls in (dispatch.FusedBackend, dispatch.TorchBackend):
        monkeypatch.setattr(cls, "forward", reached)


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_inputs_rejected_before_any_backend(case, monkeypatch):
    """Validation runs at the public boundary, before dispatch: whatever the backend, the error
    names the argument and no backend's forward (C++ or torch) is reached.  The C++ ops' own
    checks are tested in test_direct_op_misuse_raises."""
    args = _bad_calls()[case]
    _no_backend_reached(monkeypatch)
    for backend in ("cpu", "auto", "torch"):
        with pytest.raises((ValueError, TypeError), match="^" + re.escape(BAD_ARGUMENT[case]) + ": "):
            adaptive_dpo_loss(*args, backend=backend)


def test_valid_call_reaches_the_backend(monkeypatch):
    """The control of the test above: with good inputs the patched forward is what runs."""
    m, r, t, a = make_inputs(2, (3, 4), torch.float32, K=1, seed=0)
    _no_backend_reached(monkeypatch)
    for backend in ("cpu", "torch"):
        with pytest.raises(AssertionError, match="forward was reached"):
            adaptive_dpo_loss(m, r, t, a, backend=backend)


def test_direct_op_misuse_raises():
    mp, rp, t, an = _op_inputs()
    ops = torch.ops.adpo
    B = mp.shape[0] // 2
    fp, ip = AdaptiveDPOConfig().op_params(True)
    mse3 = ops.cpu_mse(mp, rp, t, an).view(4, 2, B).contiguous()
    bad = [
        lambda: ops.cpu_mse(mp[:5], rp[:5], t, []),
        lambda: ops.cpu_mse(mp, rp.double(), t, []),
        lambda: ops.cpu_mse(mp, rp, t[:, :3], []),
        lambda: ops.cpu_mse(mp.unsqueeze(0), rp, t, []),
        lambda: ops.cpu_mse(mp, rp, t, [an[0][:, :2]]),
        lambda: ops.cpu_pairs(mse3, mp, t, 2, B, fp, ip),
        lambda: ops.cpu_pairs(mse3, mp, t, 1, B - 1, fp, ip),
        lambda: ops.cpu_pairs(mse3, mp, t, 0, 0, fp, ip),
        lambda: ops.cpu_pairs(mse3, mp, t, 0, B, fp[:3], ip),
        lambda: ops.cpu_pairs(mse3, mp, t, 0, B, fp, ip[:-1]),
        lambda: ops.cpu_pairs(mse3.half(), mp, t, 0, B, fp, ip),
        lambda: ops.cpu_pairs(mse3, mp, t, 0, B, fp, [9] + ip[1:]),
        lambda: ops.cpu_pairs_bwd(torch.tensor(1.0), torch.randn(B + 1), mp, t),
        lambda: ops.cpu_pairs_bwd(torch.ones(2), torch.randn(B), mp, t),
        lambda: ops.cpu_pairs_bwd(torch.tensor(1.0), torch.randn(B), mp, t[:, :2]),
    ]
    for call in bad:
        with pytest.raises(RuntimeError, match="adpo::cpu_"):
            call()


# -- the kernels of the other instruction sets ------------------------------------------

ISA_OF_CAPABILITY = {"default": "default", "avx2": "avx2"}


def _cpu_has_avx2():
    with open("/proc/cpuinfo") as f:
        return any(line.startswith("flags") and " avx2" in line for line in f)


@pytest.mark.parametrize("capability", list(ISA_OF_CAPABILITY))
def test_other_isa_kernels_in_subprocess(capability):
    """ATEN_CPU_CAPABILITY selects the kernels of a lower instruction set (the portable
    at::vec ones, AVX2); they must agree with the reference too.  The best set the CPU
    has is covered by every other test here."""
    if capability == "avx2" and not _cpu_has_avx2():  # not cpu_isa(): ATEN_CPU_CAPABILITY may force it down
        pytest.skip("this CPU has no AVX2")
    script = textwrap.dedent("""
        import torch, adpo_kernels, adpo_kernels._C as C
        from adpo_kernels import AdaptiveDPOConfig
        from tests.utils import check_vs_reference, make_inputs
        assert C.cpu_isa() == "%s", C.cpu_isa()
        cfg = AdaptiveDPOConfig.paper()
        for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
            m, r, t, a = make_inputs(3, (16387,), dtype, K=2, seed=1)
            check_vs_reference("cpu", m, r, t, a, cfg, what=f"{C.cpu_isa()}/{dtype}: ")
        print("ok")
    """ % ISA_OF_CAPABILITY[capability])
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr
