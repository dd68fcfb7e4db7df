#!/usr/bin/env bash
# CI leg: what a user's `pip install` gives them (issue 13).  From a clean copy of the tree:
# the sdist and the wheel built with build isolation on (no torch in the build: a pure
# wheel carrying csrc/), a wheel built from that sdist too, both checked with `unzip -l`;
# then the wheel installed into a fresh virtual environment that has the project's torch,
# where the cpu backend must be built just in time, once, and give the same bits as the
# prebuilt kernels of the development environment.  Last, a wheel built against torch
# (--no-build-isolation) must carry the compiled module and report it as prebuilt.
#
# The fresh environment gets torch through a .pth line pointing at a view of .venv that holds
# only torch, numpy, ninja and their dependencies (.ci/torch_view.py): a new venv with its
# own torch 2.14.1 would cost ~2 min and 5.8 GB, and a .pth to the whole of .venv would
# expose the editable adpo_kernels.  The leg checks the installed copy is the one imported.
# Takes about 4 min on the 2-core CI machine (CPU and CUDA JIT builds, a CPU build at wheel time).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEV_PY=${DEV_PY:-$ROOT/.venv/bin/python}
START=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/adpo-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
say() { echo "[wheel $(( $(date +%s) - START ))s] $*"; }
fail() { echo "wheel leg FAILED: $*" >&2; exit 1; }

say "clean copy of the tree (no build/, no compiled module, no build metadata)"
mkdir -p "$WORK/src" "$WORK/dist" "$WORK/dist-from-sdist"
git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf - \
    | tar -xf - -C "$WORK/src"

