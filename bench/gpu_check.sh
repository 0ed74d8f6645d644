#!/usr/bin/env bash
# One prepared GPU session: CUDA tests (kernels first), then the benchmarks.
#
#   bench/gpu_check.sh [OUT]          OUT defaults to $OUT, else bench/results/gpu
#
# Everything goes to $OUT/gpu_check.log; benchmark JSON is written to (or copied into) $OUT.
# Each step runs under its own `timeout` and a failing step does not stop the others; no step runs
# past an overall deadline of 8 minutes (GPU_CHECK_DEADLINE seconds). Nothing here changes the
# GPU's clocks or settings.
set -u

OUT=${1:-${OUT:-bench/results/gpu}}
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_check.log"
: >"$LOG"

export TRITON_INTERPRET=0      # compiled kernels; tests/conftest.py only enables the interpreter without CUDA
export PERK_FAST_BACKEND=auto
export PYTHONUNBUFFERED=1
START=$(date +%s)
STAMP="$OUT/.gpu_check_start"
touch "$STAMP"
SUMMARY=()

log() { echo "$*" | tee -a "$LOG"; }

DEADLINE=${GPU_CHECK_DEADLINE:-480}   # seconds for the whole script; a step never runs past it

# step NAME LIMIT_SECONDS COMMAND...   (the limit is cut to what is left before DEADLINE)
step() {
    local name=$1 limit=$2
    shift 2
    local t0 left
    t0=$(date +%s)
    left=$((DEADLINE - (t0 - START)))
    if [ "$left" -lt 20 ]; then
        log "=== [$name] skipped: ${left}s left before the ${DEADLINE}s deadline"
        SUMMARY+=("$name: skipped (out of time)")
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    log "=== [$name] start, limit ${limit}s: $*"
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    local took=$(($(date +%s) - t0))
    [ "$rc" -eq 124 ] && log "=== [$name] TIMED OUT after ${limit}s"
    log "=== [$name] rc=$rc in ${took}s (elapsed $(($(date +%s) - START))s)"
    SUMMARY+=("$name: rc=$rc ${took}s")
}

environment() {
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv
    git -C "$REPO" rev-parse HEAD 2>/dev/null || echo "commit: unknown (no .git)"
    python - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton missing:", e)
EOF
}

# install perk_fast (its kernels are the subpackage perk_fast/kernels) when it is not importable
# (no network: no deps, no build isolation); as a last resort, a symlink shim on PYTHONPATH.
ensure_package() {
    python -c "import perk_fast.kernels.lora" 2>/dev/null && { echo "perk_fast importable"; return 0; }
    pip install --no-deps --no-build-isolation -q -e . && python -c "import perk_fast.kernels.lora" && return 0
    local shim="$OUT/.shim/perk_fast"
    rm -rf "$OUT/.shim" && mkdir -p "$shim"
    for f in "$REPO"/perk_fast/*; do ln -s "$f" "$shim/"; done
    echo "using shim $OUT/.shim"
}

export REPO OUT
export -f environment ensure_package  # `timeout` runs programs, not shell functions
step environment 20 bash -c environment
step install 60 bash -c ensure_package
if ! python -c "import perk_fast.kernels.lora" 2>/dev/null && [ -d "$OUT/.shim" ]; then
    export PYTHONPATH="$OUT/.shim${PYTHONPATH:+:$PYTHONPATH}"
fi

# 1. the kernels' CUDA tests, one config per kernel (autotuning would multiply compile time)
step "lora kernel CUDA tests" 120 env PERK_FAST_AUTOTUNE=0 \
    python -m pytest -q -rs -p no:cacheprovider -m requires_cuda tests/test_lora_kernels.py
# 2. the whole suite on the CUDA machine (`make test` must pass there too: tests that force the Triton
#    backend run on CUDA tensors there, and the requires_cuda tests run)
step "whole test suite on CUDA" 150 env PERK_FAST_AUTOTUNE=0 \
    python -m pytest -q -rs -p no:cacheprovider -x tests --ignore=tests/test_lora_kernels.py
# 3. inference cost against in-context answering, Qwen2.5-0.5B shape, 8K and 32K tokens
step "bench inference" 70 python bench/inference.py --device cuda --preset qwen2.5-0.5b --dtype bfloat16 \
    --lengths 8192,32768 --questions 1,16 --out "$OUT"
# 4. batched meta-training / encoding throughput against the reference approach
step "bench throughput" 60 python bench/throughput.py --device cuda --preset qwen2.5-0.5b --dtype bfloat16 \
    --segments 8 --segment-len 256 --train-batches 1,4,16 --encode-batches 1,8,32 --out "$OUT"
# 5. the main benchmark on the GPU
step "bench inner_loop" 60 python bench/inner_loop.py --preset gpt2 --device cuda --out "$OUT"
# 6. kernel benchmarks (autotuned; stops starting new cases after --time-budget)
step "bench lora_kernels" 60 python bench/lora_kernels.py --out "$OUT" --time-budget 40
step "bench linear_ce" 30 python bench/linear_ce.py --out "$OUT"
# 7. with time to spare: the whole LoRA test grid on the GPU (fp32/fp64 against the twin)
step "lora kernel full grid on CUDA" 300 env PERK_FAST_AUTOTUNE=0 \
    python -m pytest -q -x -p no:cacheprovider tests/test_lora_kernels.py

# benchmarks that write into bench/results/ rather than --out: copy what this run produced
find bench/results -maxdepth 1 -name '*.json' -newer "$STAMP" -exec cp {} "$OUT/" \; 2>/dev/null
rm -f "$STAMP"

log "=== summary (total $(($(date +%s) - START))s)"
for s in "${SUMMARY[@]}"; do log "  $s"; done
