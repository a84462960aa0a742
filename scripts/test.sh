#!/usr/bin/env bash
# The test command: builds the wheel, installs it into a fresh virtual environment and runs the
# test suite against the installed package (not the source tree). CUDA tests run where a GPU is.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${OSSRL_TEST_VENV:-$root/build/test-venv}
OSSRL_EXTRAS=test "$root/scripts/install.sh" "$venv"
cd "$root/build"  # away from python/: `import ossrl` must find the installed wheel
"$venv/bin/python" -m pytest "$root/tests" -q -ra -p no:cacheprovider "$@"
