#!/usr/bin/env bash
# CI leg: the kernel and loss tests under the lower CPU instruction sets.
#
# `make test` runs everything on the machine's best ISA (AVX-512 where present).  Here the
# same kernel/loss tests run again with ATEN_CPU_CAPABILITY=avx2 and =default, which force
# torch and the C++ kernels (adpo_kernels._C dispatches on the same variable) down to the
# AVX2 and the portable builds.  tests/conftest.py fails the session if the C++ kernels did
# not follow the variable, and prints the ISA that ran.  Each capability gets its own
# Inductor cache: the cache does not keep ISAs apart (ENVIRONMENT.md).  The trainer tests
# run once, natively, in `make test`.  About 7.5 minutes for both capabilities on the shared
# 2-core dev machine (162 s of CPU time; 2026-11-30), cold Inductor caches included.
set -euo pipefail
cd "$(dirname "$0")/.."
export ADPO_REQUIRE_BACKENDS=${ADPO_REQUIRE_BACKENDS:-cpu,triton}
TESTS=(tests/test_reference.py tests/test_validation.py tests/test_dispatch.py tests/test_cpu_kernels.py
       tests/test_triton.py tests/test_sync_stats.py tests/test_cuda_kernels.py tests/test_tolerance.py)
# the sm_90 code generation test does not depend on the host ISA: make test runs it once; nor do the
# CUDA kernels on the CUDA-on-CPU harness (compiled for plain x86-64 whatever ATEN_CPU_CAPABILITY says)
DESELECT=(--deselect tests/test_triton.py::test_kernels_compile_natively_for_sm90 -k "not cuda_emu")
cache_root=$(mktemp -d)
trap 'rm -rf "$cache_root"' EXIT
caps=(default)
grep -qw avx2 /proc/cpuinfo && caps=(avx2 default)   # x86-64 without AVX2: only the portable build
for cap in "${caps[@]}"; do
    echo "== ATEN_CPU_CAPABILITY=$cap"
    ATEN_CPU_CAPABILITY=$cap TORCHINDUCTOR_CACHE_DIR="$cache_root/$cap" \
        "${VENV:-.venv}/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}" "${DESELECT[@]}"
done
