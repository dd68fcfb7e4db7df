#!/usr/bin/env bash
# The GPU check: one command on a fresh GPU machine that returns answers within 9 minutes.
#
#   ADPO_GIT_SHA=$(git rev-parse --short=12 HEAD) OUT=/tmp/gpu_check bash bench/gpu_check.sh
#
# bench/README.md ("The GPU check") says what to carry (the diffusers wheel in .wheels/), the
# device tool's one command, and what a first run should show.  Steps, each under its own
# timeout carved from a ${ADPO_CHECK_BUDGET:-500} s budget so that every later step keeps its
# minimum:
#   versions      nvidia-smi, nvcc, ninja, python, torch, triton, ... (into gpu_check.log)
#   diffusers     pip install --no-deps of the carried wheel
#   build-cpu     the C++ extension alone (ADPO_SKIP_CUDA_BUILD=1): an nvcc failure cannot hide it
#   build-cuda    then the CUDA extension (ADPO_FORCE_CUDA=1, ADPO_CUDA_ARCHS=$TORCH_CUDA_ARCH_LIST)
#   kernel-tests  tests/test_cuda_kernels.py tests/test_triton.py, first, -v, JUnit XML
#   tests         the rest of tests/
#   loss, train   python -m bench loss --suite gpu --quick; python -m bench train --quick
# Files in $OUT (at most 8, the device tool's limit; each written as the step runs):
#   gpu_check.log versions and step log   build.log        both pip builds
#   tests.log     both pytest runs (-v)   kernel_tests.xml JUnit XML of the kernel tests
#   bench.log     benchmark output        loss.csv, train.csv  rows for `python -m bench import`
#   summary.txt   the summary printed last: benchmark tables, step table, failing tests
# pytest is stopped with SIGINT (it still prints its summary and writes its XML) and each test
# has its own limit (pytest-timeout); a test that was running when a step was killed is named
# too.  Exit status: 0 when every step passed.
# ADPO_CHECK_DRYRUN=1 rehearses the plumbing without a GPU (tests/test_bench.py, .ci/gpu_stack.sh):
# nothing is installed or built, pytest only collects the kernel tests, the loss step runs the
# tiny CPU suite;
# the summary has the same layout.
set -uo pipefail
PY=${PYTHON:-python3}
SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)
# pytest under `timeout -s INT`: a command started in the background by a non-interactive shell
# (as a remote runner may) inherits SIGINT ignored, and pytest would then be killed without its
# summary, so this gives SIGINT back to Python; and once pytest has written its summary and XML
# it exits at once (os._exit), not after joining compile workers that `--kill-after` would cut
# off anyway.  `bash bench/gpu_check.sh --pytest ARGS` runs it alone (tests/test_gpu_check.py).
PYTEST=($PY -c "import os, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); import pytest; \
rc = int(pytest.main(sys.argv[1:])); sys.stdout.flush(); sys.stderr.flush(); os._exit(rc)")
if [ "${1:-}" = --pytest ]; then shift; exec "${PYTEST[@]}" "$@"; fi
cd "$SCRIPT_DIR/.."

# failing_tests LOG: one line per failed, erroring, timed-out or interrupted test of a pytest -v
# -rA log, read from its verbose lines and its short summary, so that a run killed before
# its summary still names them.
failing_tests() {
    awk '
    function add(id, what) { if (!(id in seen)) order[++n] = id; if (what != "" || !(id in seen)) seen[id] = what }
    function stopped() { if (running != "") add(running, "INTERRUPTED " running " (running when the step was stopped)"); running = "" }
    # -rA short summary: "FAILED tests/x.py::t - message" (ERROR: a fixture or collection error)
    /^(FAILED|ERROR) tests\// {
        id = $2; msg = $0; sub(/^[A-Z]+ [^ ]+( - )?/, "", msg)
        add(id, ((msg ~ /Timeout/) ? "TIMEOUT" : $1) " " id (msg != "" ? " - " substr(msg, 1, 120) : "")); next }
    # pytest-xdist -v: "[gw0] [ 10%] FAILED tests/x.py::t"
    /^\[gw[0-9]+\] \[ *[0-9]+%\] (FAILED|ERROR) tests\// { add($NF, ""); if (seen[$NF] == "") seen[$NF] = $(NF-1) " " $NF; next }
    # -v: "tests/x.py::t " as a test starts; its outcome ends that line (or a later one after uncaptured output)
    /^tests\/[^ ]+::[^ ]+/ { running = $1 }
    match($0, / (PASSED|SKIPPED|XFAIL|XPASS|FAILED|ERROR)( \(.*\))? +\[ *[0-9]+%\] *$/) {
        word = substr($0, RSTART + 1); sub(/ .*/, "", word)
        if (running != "" && (word == "FAILED" || word == "ERROR")) { add(running, ""); if (seen[running] == "") seen[running] = word " " running }
        running = ""; next }
    /^== / { stopped() }   # the next step of gpu_check.sh begins: the test before was cut off
    END { stopped(); for (i = 1; i <= n; i++) print seen[order[i]] }' "$@"
}

