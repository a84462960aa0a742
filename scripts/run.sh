#!/usr/bin/env bash
# The main job, from nothing: builds and installs ossrl into .venv, then runs the MoE
# microbenchmark on this machine (ours vs the peers, one process, same inputs).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
OSSRL_EXTRAS=test "$root/scripts/install.sh" "$root/.venv"
exec "$root/.venv/bin/python" "$root/benchmarks/bench_moe.py" "$@"
