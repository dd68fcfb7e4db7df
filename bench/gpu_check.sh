#!/usr/bin/env bash
# The GPU check: build, GPU tests, loss benchmark and (when present) a short trainer
# benchmark, on a fresh GPU machine, in under 9 minutes, with a short summary printed last.
#
#   ADPO_GIT_SHA=$(git rev-parse --short=12 HEAD) OUT=/tmp/gpu_check bash bench/gpu_check.sh
#
# Expects only the GPU machine's image (python3 with torch, triton, pytest, pytest-benchmark,
# accelerate, peft, transformers; nvcc under /usr/local/cuda; no network). diffusers is not
# in that image: download its wheel here first, into the git-ignored folder .wheels/:
#
#   pip download --no-deps diffusers==0.42.1 -d .wheels
#
# and carry .wheels with the working tree. Writes into $OUT (default ./gpu_check_out):
#   gpu_check.log  step-by-step log with timings     build.log  pip install -e . output
#   tests.log      pytest tests -q -rs               bench.log  benchmark output
#   loss.csv       loss rows                         train.csv  trainer rows (if bench/train.py)
#   summary.txt    the tables printed at the end
# Then, on a machine with the repository: python -m bench import $OUT/loss.csv $OUT/train.csv
# Exit status: 0 when every step passed.
# ADPO_CHECK_DRYRUN=1 rehearses the plumbing on a machine without a GPU: no install, no
# build, no tests, the loss benchmark on the tiny CPU suite (tests/test_bench.py runs it).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
BUDGET=${ADPO_CHECK_BUDGET:-530}   # seconds for everything; the caller's limit is 9 minutes
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/adpo_inductor_cache}
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
unset TRITON_INTERPRET

declare -a SUMMARY=()
FAILED=0
log() { echo "[$(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$OUT/gpu_check.log"; }

DRY=${ADPO_CHECK_DRYRUN:-0}
LOSS_ARGS=(--suite gpu --quick)
[ "$DRY" = 1 ] && LOSS_ARGS=(--suite tiny --device cpu --providers eager,triton,cuda --modes full)

# step NAME CAP_S RESERVE_S LOGFILE CMD...: runs CMD with a timeout of min(CAP, time left - RESERVE)
step() {
    local name=$1 cap=$2 reserve=$3 logf=$4
    shift 4
    local left=$((BUDGET - SECONDS - reserve))
    local t=$((cap < left ? cap : left))
    if [ "$t" -lt 10 ]; then
        log "$name: SKIPPED, no time left"
        SUMMARY+=("$(printf '%-10s %-8s %5ss  %s' "$name" skipped 0 'no time left in the budget')")
        return 0
    fi
    log "$name: start (timeout ${t}s): $*"
    local t0=$SECONDS rc
    if [ "$DRY" = 1 ] && [ "$name" != loss ]; then
        SUMMARY+=("$(printf '%-10s %-8s %5ss  %s' "$name" dry-run 0 "$*")")
        return 0
    fi
    timeout --kill-after=10 "$t" "$@" >>"$OUT/$logf" 2>&1
    rc=$?
    local status=ok
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=TIMEOUT; FAILED=1
    elif [ $rc -ne 0 ]; then status="FAIL($rc)"; FAILED=1; fi
    local detail
    detail=$(grep -v '^\s*$' "$OUT/$logf" | tail -n 1 | cut -c1-90)
    log "$name: $status after $((SECONDS - t0))s"
    SUMMARY+=("$(printf '%-10s %-8s %5ss  %s' "$name" "$status" "$((SECONDS - t0))" "$detail")")
}

log "gpu_check in $PWD, output in $OUT, budget ${BUDGET}s, git ${ADPO_GIT_SHA:-unknown}"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name())"
} >>"$OUT/gpu_check.log" 2>&1

# 1. diffusers, carried as a wheel (the machine has no network)
whl=$(ls .wheels/diffusers-*.whl 2>/dev/null | head -n 1)
if [ -n "$whl" ]; then
    step diffusers 60 400 build.log $PY -m pip install -q --no-index --no-deps --no-compile "$whl"
else
    log "diffusers: no .wheels/diffusers-*.whl in the working tree: tests that need diffusers will fail or skip"
    SUMMARY+=("$(printf '%-10s %-8s %5ss  %s' diffusers MISSING 0 'carry .wheels/ (see the header of this script)')")
    # a rehearsal installs nothing, so only a real run fails on the missing wheel
    [ "$DRY" = 1 ] || FAILED=1
fi

# 2. the extension (CPU + CUDA), the way the README says
step build 150 300 build.log $PY -m pip install -e . --no-build-isolation --no-deps --no-index -v
$PY -m adpo_kernels.info >>"$OUT/build.log" 2>&1 || true
$PY -c "import adpo_kernels as ak; [print(f'backend {k}:', v or 'usable') for k, v in ak.available_backends().items()]" \
    >>"$OUT/build.log" 2>&1 || true
grep '^backend ' "$OUT/build.log" | tee -a "$OUT/gpu_check.log"

# 3. the whole test suite: on this machine nothing GPU is skipped (-rs lists any skip)
step tests 150 280 tests.log $PY -m pytest tests -q -rs -p no:cacheprovider

# 4. the loss benchmark at issue 3's GPU shapes; cases not started within its budget are
#    written as skipped rows, so the CSV is complete either way
lt=$((BUDGET - SECONDS - 150)); [ "$lt" -gt 130 ] && lt=130
step loss 130 150 bench.log $PY -m bench loss "${LOSS_ARGS[@]}" --results-dir "$OUT" \
    --time-budget $((lt > 60 ? lt - 50 : 10)) --note "bench/gpu_check.sh"

# 5. the trainer benchmark, shortened (issue 6), when it exists
if [ -f bench/train.py ]; then
    step train 150 10 bench.log $PY -m bench train --quick --results-dir "$OUT" --note "bench/gpu_check.sh"
else
    SUMMARY+=("$(printf '%-10s %-8s %5ss  %s' train absent 0 'bench/train.py not written yet (issue 6)')")
fi

# 6. the summary, last
{
    echo
    echo "== gpu_check: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1), git ${ADPO_GIT_SHA:-unknown}, ${SECONDS}s"
    printf '%-10s %-8s %6s  %s\n' step status time "last line of its log"
    for s in "${SUMMARY[@]}"; do echo "$s"; done
    grep '^backend ' "$OUT/build.log" 2>/dev/null
    echo
    $PY -m bench summary --results-dir "$OUT" 2>&1
} | tee "$OUT/summary.txt"
exit $FAILED