# `bash bench/gpu_check.sh --failing-tests LOG...` runs the parser alone (tests/test_gpu_check.py)
if [ "${1:-}" = --failing-tests ]; then shift; failing_tests "$@"; exit; fi

OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
BUDGET=${ADPO_CHECK_BUDGET:-500}   # seconds for the steps; the command's limit is 540 (9 minutes)
DRY=${ADPO_CHECK_DRYRUN:-0}
export PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export ADPO_CUDA_ARCHS=${ADPO_CUDA_ARCHS:-$TORCH_CUDA_ARCH_LIST}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/adpo_inductor_cache}
# the machine has no network; its python may be an "externally managed" system one
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1
# the in-tree build (pip install -e) is imported even if pip fails after building
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ "$DRY" = 1 ] || unset TRITON_INTERPRET

declare -a STEPS=()
FAILED=0
log() { echo "[$(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$OUT/gpu_check.log"; }
row() { STEPS+=("$(printf '%-13s %-9s %5ss  %s' "$1" "$2" "$3" "$4")"); }

# step NAME CAP_S RESERVE_S LOGFILE SIGNAL CMD...: runs CMD with a timeout of
# min(CAP, budget left - RESERVE), RESERVE being what the later steps keep at least (their
# minimums: build-cuda 30, kernel-tests 100, tests 60, loss 70, train 80, the summary 10 s).
step() {
    local name=$1 cap=$2 reserve=$3 logf=$4 sig=$5
    shift 5
    local left=$((BUDGET - SECONDS - reserve))
    local t=$((cap < left ? cap : left))
    if [ "$t" -lt 10 ]; then
        log "$name: SKIPPED, no time left"
        row "$name" skipped 0 "no time left in the budget"
        FAILED=1
        return 0
    fi
    log "$name: start (timeout ${t}s): $*"
    echo "== $name: $*" >>"$OUT/$logf"
    local t0=$SECONDS rc status=ok
    if [ "$DRY" = 1 ] && [ "$name" != loss ] && [ "$name" != kernel-tests ]; then
        local cmd="$*"
        row "$name" dry-run 0 "${cmd:0:100}"
        return 0
    fi
    timeout -s "$sig" --kill-after=8 "$t" "$@" >>"$OUT/$logf" 2>&1
    rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=TIMEOUT; FAILED=1
    elif [ $rc -ne 0 ]; then status="FAIL($rc)"; FAILED=1; fi
    local detail
    detail=$(grep -v '^\s*$' "$OUT/$logf" | tail -n 1 | cut -c1-100)
    log "$name: $status after $((SECONDS - t0))s"
    row "$name" "$status" "$((SECONDS - t0))" "$detail"
}

log "gpu_check in $PWD, output in $OUT, budget ${BUDGET}s, git ${ADPO_GIT_SHA:-unknown}, dry run ${DRY}"
{
    echo "== versions"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tail -n +2
    echo "nvcc: $("$CUDA_HOME/bin/nvcc" --version 2>&1 | grep -i release || echo "not found under CUDA_HOME=$CUDA_HOME")"
    echo "ninja: $(ninja --version 2>&1 || echo 'not on PATH')"
    $PY -c "
import importlib.metadata as md, sys
import torch
print('python', sys.version.split()[0], sys.executable)
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ('triton', 'numpy', 'setuptools', 'pip', 'ninja', 'transformers', 'accelerate', 'peft', 'diffusers', 'safetensors', 'pytest', 'pytest-timeout', 'pytest-xdist'):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, 'not installed')
" 2>&1
} | tee -a "$OUT/gpu_check.log"

# diffusers, carried as a wheel (the machine has no network)
whl=$(ls .wheels/diffusers-*.whl 2>/dev/null | head -n 1)
if [ -n "$whl" ]; then
    step diffusers 30 380 build.log TERM $PY -m pip install -q --no-index --no-deps --no-compile "$whl"
elif $PY -c "import diffusers" 2>/dev/null; then
    row diffusers ok 0 "already installed"
