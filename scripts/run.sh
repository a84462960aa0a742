#!/usr/bin/env bash
# The main job, from nothing: builds and installs ossrl into .venv, then runs `ossrl train`
# (the embedded default: a tiny GPT-OSS-architecture model learns a multi-turn calculator task
# on the CPU) and writes its curves. Extra arguments go to `ossrl train` (e.g. steps=80).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/install.sh" "$root/.venv"
exec "$root/.venv/bin/ossrl" train --run-dir "${OSSRL_RUN_DIR:-$root/runs/default}" "$@"