say "fresh venv with the project's torch (view of .venv: torch + deps only)"
"$DEV_PY" -m venv "$WORK/venv"
V=$WORK/venv/bin
"$DEV_PY" .ci/torch_view.py "$WORK/torchview" torch numpy ninja
SITE=$("$V/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$WORK/torchview" > "$SITE/_adpo_ci_torch_view.pth"
"$V/pip" uninstall -q -y setuptools  # the venv's own 65.x would shadow the view's, which torch requires
"$V/pip" check > /dev/null || { "$V/pip" check; fail "the torch view is incomplete"; }
"$V/pip" install -q build > "$WORK/pip.log" 2>&1 || { cat "$WORK/pip.log"; fail "pip install build"; }

say "sdist and wheel, build isolation on"
(cd "$WORK/src" && "$V/python" -m build --sdist --outdir "$WORK/dist" . > "$WORK/sdist.log" 2>&1) \
    || { tail -20 "$WORK/sdist.log"; fail "sdist build"; }
(cd "$WORK/src" && "$V/pip" wheel -q --no-deps -w "$WORK/dist" . > "$WORK/wheel.log" 2>&1) \
    || { tail -20 "$WORK/wheel.log"; fail "pip wheel ."; }
"$V/pip" wheel -q --no-deps -w "$WORK/dist-from-sdist" "$WORK"/dist/adpo_kernels-*.tar.gz > "$WORK/wheel2.log" 2>&1 \
    || { tail -20 "$WORK/wheel2.log"; fail "pip wheel of the sdist"; }
WHL=$(ls "$WORK"/dist/adpo_kernels-*.whl)
SDIST=$(ls "$WORK"/dist/adpo_kernels-*.tar.gz)
say "built $(basename "$WHL") and $(basename "$SDIST")"
[[ $(basename "$WHL") == *-py3-none-any.whl ]] || fail "an isolated build should make a pure wheel: $WHL"
unzip -l "$WHL" | awk 'NR>3 {print $4}' | grep . | sort > "$WORK/wheel.files"
unzip -l "$WORK"/dist-from-sdist/*.whl | awk 'NR>3 {print $4}' | grep . | sort > "$WORK/wheel2.files"
tar -tzf "$SDIST" | sed 's|^[^/]*/||' | sort > "$WORK/sdist.files"
diff "$WORK/wheel.files" "$WORK/wheel2.files" || fail "the wheel built from the sdist differs from the one built from the tree"
for f in $(cd "$ROOT/csrc" && git ls-files); do
    grep -qx "adpo_kernels/csrc/$f" "$WORK/wheel.files" || fail "wheel lacks adpo_kernels/csrc/$f"
    grep -qx "csrc/$f" "$WORK/sdist.files" || fail "sdist lacks csrc/$f"
done
for f in adpo_kernels/_build_info.json adpo_kernels/_jit.py adpo_kernels/_recipe.py adpo_train/cli.py bench/__main__.py; do
    grep -qx "$f" "$WORK/wheel.files" || fail "wheel lacks $f"
done
! grep -E '\.(so|o)$' "$WORK/wheel.files" "$WORK/sdist.files" || fail "a compiled file leaked into the wheel or sdist"
unzip -p "$WHL" '*.dist-info/METADATA' > "$WORK/METADATA"
unzip -p "$WHL" '*.dist-info/entry_points.txt' > "$WORK/entry_points.txt"
grep -q '^Requires-Dist: torch<=2.14.1,>=2.11' "$WORK/METADATA" || fail "torch range missing from METADATA"
grep -q '^adpo-train = adpo_train.cli:main' "$WORK/entry_points.txt" || fail "entry point"

say "install the wheel (its dependencies come from the torch view)"
"$V/pip" install -q --no-index "$WHL"  # no index: the dependencies must already be there
cd "$WORK"  # not the repo: only the installed copy can be imported
"$V/python" - "$SITE" <<'PY'
import importlib.util, sys, adpo_kernels
assert adpo_kernels.__file__.startswith(sys.argv[1]), f"imported {adpo_kernels.__file__}, not the installed wheel"
assert importlib.util.find_spec("adpo_kernels._C") is None, "the wheel holds a compiled module"
PY

export TORCH_EXTENSIONS_DIR=$WORK/ext
say "two processes at once, on an empty cache: one builds (one line on stderr), the other waits"
PIDS=()
for i in 1 2; do
    "$V/python" "$ROOT/.ci/wheel_check.py" --expect jit-built,jit-cached --out "$WORK/jit$i.pt" \
        > "$WORK/first$i.json" 2> "$WORK/first$i.err" &
    PIDS+=($!)
done
for i in 1 2; do wait "${PIDS[$((i - 1))]}" || { cat "$WORK/first$i.err"; fail "process $i"; }; done
cat "$WORK"/first*.json
[ "$(cat "$WORK"/first*.err | grep -c '^adpo_kernels: building the C++ CPU kernels just in time')" = 1 ] \
    || { cat "$WORK"/first*.err; fail "expected exactly one build announcement"; }
[ "$(cat "$WORK"/first*.json | grep -c '"origin": "jit-built"')" = 1 ] || fail "expected exactly one jit-built"
LOG=$(ls "$TORCH_EXTENSIONS_DIR"/*/adpo_kernels/cpu-*/build.log)
SO=$(ls "$TORCH_EXTENSIONS_DIR"/*/adpo_kernels/cpu-*/build/_C.so)
STAMP=$(stat -c %Y.%s "$LOG" "$SO")

say "a third process reuses the build"
"$V/python" "$ROOT/.ci/wheel_check.py" --expect jit-cached > "$WORK/third.json" 2> "$WORK/third.err"
cat "$WORK/third.json"
! grep -q building "$WORK/third.err" || fail "the third process announced a build"
[ "$STAMP" = "$(stat -c %Y.%s "$LOG" "$SO")" ] || fail "the build log or module changed: it was rebuilt"

say "the JIT-built kernels give the prebuilt kernels' bits and ISA (dev env, editable install)"
"$DEV_PY" "$ROOT/.ci/wheel_check.py" --expect prebuilt --out "$WORK/pre.pt"
"$V/python" - "$WORK/jit1.pt" "$WORK/pre.pt" <<'PY'
import sys, torch
a, b = (torch.load(f) for f in sys.argv[1:])
assert a["isa"] == b["isa"], (a["isa"], b["isa"])
for dt, outs in a["outputs"].items():
    for k, x in outs.items():
        assert torch.equal(x, b["outputs"][dt][k]), f"{dt} {k} differs from the prebuilt kernels"
print("same bits, ISA", a["isa"])
PY
if grep -q avx2 /proc/cpuinfo; then
    ATEN_CPU_CAPABILITY=avx2 "$V/python" -c "import adpo_kernels as ak
assert ak.available_backends(detail=True)['cpu']['origin'] == 'jit-cached'
assert ak._C.cpu_isa() == 'avx2', ak._C.cpu_isa(); print('ATEN_CPU_CAPABILITY=avx2: avx2 kernels, same cached build')"
fi

if [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
    say "the wheel's csrc/ copy is enough for the CUDA build too (compiled and loaded, no GPU needed)"
    ADPO_CUDA_ARCHS=9.0 "$V/python" -c "
import torch
from adpo_kernels import _jit
rec = _jit.build('cuda')
_jit._import_as('_C_cuda', rec['path'])
assert rec['csrc'].startswith('$SITE'), rec['csrc']
assert all(torch._C._dispatch_has_kernel_for_dispatch_key(f'adpo::cuda_{s}', 'CUDA') for s in ('mse', 'pairs', 'pairs_bwd'))
print('CUDA kernels JIT-built in', rec['build_seconds'], 's from', rec['csrc'])" 2>&1 | grep -v '^adpo_kernels: building'
fi

say "python -m adpo_kernels.info reports the JIT path"
"$V/python" -m adpo_kernels.info > "$WORK/info.txt"
cat "$WORK/info.txt"
grep -q "^    from: JIT-built earlier, reused from the cache .*$SO; log: $LOG" "$WORK/info.txt" || fail "info: JIT path"
grep -q "adpo_kernels._C: not built: torch was not importable at build time" "$WORK/info.txt" || fail "info: build metadata"

say "ADPO_JIT=0 with an empty cache: the torch reference, and info says why"
TORCH_EXTENSIONS_DIR=$WORK/ext-off ADPO_JIT=0 "$V/python" -m adpo_kernels.info > "$WORK/info-off.txt"
grep -q "  cpu: unavailable: no prebuilt adpo_kernels._C .*ADPO_JIT=0" "$WORK/info-off.txt" || { cat "$WORK/info-off.txt"; fail "info: ADPO_JIT=0"; }
say "pip wheel --no-build-isolation (torch importable): a platform wheel with the compiled module, reported as prebuilt"
(cd "$WORK/src" && ADPO_FORCE_CUDA=0 ADPO_SKIP_CUDA_BUILD=1 "$DEV_PY" -m pip wheel -q --no-build-isolation --no-deps \
    -w "$WORK/dist-prebuilt" . > "$WORK/wheel3.log" 2>&1) || { tail -20 "$WORK/wheel3.log"; fail "pip wheel --no-build-isolation"; }
PRE=$(ls "$WORK"/dist-prebuilt/adpo_kernels-*.whl)
[[ $(basename "$PRE") != *-py3-none-any.whl ]] || fail "a build against torch should make a platform wheel: $PRE"
unzip -Z1 "$PRE" > "$WORK/prebuilt.files"   # not piped into grep -q: its early exit fails the pipe
grep -q 'adpo_kernels/_C\.cpython.*\.so$' "$WORK/prebuilt.files" || fail "the platform wheel lacks adpo_kernels/_C"
"$V/pip" install -q --no-index --no-deps --force-reinstall "$PRE"
"$V/python" "$ROOT/.ci/wheel_check.py" --expect prebuilt --out "$WORK/pre-wheel.pt"
"$V/python" -c "import sys, torch; a, b = (torch.load(f) for f in sys.argv[1:])
assert all(torch.equal(x, b['outputs'][d][k]) for d, o in a['outputs'].items() for k, x in o.items())" \
    "$WORK/jit1.pt" "$WORK/pre-wheel.pt" || fail "prebuilt wheel and JIT build differ"
say "ok ($(( $(date +%s) - START )) s)"
