"""pytest-benchmark entry points for the loss micro-benchmarks (not part of the test suite).

    pytest bench/test_loss_benchmark.py --benchmark-only                    # tiny on CPU, gpu suite on CUDA
    (a plain ``pytest`` from the root runs tests/ only: pytest.ini's testpaths)
    ADPO_BENCH_SUITE=cpu-sdxl pytest bench/test_loss_benchmark.py --benchmark-only -k "full"

Same providers, cases, inputs and rotation as ``python -m bench loss``; pytest-benchmark
does the statistics and its own storage (``--benchmark-autosave``).  The CSV rows and
the results page come from ``python -m bench loss`` only.
"""
import itertools
import os

import pytest
import torch

from bench import harness
from bench import loss as L

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device(os.environ.get("ADPO_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
SUITE = os.environ.get("ADPO_BENCH_SUITE", "gpu" if DEVICE.type == "cuda" else "tiny")
CASES = L.SUITES[SUITE]["cases"]


@pytest.mark.parametrize("mode", L.MODES)
@pytest.mark.parametrize("provider", L.PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.shape}-K{c.K}-{c.dtype}")
def test_loss(benchmark, case, provider, mode):
    reason = L.skip_reason(provider, DEVICE, L.DTYPES[case.dtype], case.K)
    if reason:
        pytest.skip(reason)
    from adpo_kernels import AdaptiveDPOConfig

    if provider == "compiled":
        torch._dynamo.reset()
    cfg = AdaptiveDPOConfig.paper()
    f = L.loss_fn(provider, cfg)
    cap = (4 << 30) if DEVICE.type == "cuda" else (1 << 30)
    n = harness.rotation_sets(case.set_bytes(), DEVICE, cap)
    sets = [L.make_inputs(case, DEVICE, seed) for seed in range(n)]
    # what is timed computes the right thing: errors against float64 at most 2x eager torch's + fp32 ulps
    _, lerr, gerr = L._first_call(f, sets[0], cfg, True, DEVICE)
    _, lerr_eager, gerr_eager = L._first_call(L.loss_fn("eager", cfg), sets[0], cfg, True, DEVICE)
    eps = torch.finfo(torch.float32).eps
    assert lerr <= 2 * lerr_eager + 16 * eps and gerr <= 2 * gerr_eager + 16 * eps, (lerr, gerr, lerr_eager, gerr_eager)
    with L._mode_context(provider, mode):
        call = L.mode_call(f, sets, mode)
        counter = itertools.count()

        def run():
            call(next(counter) % n)
            harness.sync(DEVICE)

        benchmark.group = f"{case.shape}-K{case.K}-{case.dtype}-{mode}"
        benchmark.extra_info.update(bytes_floor=case.bytes_floor(mode), rot_sets=n, device=str(DEVICE))
        benchmark.pedantic(run, warmup_rounds=3, rounds=20 if DEVICE.type == "cpu" else 100, iterations=1)
