"""Direct op calls that the public loss never makes, refused alike by every fused backend.

* ``flip_ratio`` outside [0, 1] or NaN with the flip on: the quantile index ``(int)(B * (1 - r))``
  would fall outside the sorted metric (the CUDA kernel read ``m[-1]``, the C++ op ``sorted[negative]``,
  Triton thresholded at NaN).  :class:`AdaptiveDPOConfig` refuses it; the ops now do too.
* A row length N = 0 reaching the backward (the CUDA launcher got a zero-block grid; the C++ op
  returned an empty gradient) and the MSE stage: "(2B, N) with B, N > 0" everywhere.

The C++ op runs here, and so do the CUDA ops, on the CUDA-on-CPU harness (backend ``cuda_emu``: the
ops_cuda.cpp and kernels.cu a GPU runs; ``csrc/op_checks.h`` holds the checks of both); Triton runs
in the interpreter on CPU tensors.
"""
import math

import pytest
import torch

from adpo_kernels import AdaptiveDPOConfig
from adpo_kernels.config import F_FLIP_RATIO, I_FLIP
from adpo_kernels.dispatch import BACKENDS


def _backends():
    out = [pytest.param("cuda_emu", id="cuda_emu")]  # ops_cuda.cpp and kernels.cu on the CUDA-on-CPU harness
    for name in ("cpu", "triton"):
        why = BACKENDS[name].unavailable()
        if name == "triton" and not why:
            from adpo_kernels.triton import _common, mse as _mse

            if not _common.is_interpreted(_mse._mse_partial_kernel):
                why = "Triton compiles for a GPU here (TRITON_INTERPRET != 1); these CPU tensors need the interpreter"
        out.append(pytest.param(name, marks=pytest.mark.skipif(bool(why), reason=f"{name}: {why}")))
    return out


def _ops(backend):
    if backend == "cuda_emu":
        from tests import cuda_emu

        cuda_emu.load()
    ops = torch.ops.adpo
    return getattr(ops, f"{backend}_mse"), getattr(ops, f"{backend}_pairs"), getattr(ops, f"{backend}_pairs_bwd")


def _inputs(B=4, N=6, K=2):
    g = torch.Generator().manual_seed(7)
    mk = lambda: torch.randn(2 * B, N, generator=g)  # noqa: E731
    return mk(), mk(), mk(), [mk() for _ in range(K)]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("ratio", [1.5, -0.25, math.nan, math.inf])
def test_flip_ratio_out_of_range_is_refused(backend, ratio):
    mse_op, pairs_op, _ = _ops(backend)
    mp, rp, t, an = _inputs()
    mse = mse_op(mp, rp, t, an).view(4, 2, 4).contiguous()
    f, i = AdaptiveDPOConfig.paper(flip_ratio=0.25).op_params(True)
    assert i[I_FLIP] == 1
    pairs_op(mse, mp, t, 0, 4, f, i)  # in range: runs
    f[F_FLIP_RATIO] = ratio
    with pytest.raises((RuntimeError, ValueError), match=r"flip_ratio must be in \[0, 1\] when flip is on"):
        pairs_op(mse, mp, t, 0, 4, f, i)
    i[I_FLIP] = 0  # flip off: the ratio is not read
    pairs_op(mse, mp, t, 0, 4, f, i)


@pytest.mark.parametrize("backend", _backends())
def test_zero_length_rows_are_refused_by_every_stage(backend):
    mse_op, _, bwd_op = _ops(backend)
    empty = torch.empty(8, 0)
    with pytest.raises((RuntimeError, ValueError), match=r"with B, N > 0"):
        mse_op(empty, empty.clone(), empty.clone(), [])
    with pytest.raises((RuntimeError, ValueError), match=r"with B, N > 0"):
        bwd_op(torch.tensor(1.0), torch.randn(4), empty, empty.clone())
    mp, _, t, _ = _inputs()
    assert bwd_op(torch.tensor(1.0), torch.randn(4), mp, t).shape == mp.shape  # N > 0: runs
