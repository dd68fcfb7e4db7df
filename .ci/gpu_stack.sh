#!/usr/bin/env bash
# CI leg (issue 14): rehearse the GPU machine's software stack on this GPU-less machine.
#
# A second virtual environment with the GPU machine's versions (torch 2.11.0+cu130, triton 3.6.0,
# transformers 5.17, accelerate 1.15; see bench/README.md "The GPU machine"), a copy of the
# working tree (so the in-tree build of `make test` is left alone), then:
#   1. both extensions build (CPU alone first, then with CUDA forced, sm_90 only),
#   2. every Triton kernel variant compiles natively for sm_90 with triton 3.6 (`_aot`, both cores:
#      about 2 minutes with a cold Triton cache; ADPO_GPU_STACK_AOT=quick for a representative subset),
#   3. the kernel tests pass in triton 3.6's interpreter,
#   4. the trainer's smoke test passes with transformers 5.17 / accelerate 1.15, and its FSDP2 path
#      (2 processes, bf16, DCP checkpoints) with torch 2.11,
#   5. bench/gpu_check.sh runs as a dry run.
# The venv is cached under $ADPO_CI_CACHE (default ~/.cache/adpo-ci) and brought to the pins below
# when they change; a clean machine creates it (4.7 GB from the registry, 91 s on a quiet machine).
# The whole leg with the venv cached: 3 minutes on the shared 2-core machine at load 3, 7.5 at load 8.
#
#   bash .ci/gpu_stack.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
CACHE=${ADPO_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/adpo-ci}
VENV=$CACHE/venv-gpu-stack
SRC=$CACHE/src-gpu-stack
PY=$VENV/bin/python
# The GPU machine's image as read there (2026-11): keep in step with bench/README.md. numpy is
# older than its 2.5.2 on purpose: with numpy >= 2.4, triton 3.6's interpreter (only a test tool
# here; the GPU never uses it) fails on every loop whose bound is not a constexpr ("only
# 0-dimensional arrays can be converted to Python scalars").
PINS=(torch==2.11.0 triton==3.6.0 transformers==5.17.0 accelerate==1.15.0 huggingface_hub==1.33.0
      safetensors==0.8.0 peft==0.21.2 diffusers==0.42.1 numpy==2.3.5 pytest pytest-timeout pytest-xdist
      hypothesis ninja setuptools wheel pillow tqdm pyarrow matplotlib)
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=9.0 ADPO_CUDA_ARCHS=9.0
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
unset ADPO_FORCE_CUDA ADPO_SKIP_CUDA_BUILD

t_all=$SECONDS
stage() { echo "== gpu-stack: $* (+$((SECONDS - t_all))s)"; }

# setuptools stays the venv's own (65.x with Python 3.11): the editable builds below then prove
# pyproject.toml builds with an old setuptools, as the GPU machine's image may have one.
# 0. the venv: made on a clean machine, brought to the pins when they change, else reused
stage "venv $VENV"
if [ "$(cat "$VENV/.adpo-pins" 2>/dev/null)" != "${PINS[*]}" ] || ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -c "import torch" 2>/dev/null || { rm -rf "$VENV"; mkdir -p "$CACHE"; python3 -m venv "$VENV"; }
    rm -f "$VENV/.adpo-pins"
    "$PY" -m pip install -q "${PINS[@]}" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    echo "${PINS[*]}" >"$VENV/.adpo-pins"
fi
"$PY" -c "import sys, numpy, torch, triton, transformers, accelerate; print('python', sys.version.split()[0], 'numpy', numpy.__version__, 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"

# 1. a copy of the tracked and untracked-not-ignored files; the copy keeps its build/ between
#    runs so ninja recompiles only what changed (tar keeps modification times)
stage "source copy $SRC"
mkdir -p "$SRC"
find "$SRC" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
git ls-files -z --cached --others --exclude-standard | xargs -0 -r ls -d 2>/dev/null | tar -cf - -T - | tar -xf - -C "$SRC"
cd "$SRC"

# 2. build: CPU extension alone, then CPU + CUDA (nvcc failing must not hide the CPU build)
stage "build: CPU extension"
ADPO_SKIP_CUDA_BUILD=1 "$PY" -m pip install -q -e . --no-build-isolation --no-deps
"$PY" -c "import adpo_kernels._C"
stage "build: CUDA extension (forced, sm_90)"
ADPO_FORCE_CUDA=1 "$PY" -m pip install -q -e . --no-build-isolation --no-deps
"$PY" -c "import adpo_kernels._C, adpo_kernels._C_cuda"
"$PY" -m adpo_kernels.info > "$CACHE/info.txt" && head -n 40 "$CACHE/info.txt"   # no pipe: head exiting early would fail it

# 3. the Triton kernels, natively for sm_90 (ptxas from the triton 3.6 wheel); failures and spills print
stage "Triton kernels for sm_90 with triton 3.6"
aot=(); [ "${ADPO_GPU_STACK_AOT:-}" = quick ] && aot=(--quick)
TRITON_INTERPRET=0 "$PY" -m adpo_kernels.triton._aot --arch 90 "${aot[@]}" | { grep -v '^ok ' || true; }

# 4. the kernel tests in the interpreter, and the trainer's smoke test
stage "kernel tests (triton 3.6 interpreter) and the trainer smoke test"
TRITON_INTERPRET=1 TORCHINDUCTOR_CACHE_DIR=$CACHE/inductor-gpu-stack "$PY" -m pytest -q -p no:cacheprovider \
    -n 2 --durations=10 tests/test_triton.py tests/test_cuda_kernels.py tests/test_cpu_kernels.py tests/test_build.py \
    tests/test_gpu_check.py "tests/test_train_toy.py::test_embedded_default_shortened" \
    "tests/test_train_fsdp.py::test_fsdp_trains_in_bf16" -k "not cuda_emu"   # the harness runs in make test

# 5. the GPU check's dry run: the same steps and summary layout as on the GPU machine
stage "bench/gpu_check.sh dry run"
out=$(mktemp -d)
ADPO_CHECK_DRYRUN=1 OUT=$out PYTHON=$PY bash bench/gpu_check.sh
n=$(ls "$out" | wc -l)
rm -rf "$out"
[ "$n" -le 8 ] || { echo "gpu_check.sh dry run wrote $n files into OUT (the device tool returns 8)"; exit 1; }

cd "$REPO"
stage "done in $((SECONDS - t_all))s"
