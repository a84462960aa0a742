#!/usr/bin/env bash
# Everything a lent GPU machine should do, in one device call (`bash scripts/gpu_check.sh`, with
# the CUTLASS headers carried in .carry/cutlass: third_party/README.md). A lease is 15 minutes in
# all and one command at most 10, and the machine is gone 30 s after a call, so this is one call
# with a deadline: BUDGET_S (default 540 s from the start) is shared by the stages in order of
# what they tell, each capped at what is left, and a stage that cannot start in time is skipped
# and says so. Each stage appends under $OUT as it goes, so a cut-off run still returns what it
# finished. $OUT holds at most these 7 files (the device tool returns 8 at the most):
#   summary.txt build.log tests.log sanitizer.log bench.txt bench.json train.log
# Stages (STAGES, default "build test bench sanitize"): build from source with the machine's
# python3/torch; test: every CUDA test (-m cuda), then the MoE ones again with
# OSSRL_MOE_GEMM=cutlass; bench: grouped_gemm (mma vs cutlass vs torch), moe, attention at a few
# sizes (BENCHES adds more: reshard rollout loop stragglers memory mismatch serve); sanitize:
# compute-sanitizer memcheck on the MoE CUDA tests, racecheck and synccheck on attention's;
# train (opt-in): a short `ossrl train` on the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/build/gpu_out}
mkdir -p "$OUT"
STAGES=${STAGES:-"build test bench sanitize"}
BENCHES=${BENCHES:-"grouped_gemm moe attention"}
t0=$(date +%s)
deadline=$((t0 + ${BUDGET_S:-540}))
export PYTHONUNBUFFERED=1 OSSRL_CUDA=ON OSSRL_CUDA_ARCHS=${OSSRL_CUDA_ARCHS:-90a}
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
[ -d .carry/cutlass/include ] && export CUTLASS_INCLUDE_DIR=$PWD/.carry/cutlass/include
log() { echo "== $(date +%T) +$(( $(date +%s) - t0 ))s $*" | tee -a "$OUT/summary.txt"; }
# cap SECONDS: what is left before the deadline, at most SECONDS; 0 when under 20 s are left
cap() { local left=$((deadline - $(date +%s))); [ "$left" -lt 20 ] && { echo 0; return; }; echo $(( left < $1 ? left : $1 )); }
has() { [[ " $STAGES " == *" $1 "* ]]; }
site=/tmp/ossrl-site

if has build; then
  log "build ($(python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())' 2>&1))"
  python3 -m pip wheel -q --no-build-isolation --no-deps -w build/gpu_wheel . >"$OUT/build.log" 2>&1 \
    || { log "BUILD FAILED"; tail -50 "$OUT/build.log" | tee -a "$OUT/summary.txt"; exit 1; }
  rm -rf "$site" && python3 -m pip install -q --no-deps --target "$site" build/gpu_wheel/ossrl-*.whl
  log "built; $(PYTHONPATH=$site python3 -m ossrl info 2>&1 | grep -E 'CUDA kernels|CUTLASS|device')"
fi
export PYTHONPATH=$site
cd build  # import the installed package, not python/
per_test=(); python3 -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 120)

if has test; then
  s=$(cap 240)
  if [ "$s" -gt 0 ]; then
    log "CUDA tests (-m cuda, ${s}s)"
    timeout "$s" python3 -m pytest ../tests -q -ra -p no:cacheprovider "${per_test[@]}" -m cuda >"$OUT/tests.log" 2>&1
    log "CUDA tests exit $?: $(tail -1 "$OUT/tests.log")"
  else log "CUDA tests skipped: out of time"; fi
  s=$(cap 90)
  if [ "$s" -gt 0 ]; then
    echo "==== OSSRL_MOE_GEMM=cutlass tests/test_moe.py -m cuda" >>"$OUT/tests.log"
    OSSRL_MOE_GEMM=cutlass timeout "$s" python3 -m pytest ../tests/test_moe.py -q -ra -p no:cacheprovider \
      "${per_test[@]}" -m cuda >>"$OUT/tests.log" 2>&1
    log "MoE CUDA tests with OSSRL_MOE_GEMM=cutlass exit $?: $(tail -1 "$OUT/tests.log")"
  else log "cutlass rerun skipped: out of time"; fi
fi

if has bench; then
  mkdir -p /tmp/bench_json
  for b in $BENCHES; do
    [ -f ../benchmarks/bench_$b.py ] || continue
    args=()
    case $b in
      grouped_gemm) args=(--tokens 4096 16384 --experts 32 128 --repeat 10) ;;
      moe) args=(--tokens 4096 16384 --experts 32 --repeat 10 --peers grouped_mm) ;;
      memory) args=(--model small) ;;  # tiny's activations are too small to tell modes apart
    esac
    s=$(cap 150)
    [ "$s" -gt 0 ] || { log "bench_$b skipped: out of time"; continue; }
    log "bench_$b (${s}s)"
    echo "==== bench_$b ${args[*]}" >>"$OUT/bench.txt"
    timeout "$s" python3 ../benchmarks/bench_$b.py --json /tmp/bench_json/$b.json "${args[@]}" >>"$OUT/bench.txt" 2>&1
    log "bench_$b exit $?"
  done
  python3 - "$OUT/bench.json" /tmp/bench_json <<'EOF'
import json, os, sys
out, folder = sys.argv[1], sys.argv[2]
merged = {}
for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name)) as f:
        merged[name[:-5]] = json.load(f)
with open(out, "w") as f:
    json.dump(merged, f, indent=1)
EOF
fi

if has sanitize; then
  for t in test_moe_sm90 test_moe test_attention; do
    for tool in memcheck $([ $t = test_attention ] && echo racecheck synccheck); do
      s=$(cap 90)
      [ "$s" -gt 0 ] || { log "compute-sanitizer $tool $t skipped: out of time"; continue; }
      echo "==== $tool $t" >>"$OUT/sanitizer.log"
      timeout "$s" compute-sanitizer --tool $tool --error-exitcode 9 python3 -m pytest ../tests/$t.py -q -x \
        -p no:cacheprovider -m cuda >>"$OUT/sanitizer.log" 2>&1
      log "compute-sanitizer $tool $t: exit $? (9: errors found, 124: out of time)"
    done
  done
fi

if has train; then  # opt-in: the loop on the GPU, gpu_busy_frac per step
  s=$(cap 300)
  if [ "$s" -gt 0 ]; then
    log "ossrl train (short)"
    timeout "$s" python3 -m ossrl train --run-dir /tmp/train steps=10 sft_steps=100 >>"$OUT/train.log" 2>&1
    log "train exit $?: $(grep -c reward_mean /tmp/train/metrics.jsonl 2>/dev/null) steps logged"
  fi
fi
log "done"
