#!/usr/bin/env bash
# The GPU checks in one short run (at most 8 minutes), on a machine with a CUDA GPU, torch,
# triton, pytest and pytest-benchmark but no package registry:
#   1. builds and installs ddpm_fast with its CUDA kernels (for this GPU's architecture),
#   2. runs the whole test suite (the CUDA and Triton tests skipped on a CPU machine run here),
#   3. runs the benchmark suite (every fused op: q_sample, the sampler step for DDPM / DDIM /
#      DPM-Solver++ 2M and 3M and guided (2 x 128, bf16), GroupNorm + SiLU; the guided and
#      unguided 20-step loops; diffusers' pipelines when its wheel is carried),
#   4. writes OUTDIR/bench.json and the table OUTDIR/bench.md, with the logs beside them.
#
# Usage: benchmarks/gpu_check.sh OUTDIR        (run from anywhere; PYTHON picks the interpreter)
# Exit status: 0 when every stage passed, 1 when one failed or ran out of time, 2 without a GPU.
# OUTDIR/summary.txt lists each stage's status and duration.
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python}
BUDGET=${GPU_CHECK_BUDGET_S:-470}  # seconds for all stages: 8 minutes less a margin
START=$SECONDS
STATUS=0

remaining() { echo $(( BUDGET - (SECONDS - START) )); }
cap() { local r; r=$(remaining); echo $(( r < $1 ? r : $1 )); }  # min(remaining, $1)

stage() {  # stage NAME SECONDS LOG COMMAND...: runs COMMAND under a time limit, records the outcome
    local name=$1 limit=$2 log=$3 begin=$SECONDS rc
    shift 3
    if [ "$limit" -lt 10 ]; then
        echo "$name: not run (out of time)" | tee -a "$OUT/summary.txt"
        STATUS=1
        return 1
    fi
    # SIGINT first: pytest then ends the session cleanly and pytest-benchmark still writes its JSON.
    timeout -s INT -k 20 "$limit" "$@" > "$log" 2>&1
    rc=$?
    local outcome="passed"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then outcome="timed out after ${limit}s"; elif [ $rc -ne 0 ]; then outcome="failed (exit $rc)"; fi
    echo "$name: $outcome in $((SECONDS - begin))s (log: $(basename "$log"))" | tee -a "$OUT/summary.txt"
    [ $rc -eq 0 ] || STATUS=1
    return $rc
}

: > "$OUT/summary.txt"
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1
    nproc
} > "$OUT/machine.txt"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "torch ($PY) cannot be imported or sees no CUDA device: nothing to check" | tee -a "$OUT/summary.txt"
    # GPU_CHECK_DRY_RUN=1 checks this script itself on a CPU machine: no build, the installed package.
    [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ] || exit 2
fi

# 1. Build for this GPU's architecture only (the shortest nvcc run); --no-index: no registry.
cd "$REPO"
if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
    echo "build: skipped (dry run)" | tee -a "$OUT/summary.txt"
else
    ARCH=$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
    stage build "$(cap 200)" "$OUT/build.log" \
        env DDPM_FAST_BUILD_CUDA=1 DDPM_FAST_CUDA_ARCHS="$ARCH" MAX_JOBS="$(nproc)" \
        "$PY" -m pip install --no-build-isolation --no-deps --no-index -v . \
        && (cd "$OUT" && "$PY" -c "import sys; from ddpm_fast import _ext; print('extension:', _ext.loaded, 'cuda:', _ext.with_cuda, _ext.reason or ''); sys.exit(0 if _ext.with_cuda else 1)") \
            | tee -a "$OUT/summary.txt" || STATUS=1
fi

# diffusers (a test and benchmark dependency the GPU image lacks) and importlib_metadata travel as
# wheels in REPO/.whl when present (benchmarks/README.md says how to fetch them); they go to a
# private folder on PYTHONPATH. Without them the diffusers tests and benchmarks skip, saying so.
if compgen -G "$REPO/.whl/*.whl" > /dev/null; then
    SITE=$(mktemp -d)
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$REPO"/.whl/*.whl \
            > "$OUT/wheels.log" 2>&1; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        echo "wheels: installed $(ls "$REPO"/.whl | tr '\n' ' ')" | tee -a "$OUT/summary.txt"
    else
        echo "wheels: install failed (log: wheels.log)" | tee -a "$OUT/summary.txt"
    fi
fi

# 2-3. Run from OUTDIR so that the installed package is imported, not the source tree; Triton
# compiles real GPU kernels (the tests' conftest only sets the interpreter when nothing is set).
# The two suites that check GPU code on the CPU (the CUDA emulation, the offline Triton compile)
# run in CI; here the GPU itself runs the kernels, so they are left out to save device time.
cd "$OUT"
export TRITON_INTERPRET=0
# Leave the benchmarks at least 150 s.
stage tests "$(cap $(( $(remaining) - 150 )))" "$OUT/tests.log" \
    "$PY" -m pytest "$REPO/tests" -x -q -p no:cacheprovider \
    --ignore="$REPO/tests/test_cuda_emulated.py" --ignore="$REPO/tests/test_triton_compiled.py"
# The per-benchmark measuring time is short so the suite fits; 20 s stay for the report.
stage benchmarks "$(cap $(( $(remaining) - 20 )))" "$OUT/bench.log" \
    env DDPM_BENCH_TARGET_S="${DDPM_BENCH_TARGET_S:-0.15}" \
    "$PY" -m pytest "$REPO/benchmarks" --benchmark-only --benchmark-json "$OUT/bench.json" -q -p no:cacheprovider

# 4. The markdown table (also from a partial JSON, when the benchmarks ran out of time).
if [ -s "$OUT/bench.json" ]; then
    stage report 20 "$OUT/report.log" \
        "$PY" "$REPO/benchmarks/report.py" "$OUT/bench.json" -o "$OUT/bench.md" \
        --title "ddpm_fast benchmarks on $("$PY" -c "import torch; print(torch.cuda.get_device_name())" 2>/dev/null || echo "no GPU")"
else
    echo "report: no bench.json was written" | tee -a "$OUT/summary.txt"
    STATUS=1
fi
echo "total: $((SECONDS - START))s, status $STATUS" | tee -a "$OUT/summary.txt"
exit $STATUS
