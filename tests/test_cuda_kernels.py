"""The CUDA kernels (csrc/cuda) against the float64 torch reference, on a GPU and on CPU threads.

Every test runs on two targets:

* ``cuda``: the ``cuda`` backend on a GPU; without one these skip with the reason (the CUDA
  sources are still compiled and linked by CI: tests/test_build.py; their generated code is
  checked by tests/test_static_proofs.py);
* ``cuda_emu``: the same kernels.cu, launchers and ops_cuda.cpp compiled as C++ on the
  CUDA-on-CPU harness (csrc/cuda_emu, tests/cuda_emu.py), on CPU tensors.  These always run:
  a failed harness build fails them.  ``pytest -k cuda_emu`` selects them;
  ``ADPO_CUDA_EMU_SANITIZER=address|thread`` runs them under ASan or TSan (.ci/sanitizers.sh).

Besides the option grid and awkward shapes: a side stream that really delays its input (GPU),
misaligned views (the scalar path), up to 31 annotators (several reduction launches), the
offset (sync_stats) path, multi-chunk bf16 determinism, bitwise equality across block orders
(on the harness: shuffled from ``ADPO_CUDA_EMU_SEED``), the NaN rule and tensors of more than
2^31 elements (GPU).  Some shapes are smaller on the harness, where a block with reductions costs
~20 ms: each such case says so.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from adpo_kernels import AdaptiveDPOConfig, dispatch
from tests import cuda_emu, utils
from tests.gpu_cases import check_64bit_offsets, run_misaligned, side_stream_waits
from tests.nan_cases import CASES as NAN_CASES, check_nan_case
from tests.utils import FIELDS, config_grid, make_inputs

REASONS = dispatch.BACKENDS["cuda"].unavailable()
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GRID = config_grid()
CHUNK_FP32 = 256 * 8 * 4  # csrc/cuda/kernels.h: MSE_THREADS * MSE_ITERS * 16 bytes / 4 bytes
CHUNK_BF16 = 256 * 8 * 8
MAX_PREDS_PER_LAUNCH = 16  # csrc/cuda/kernels.h


@dataclass(frozen=True)
class Target:
    backend: str  # "cuda" or "cuda_emu"
    device: str   # where its tensors live

    @property
    def emu(self) -> bool:
        return self.backend == "cuda_emu"

    def op(self, stage: str):
        return getattr(torch.ops.adpo, f"{self.backend}_{stage}")


GPU = pytest.mark.skipif(bool(REASONS), reason=f"CUDA backend not usable here: {'; '.join(REASONS)}")
TARGETS = [pytest.param(Target("cuda", "cuda"), marks=GPU, id="cuda"), pytest.param(Target("cuda_emu", "cpu"), id="cuda_emu")]


@pytest.fixture(params=TARGETS)
def tgt(request):
    if not request.param.emu:
        yield request.param
        return
    with cuda_emu.registered():  # built once per source hash; a failed build fails the test
        yield request.param


def gpu_only(tgt: Target, why: str) -> None:
    if tgt.emu:
        pytest.skip(f"GPU only: {why}")


def run(tgt, model, ref, target, annots, cfg, ready=True, backend=None, device=None):
    return utils.run_backend(backend or tgt.backend, model, ref, target, annots, cfg, ready, device or tgt.device)


def check_vs_reference(tgt, model, ref, target, annots, cfg, ready=True, what=""):
    return utils.check_vs_reference(tgt.backend, model, ref, target, annots, cfg, ready, what, device=tgt.device)


def seeds(tgt: Target, n: int = 3):
    """Runs of one case: on the harness each with another block order (ADPO_CUDA_EMU_SEED)."""
    old = os.environ.get("ADPO_CUDA_EMU_SEED")
    try:
        for i in range(n):
            if tgt.emu:
                os.environ["ADPO_CUDA_EMU_SEED"] = str(1000 + i)
            yield i
    finally:
        if old is None:
            os.environ.pop("ADPO_CUDA_EMU_SEED", None)
        else:
            os.environ["ADPO_CUDA_EMU_SEED"] = old


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("idx", range(len(GRID)), ids=[g[0] for g in GRID])
def test_grid_matches_reference(tgt, idx, dtype):
    name, cfg, ready = GRID[idx]
    K = 0 if name == "dpo" else 1 + idx % 3
    model, ref, target, annots = make_inputs(6, (4, 16, 16), dtype, K=K, shared_target=idx % 2 == 0, seed=idx)
    check_vs_reference(tgt, model, ref, target, annots, cfg, ready, what=f"{name}/{dtype}: ")


def test_float64_matches_reference(tgt):
    """fp64 through the public path (dispatch offers ``cuda`` for fp32/bf16/fp16 only; the harness's
    test backend takes every dtype, so the fp64 instantiations run end to end there)."""
    cfg = AdaptiveDPOConfig.paper(flip_ratio=0.3, flip_threshold=0.0, margin_type="linear", logits_normalize=True)
    for shape in ((4, 16, 16), (3, 5, 7)):  # the vector and the scalar path
        inputs = make_inputs(5, shape, torch.float64, K=2, shared_target=False, seed=31)
        check_vs_reference(tgt, *inputs, cfg, what=f"fp64 {shape}: ")


@pytest.mark.parametrize("K", range(5))
def test_annotator_counts(tgt, K):
    """K = 0..4 annotators (K = 1 has one annotator next to the policy: a two-sample std), flip and
    margin on, every dtype in turn."""
    cfg = AdaptiveDPOConfig(beta=500.0, rho=50.0, margin_type="linear", std_standardize=True,
                            flip_ratio=0.25, flip_threshold=0.0)
    dtype = DTYPES[K % len(DTYPES)]
    inputs = make_inputs(4, (3, 9), dtype, K=K, shared_target=K % 2 == 1, seed=40 + K)
    check_vs_reference(tgt, *inputs, cfg, what=f"K={K}/{dtype}: ")


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
def test_awkward_shapes(tgt, shape, dtype):
    if tgt.emu and shape == "big-batch":
        # 1400 rows x 4 predictions = 5600 reduction blocks, ~2 min a run on the harness; its scalar
        # stage over 700 pairs runs there in test_offset_slices_of_the_global_batch
        pytest.skip("GPU only: 5600 reduction blocks (the harness runs this scalar stage in the offset test)")
    B, S = SHAPES[shape]
    cfg = AdaptiveDPOConfig(beta=500.0, rho=50.0, margin_type="linear", logits_normalize=True,
                            std_standardize=True, flip_ratio=0.5, flip_threshold=0.0)
    for shared in (True, False):
        model, ref, target, annots = make_inputs(B, S, dtype, K=2, shared_target=shared, seed=B)
        check_vs_reference(tgt, model, ref, target, annots, cfg, what=f"{shape}/{dtype}/shared={shared}: ")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_deterministic(tgt, dtype):
    """Identical runs give identical bits; on the harness each run has another block order."""
    cfg = AdaptiveDPOConfig.paper(flip_ratio=0.25, flip_threshold=0.0)
    B = 4 if tgt.emu else 16  # 64 blocks of two chunks on the harness
    inputs = make_inputs(B, (4, 64, 64), dtype, K=2, seed=3)
    runs = []
    for _ in seeds(tgt):
        out, grad = run(tgt, *inputs, cfg)
        runs.append([getattr(out, f) for f in FIELDS] + [grad])
    for res in runs[1:]:
        for name, a, b in zip(FIELDS + ("grad",), runs[0], res):
            assert torch.equal(a, b), f"{name} differs between runs"


def test_matches_cpu_kernel(tgt):
    if dispatch.BACKENDS["cpu"].unavailable():
        pytest.skip("CPU extension not built")
    cfg = AdaptiveDPOConfig.paper()
    inputs = make_inputs(8, (4, 32, 32), torch.float32, K=2, seed=4)
    out_g, grad_g = run(tgt, *inputs, cfg)
    out_c, grad_c = run(tgt, *inputs, cfg, backend="cpu", device="cpu")
    for f in FIELDS:
        torch.testing.assert_close(getattr(out_g, f).cpu(), getattr(out_c, f), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_g.cpu(), grad_c, rtol=1e-5, atol=1e-9)


def test_side_stream(tgt):
    gpu_only(tgt, "streams do not exist on the harness (its launches are synchronous)")
    side_stream_waits("cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_views_take_the_scalar_path(tgt, dtype):
    run_misaligned(tgt.backend, dtype, tgt.device)


@pytest.mark.parametrize("K", [14, 15, 31])
def test_many_annotators_up_to_and_past_one_launch(tgt, K):
    """MAX_PREDS_PER_LAUNCH = 16 predictions per reduction launch: K = 14 fills one launch
    exactly, 15 needs a second with one prediction, 31 two full and a third."""
    assert MAX_PREDS_PER_LAUNCH == 16
    cfg = AdaptiveDPOConfig(beta=500.0, rho=50.0, logits_normalize=True, std_standardize=True,
                            margin_type="linear", flip_ratio=0.3, flip_threshold=0.0)
    model, ref, target, annots = make_inputs(5, (3, 7), torch.bfloat16, K=K, shared_target=False, seed=K)
    check_vs_reference(tgt, model, ref, target, annots, cfg, what=f"K={K}: ")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_offset_slices_of_the_global_batch(tgt, dtype):
    """The sync_stats path of the op: pairs offset .. offset + n of a global batch, batch
    statistics over all of it; each slice equals the CPU op's and the full run's slice.
    On the harness the (exact, same-order) MSEs come from the CPU op: 5600 reduction blocks
    would take minutes there, and the scalar stage over 700 pairs is what this tests."""
    if dispatch.BACKENDS["cpu"].unavailable():
        pytest.skip("CPU extension not built")
    cfg = AdaptiveDPOConfig.paper(flip_ratio=0.3, flip_threshold=0.0, std_standardize=True, margin_type="linear")
    B = 700  # more pairs than the scalar stage's threads
    model, ref, target, annots = make_inputs(B, (6,), dtype, K=2, shared_target=False, seed=5, requires_grad=False)
    flat = lambda x: x.reshape(x.shape[0], -1).to(tgt.device)  # noqa: E731
    mp, t = flat(model), flat(target)
    mse_op = torch.ops.adpo.cpu_mse if tgt.emu else tgt.op("mse")
    mse3 = mse_op(mp, flat(ref), t, [flat(a) for a in annots]).view(4, 2, B).contiguous()
    fp, ip = cfg.op_params(True)
    pairs = tgt.op("pairs")
    full = pairs(mse3, mp, t, 0, B, fp, ip)
    loss_sum = 0.0
    for off, n in ((0, 1), (1, 300), (301, 399)):
        rows = torch.cat([mp[off:off + n], mp[B + off:B + off + n]])
        trow = torch.cat([t[off:off + n], t[B + off:B + off + n]])
        part = pairs(mse3, rows, trow, off, n, fp, ip)
        cpu = torch.ops.adpo.cpu_pairs(mse3.cpu(), rows.cpu(), trow.cpu(), off, n, fp, ip)
        tol = dict(rtol=1e-12, atol=1e-15) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)
        for i in (1, 2, 3, 4):  # logits, metric, weights, margin
            assert torch.equal(part[i], full[i][off:off + n]), f"offset {off}: output {i} is not the slice"
            torch.testing.assert_close(part[i].cpu(), cpu[i], **tol)
        torch.testing.assert_close(part[6], full[6][off:off + n] * B / n, rtol=1e-6, atol=0)
        torch.testing.assert_close(part[0].cpu(), cpu[0], **tol)
        loss_sum += part[0].item() * n
    assert abs(loss_sum / B - full[0].item()) <= 1e-5 * abs(full[0].item())


@pytest.mark.parametrize("tail", [104, 101], ids=["vec", "scalar"])
def test_bf16_multi_chunk_rows_are_deterministic(tgt, tail):
    """Rows of 3 chunks and a ragged fourth (CUDA's bf16 chunk is 16384 elements; N % 8 == 0
    takes the 16-byte path): the two-stage reduction must give the same bits on every run
    (on the harness: every block order), and the right values."""
    N = 3 * CHUNK_BF16 + tail
    cfg = AdaptiveDPOConfig.paper(flip_ratio=0.25, flip_threshold=0.0)
    inputs = make_inputs(2 if tgt.emu else 6, (N,), torch.bfloat16, K=2, seed=13)
    runs = []
    for _ in seeds(tgt):
        out, grad = run(tgt, *inputs, cfg)
        runs.append([getattr(out, f) for f in FIELDS] + [grad])
    for res in runs[1:]:
        for name, a, b in zip(FIELDS + ("grad",), runs[0], res):
            assert torch.equal(a, b), f"{name} differs between identical runs"
    check_vs_reference(tgt, *inputs, cfg, what="bf16 multi-chunk: ")


@pytest.mark.parametrize("case", list(NAN_CASES))
def test_nan_rule_matches_reference(tgt, case):
    check_nan_case(tgt.backend, case, device=tgt.device)


@pytest.mark.parametrize("N", [2 ** 30 + 17, 2 ** 30 + 32], ids=["odd-N", "N%16"])
def test_more_than_2_31_elements(tgt, N):
    gpu_only(tgt, "36 GiB of tensors and 2^31 elements a row pass; hours on CPU threads")
    check_64bit_offsets("cuda", N)


def test_opcheck_cuda_ops(tgt):
    model, ref, target, annots = make_inputs(3, (4, 8), torch.float32, K=2, shared_target=False, seed=1,
                                             requires_grad=False, device=tgt.device)
    flat = lambda x: x.reshape(x.shape[0], -1)  # noqa: E731
    mp, rp, t, an = flat(model), flat(ref), flat(target), [flat(a) for a in annots]
    torch.library.opcheck(tgt.op("mse").default, (mp, rp, t, an))
    torch.library.opcheck(tgt.op("mse").default, (mp, rp, t[:3].contiguous(), []))
    mse3 = tgt.op("mse")(mp, rp, t, an).view(4, 2, 3).contiguous()
    fp, ip = AdaptiveDPOConfig.paper(flip_ratio=0.3, flip_threshold=0.0).op_params(True)
    torch.library.opcheck(tgt.op("pairs").default, (mse3, mp.clone().requires_grad_(True), t, 0, 3, fp, ip))
    torch.library.opcheck(tgt.op("pairs_bwd").default,
                          (torch.tensor(0.5, device=tgt.device), torch.randn(3, device=tgt.device), mp, t))


def test_float64_ops_match_cpu_ops(tgt):
    """fp64 is not offered by dispatch for CUDA, but the kernels handle it: check the ops."""
    if dispatch.BACKENDS["cpu"].unavailable():
        pytest.skip("CPU extension not built")
    model, ref, target, annots = make_inputs(5, (3, 33), torch.float64, K=2, seed=2, requires_grad=False)
    flat = lambda x: x.reshape(x.shape[0], -1)  # noqa: E731
    args = [flat(model), flat(ref), flat(target), [flat(a) for a in annots]]
    dev = lambda x: x.to(tgt.device)  # noqa: E731
    cpu = torch.ops.adpo.cpu_mse(*args)
    gpu = tgt.op("mse")(*[dev(a) for a in args[:3]], [dev(a) for a in args[3]])
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-13, atol=0)
    fp, ip = AdaptiveDPOConfig.paper(flip_ratio=0.4, flip_threshold=0.0).op_params(True)
    mse3 = cpu.view(4, 2, 5).contiguous()
    c = torch.ops.adpo.cpu_pairs(mse3, args[0], args[2], 0, 5, fp, ip)
    g = tgt.op("pairs")(dev(mse3), dev(args[0]), dev(args[2]), 0, 5, fp, ip)
    for a, b in zip(g, c):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-12, atol=1e-15)
