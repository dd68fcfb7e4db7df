#!/usr/bin/env bash
# CI legs: the CUDA kernels on the CUDA-on-CPU harness (csrc/cuda_emu) under AddressSanitizer
# (memcheck: out-of-bounds and use-after-free on every global access) and ThreadSanitizer
# (racecheck: unsynchronised accesses between the threads of a block, shared memory included).
#
# Each leg builds the harness's ops with -fsanitize=address or =thread (tests/cuda_emu.py, cached
# by source hash), preloads the sanitizer's runtime into Python and runs a bounded subset of the
# cuda_emu parity matrix: every dtype; the vector and the scalar paths (odd N, misaligned views);
# B = 1, N = 1, several chunks; K up to 15 (two reduction launches); flip + margin; the offset
# path over 700 pairs (the scalar stage's B > 512 loop); fp64; determinism over block orders.
# Not opcheck: it imports triton, whose extension aborts under ASan's __cxa_throw interceptor.
# The whole cuda_emu matrix but opcheck (122 tests) was clean under both on 2026-12-07 (ASan 4 min,
# TSan 10 min: too long for every run).
# The first report ends the process (halt_on_error), so a finding fails the leg.  The harness's
# own proof that it catches a race and a heap overflow is tests/test_cuda_emu.py (in make test).
# About 4.5 minutes for both legs on the 2-core AMD EPYC dev machine (2026-12-07: ASan 62 s, TSan
# 188 s, builds cached; a cold build adds about a minute).  torch runs on one thread (sanitizer_env);
# the TSan leg starts with address-space randomisation off (run_prefix: gcc 12 TSan and some layouts).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${VENV:-.venv}/bin/python"
# the backends these tests need; not triton, whose extension aborts under ASan (.ci/run requires it)
export ADPO_REQUIRE_BACKENDS=cpu,cuda-built
SUBSET='cuda_emu and (
    (test_grid_matches_reference and (paper or emu-flip-torch or all-opts or ipo-linear))
    or (test_awkward_shapes and (B1 or odd-N or N1 or chunks))
    or test_misaligned or (test_bitwise and float32) or (test_many_annotators and 15)
    or (test_offset and float32) or test_float64_matches or (test_bf16_multi_chunk and scalar)
    or (test_nan_rule and flip-nan-last))'
SUBSET=$(echo "$SUBSET" | tr '\n' ' ' | tr -s ' ')
for san in address thread; do
    echo "== ADPO_CUDA_EMU_SANITIZER=$san"
    env_line=$("$PY" -c "import shlex, sys; from tests import cuda_emu
env = cuda_emu.sanitizer_env(sys.argv[1], {})
print(' '.join(f'{k}={shlex.quote(v)}' for k, v in env.items()))" "$san")
    start=$(date +%s)
    prefix=$("$PY" -c "import sys; from tests import cuda_emu; print(' '.join(cuda_emu.run_prefix(sys.argv[1])))" "$san")
    eval $prefix env $env_line "$PY" -m pytest -q -p no:cacheprovider --capture=sys tests/test_cuda_kernels.py -k "\"$SUBSET\""
    echo "== $san leg: $(( $(date +%s) - start )) s"
done