else
    log "diffusers: no .wheels/diffusers-*.whl in the working tree: the trainer's tests will fail"
    row diffusers MISSING 0 "carry .wheels/ (bench/README.md, The GPU check)"
    [ "$DRY" = 1 ] || FAILED=1   # a rehearsal installs nothing
fi

# the extensions: CPU alone first, so that an nvcc failure cannot take it down too
pip_e=($PY -m pip install -e . --no-build-isolation --no-deps --no-index -v)
step build-cpu 60 350 build.log TERM env ADPO_SKIP_CUDA_BUILD=1 "${pip_e[@]}"
step build-cuda 120 320 build.log TERM env ADPO_FORCE_CUDA=1 "${pip_e[@]}"
$PY -m adpo_kernels.info >>"$OUT/build.log" 2>&1
$PY -c "import adpo_kernels as ak; [print(f'backend {k}:', v or 'usable') for k, v in ak.available_backends().items()]" \
    >>"$OUT/build.log" 2>&1
grep '^backend ' "$OUT/build.log" | tee -a "$OUT/gpu_check.log"

# the tests: kernel tests first, -v so names appear as they run, -rA so the summary names every
# outcome; SIGINT lets pytest print its summary and write its XML; each test its own limit
pytest_args=(-v -rA --durations=25 -p no:cacheprovider)
$PY -c "import pytest_timeout" 2>/dev/null && pytest_args+=(--timeout=100)
[ "$DRY" = 1 ] && pytest_args=(-qq --collect-only -p no:cacheprovider)   # collects the kernel tests only
KERNEL_TESTS=(tests/test_cuda_kernels.py tests/test_triton.py)
step kernel-tests 140 220 tests.log INT "${PYTEST[@]}" "${pytest_args[@]}" --junitxml="$OUT/kernel_tests.xml" \
    "${KERNEL_TESTS[@]}"
# the rest in parallel when pytest-xdist is there (the machine has 16 cores), 2 threads each
rest_args=()
[ "$DRY" != 1 ] && $PY -c "import xdist" 2>/dev/null && rest_args=(-n 6)
step tests 90 160 tests.log INT env OMP_NUM_THREADS=2 "${PYTEST[@]}" "${pytest_args[@]}" "${rest_args[@]}" tests \
    $(printf -- '--ignore=%s ' "${KERNEL_TESTS[@]}")

# the loss benchmark at the GPU goal's shapes; cases not started within --time-budget, or cut
# off by the step's timeout (SIGTERM), are written as skipped rows, so the CSV is complete
LOSS_ARGS=(--suite gpu --quick)
[ "$DRY" = 1 ] && LOSS_ARGS=(--suite tiny --device cpu --providers eager,triton,cuda --modes full)
lt=$((BUDGET - SECONDS - 90)); [ "$lt" -gt 100 ] && lt=100
step loss 100 90 bench.log TERM $PY -m bench loss "${LOSS_ARGS[@]}" --results-dir "$OUT" \
    --time-budget $((lt > 60 ? lt - 40 : 15)) --note "bench/gpu_check.sh"

# the trainer benchmark, shortened; on SIGTERM it writes the variants left as skipped rows
if [ "$DRY" = 1 ]; then
    step train 130 10 bench.log TERM $PY -m bench train --quick --results-dir "$OUT" --note "bench/gpu_check.sh"
else
    tt=$((BUDGET - SECONDS - 10)); [ "$tt" -gt 130 ] && tt=130
    step train 130 10 bench.log TERM $PY -m bench train --quick --results-dir "$OUT" \
        --time-budget $((tt > 60 ? tt - 45 : 15)) --note "bench/gpu_check.sh"
fi

# the summary, last: benchmark tables, then the steps, then every test that did not pass
{
    echo
    echo "== benchmarks (python -m bench summary --results-dir OUT)"
    $PY -m bench summary --results-dir "$OUT" 2>&1 | tail -n 40
    echo
    echo "== gpu_check: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1 | grep . || echo 'no nvidia-smi')," \
         "git ${ADPO_GIT_SHA:-unknown}, ${SECONDS}s of ${BUDGET}s"
    printf '%-13s %-9s %6s  %s\n' step status time "last line of its log"
    for s in "${STEPS[@]}"; do echo "$s"; done
    grep '^backend ' "$OUT/build.log" 2>/dev/null
    fails=$(failing_tests "$OUT/tests.log" 2>/dev/null)
    echo "== tests that did not pass: $(printf '%s' "$fails" | grep -c .)"
    [ -n "$fails" ] && echo "$fails"
    echo "== gpu_check: $([ $FAILED = 0 ] && echo PASSED || echo FAILED)"
} | tee "$OUT/summary.txt"
exit $FAILED
