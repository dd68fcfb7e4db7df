"""The CUDA-on-CPU harness can fail: deliberately broken copies of csrc/cuda/kernels.cu are caught.

Each case edits one line of the real kernels.cu, builds the torch-free driver
``csrc/cuda_emu/selftest.cpp`` on it (plain, under ASan or under TSan: tests/cuda_emu.py), runs it,
and asserts that the harness or the sanitizer reports the defect and names the kernel.  The
unedited kernels.cu runs clean in the same three builds, so each report is the edit's doing.
(The parity matrix on the harness is in tests/test_cuda_kernels.py, target ``cuda_emu``.)
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests import cuda_emu

KERNELS_CU = os.path.join(cuda_emu.CSRC, "cuda", "kernels.cu")
BLOCK_SUM_STORE = "if (lane == 0) sh[warp] = v;\n  __syncthreads();"
SCALAR_LOOP = "for (int64_t i = threadIdx.x; i < len; i += MSE_THREADS) {\n      const A d"

# name: (the line as it is, as it is broken)
EDITS = {
    # the block reduction reads the warps' partial sums before every warp has written its own
    "removed-barrier": (BLOCK_SUM_STORE, "if (lane == 0) sh[warp] = v;"),
    # the scalar path of stage 1 reads one element past the end of each row chunk
    "tail-read": (SCALAR_LOOP, SCALAR_LOOP.replace("i < len", "i <= len")),
    # the launcher takes the 16-byte path without checking the target's alignment
    "misaligned-vector-load": ("bool vec = N % (16 / elem_size(dt)) == 0 && aligned16(target);",
                               "bool vec = N % (16 / elem_size(dt)) == 0;"),
    # thread 0 skips the block reduction's first barrier
    "divergent-barrier": (BLOCK_SUM_STORE, BLOCK_SUM_STORE.replace("__syncthreads();", "if (threadIdx.x != 0) __syncthreads();")),
    # a shuffle that leaves lane 31 out of its mask
    "partial-mask": ("__shfl_down_sync(0xffffffffu", "__shfl_down_sync(0x7fffffffu"),
    # one lane of every warp of stage 2 returns before the warp's shuffles
    "lane-returns-early": ("if (row >= rows) return;  // the whole warp leaves together",
                           "if (row >= rows || lane == 31) return;"),
    # stage 1 blocks of rows 2k and 2k + 1 write the same partial: the result depends on block order
    "order-dependent": ("partials[((first + t) * R + r) * nchunks + c] = sum;",
                        "partials[((first + t) * R + (r & ~(int64_t)1)) * nchunks + c] = sum;"),
}


def source(edit: str | None = None) -> str:
    with open(KERNELS_CU) as f:
        text = f.read()
    if edit is None:
        return text
    old, new = EDITS[edit]
    assert text.count(old) == 1, f"{edit}: the line to break is not (once) in kernels.cu any more: {old!r}"
    return text.replace(old, new)


def run(edit: str | None, san: str, *args: str, seed: int = 0) -> subprocess.CompletedProcess:
    exe = cuda_emu.build_selftest(source(edit), san, name=edit or "unedited")
    env = cuda_emu.clean_env()
    env.update(ADPO_CUDA_EMU_SEED=str(seed), ADPO_CUDA_EMU_TIMEOUT_S="60",
               ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:exitcode=86", TSAN_OPTIONS="halt_on_error=1:exitcode=66")
    return subprocess.run([*cuda_emu.run_prefix(san), exe, *args], capture_output=True, text=True, env=env, timeout=300)


def output(r: subprocess.CompletedProcess) -> str:
    return f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[:6000]}"


# mse: 4 rows of 1024 fp32 (the 16-byte path), or 3 rows of 1001 (the scalar path); a B = 700 scalar stage
CASES = (("mse", "f32", "4", "1024"), ("mse", "bf16", "3", "1001"), ("bwd", "f16", "4", "1000"),
         ("bwd", "f32", "2", "33"), ("pairs", "700", "2"))


@pytest.mark.parametrize("san", ["", "address", "thread"], ids=["plain", "asan", "tsan"])
def test_unedited_kernels_run_clean(san):
    for case in CASES:
        r = run(None, san, *case)
        assert r.returncode == 0 and r.stdout.strip().endswith("ok") and "Sanitizer" not in r.stderr, \
            f"{' '.join(case)}: {output(r)}"


def test_removed_barrier_is_a_race_for_tsan():
    r = run("removed-barrier", "thread", "mse", "f32", "4", "1024")
    assert r.returncode == 66 and "WARNING: ThreadSanitizer: data race" in r.stderr, output(r)
    assert "block_sum" in r.stderr and "mse_partial_kernel" in r.stderr, output(r)


def test_tail_read_one_past_the_end_is_a_heap_overflow_for_asan():
    r = run("tail-read", "address", "mse", "f32", "3", "1001")  # N odd: the scalar path
    assert r.returncode == 86 and "ERROR: AddressSanitizer: heap-buffer-overflow" in r.stderr, output(r)
    assert "READ of size 4" in r.stderr and "mse_partial_kernel" in r.stderr, output(r)


def test_misaligned_vector_load_is_caught():
    ok = run("misaligned-vector-load", "", "mse", "f32", "4", "1024")  # aligned inputs: the edit is harmless
    assert ok.returncode == 0, output(ok)
    r = run("misaligned-vector-load", "", "mse", "f32", "4", "1024", "1")  # target one float off
    assert r.returncode == 2 and "misaligned 16-byte load (__ldg)" in r.stdout, output(r)
    assert "kernel mse_partial_kernel<scalar_t, kVec>" in r.stdout, output(r)


def test_divergent_barrier_is_caught_as_a_deadlock():
    r = run("divergent-barrier", "", "mse", "f32", "4", "1024")
    assert r.returncode == 2 and "deadlock: every thread of the block is blocked" in r.stdout, output(r)
    assert "255 wait at __syncthreads" in r.stdout and "mse_partial_kernel" in r.stdout, output(r)


def test_partial_shuffle_mask_is_refused():
    r = run("partial-mask", "", "mse", "f32", "4", "1024")
    assert r.returncode == 2 and "__shfl_down_sync with mask 0x7fffffff" in r.stdout, output(r)


def test_shuffle_after_a_lane_returned_is_refused():
    r = run("lane-returns-early", "", "mse", "f32", "4", "1024")
    assert r.returncode == 2 and "mse_combine_kernel" in r.stdout, output(r)
    assert "lane(s) of the warp returned" in r.stdout or "returned while other lanes" in r.stdout, output(r)


def test_zero_block_grid_is_an_invalid_configuration():
    """The N = 0 backward of issue 22 (before op_checks.h refused it) reached a zero-block launch."""
    r = run(None, "", "bwd", "f32", "4", "0")
    assert r.returncode == 2 and "invalid configuration argument (grid 0 x 1 x 1" in r.stdout, output(r)
    assert "pairs_bwd_kernel" in r.stdout, output(r)


def test_block_order_changes_with_the_seed():
    """A result that depends on block order shows on the harness: the shuffled order changes with
    ADPO_CUDA_EMU_SEED (and the unedited kernels give the same result under every order)."""
    got = set()
    for seed in range(6):
        r = run("order-dependent", "", "mse", "f32", "8", "1024", seed=seed)
        assert r.returncode == 1, output(r)  # rows 1, 3, ... are never written
        got.add(next(line for line in r.stdout.splitlines() if line.startswith("values: ")).split()[1])
    assert len(got) > 1, f"every seed ran the blocks in the same order: {got}"
    outs = {run(None, "", "mse", "f32", "8", "1024", seed=seed).stdout for seed in range(3)}
    assert len(outs) == 1, outs


def test_a_sanitizer_build_needs_its_runtime_preloaded():
    """ADPO_CUDA_EMU_SANITIZER without the runtime first in the process is a clear error, not a
    crash inside the dynamic loader."""
    code = "from tests import cuda_emu; cuda_emu.load()"
    env = dict(cuda_emu.clean_env(), ADPO_CUDA_EMU_SANITIZER="address")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cuda_emu.ROOT)
    assert r.returncode != 0 and "needs the libasan.so runtime loaded before Python starts" in r.stderr, r.stderr[-2000:]
    env["ADPO_CUDA_EMU_SANITIZER"] = "memory"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cuda_emu.ROOT)
    assert r.returncode != 0 and "ADPO_CUDA_EMU_SANITIZER: expected 'address', 'thread' or unset" in r.stderr
