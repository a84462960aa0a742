#!/usr/bin/env bash
# Everything a lent GPU machine should do, in one command (device tool: `bash scripts/gpu_check.sh`).
# Builds from source with the machine's own python3/torch, runs the whole test suite (CUDA tests
# included), short compute-sanitizer runs, then every benchmark. Each stage appends to files under
# $OUT as it goes, so a run cut off at its time limit still returns what it finished.
# Stages can be picked: STAGES="build test sanitize bench train" (default: all but train).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/build/gpu_out}
mkdir -p "$OUT"
STAGES=${STAGES:-"build test sanitize bench"}
export PYTHONUNBUFFERED=1 OSSRL_CUDA=ON OSSRL_CUDA_ARCHS=${OSSRL_CUDA_ARCHS:-90a}
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
# CUTLASS headers travel in .carry/cutlass (see third_party/README.md) when a kernel needs them.
[ -d .carry/cutlass/include ] && export CUTLASS_INCLUDE_DIR=$PWD/.carry/cutlass/include
log() { echo "== $(date +%T) $*" | tee -a "$OUT/summary.txt"; }
site=/tmp/ossrl-site

if [[ " $STAGES " == *" build "* ]]; then
  log "build ($(python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'))"
  start=$(date +%s)
  python3 -m pip wheel -q --no-build-isolation --no-deps -w build/gpu_wheel . >"$OUT/build.log" 2>&1 \
    || { log "BUILD FAILED"; tail -50 "$OUT/build.log" | tee -a "$OUT/summary.txt"; exit 1; }
  rm -rf "$site" && python3 -m pip install -q --no-deps --target "$site" build/gpu_wheel/ossrl-*.whl
  log "built in $(( $(date +%s) - start ))s"
fi
export PYTHONPATH=$site
cd build  # import the installed package, not python/

if [[ " $STAGES " == *" test "* ]]; then
  log "tests"
  per_test=(); python3 -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 120)  # if the plugin is there
  timeout 420 python3 -m pytest ../tests -q -ra -p no:cacheprovider "${per_test[@]}" -x >"$OUT/tests.log" 2>&1
  log "tests exit $?: $(tail -1 "$OUT/tests.log")"
  # the MoE CUDA tests again with every eligible GEMM on the CUTLASS sm90 kernels
  OSSRL_MOE_GEMM=cutlass timeout 180 python3 -m pytest ../tests/test_moe.py -q -ra -p no:cacheprovider \
    "${per_test[@]}" -k cuda >"$OUT/tests_cutlass.log" 2>&1
  log "tests with OSSRL_MOE_GEMM=cutlass exit $?: $(tail -1 "$OUT/tests_cutlass.log")"
fi

if [[ " $STAGES " == *" sanitize "* ]]; then
  for t in test_moe test_moe_sm90 test_attention test_reshard; do
    for tool in memcheck $([ $t = test_attention ] && echo racecheck synccheck); do
      timeout 240 compute-sanitizer --tool $tool --error-exitcode 9 python3 -m pytest ../tests/$t.py -q -x \
        -p no:cacheprovider -k "cuda or cutlass" >>"$OUT/sanitizer.log" 2>&1
      log "compute-sanitizer $tool $t: exit $?"
    done
  done
fi

if [[ " $STAGES " == *" bench "* ]]; then
  for b in grouped_gemm moe attention reshard rollout loop stragglers memory mismatch serve; do
    [ -f ../benchmarks/bench_$b.py ] || continue
    extra=(); [ $b = memory ] && extra=(--model small)  # tiny's activations are too small to tell modes apart
    log "bench_$b"
    timeout 300 python3 ../benchmarks/bench_$b.py --json "$OUT/bench_$b.json" "${extra[@]}" >>"$OUT/bench.txt" 2>&1
    log "bench_$b exit $?"
  done
fi
if [[ " $STAGES " == *" train "* ]]; then  # opt-in: the loop on the GPU, gpu_busy_frac per step
  log "ossrl train (short)"
  timeout 300 python3 -m ossrl train --run-dir "$OUT/train" steps=10 sft_steps=100 >>"$OUT/train.log" 2>&1
  log "train exit $?: $(grep -c reward_mean "$OUT/train/metrics.jsonl" 2>/dev/null) steps logged"
fi
log "done"
