#!/usr/bin/env bash
# Builds the ossrl wheel and installs it into a fresh virtual environment.
#   scripts/install.sh [VENV]      (default .venv; OSSRL_EXTRAS=test adds the test dependencies,
#                                   bench the benchmarks' peers; a comma list such as test,bench both)
# The wheel is built in build/env (torch, scikit-build-core, nvidia-cutlass headers) without
# build isolation, so it links against the same torch release that it is installed beside.
# CUDA kernels are compiled when nvcc is found (CUDA_HOME or /usr/local/cuda): OSSRL_CUDA=ON
# makes a failed CUDA compile fatal, OFF skips it. OSSRL_CUDA_ARCHS picks the architectures.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$root/.venv}
torch_req=${OSSRL_TORCH:-torch==2.14.1}
py=${PYTHON:-python3}
cd "$root"

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
if [ -z "${OSSRL_CUDA:-}" ]; then
  if [ -n "${CUDA_HOME:-}" ]; then export OSSRL_CUDA=ON; else export OSSRL_CUDA=AUTO; fi
fi
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}

echo "== build environment (build/env)"
[ -x build/env/bin/python ] || "$py" -m venv build/env
build/env/bin/pip install -q --disable-pip-version-check "$torch_req" numpy \
  "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.28" ninja nvidia-cutlass==4.2.0.0

echo "== wheel (OSSRL_CUDA=$OSSRL_CUDA)"
rm -rf build/wheelhouse
start=$(date +%s)
build/env/bin/pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps \
  -w build/wheelhouse . --config-settings=build-dir=build/wheel
echo "built $(ls build/wheelhouse) in $(( $(date +%s) - start ))s"

echo "== fresh environment $venv"
rm -rf "$venv"
"$py" -m venv "$venv"
wheel=$(ls build/wheelhouse/ossrl-*.whl)
extras=${OSSRL_EXTRAS:+[$OSSRL_EXTRAS]}
"$venv/bin/pip" install -q --disable-pip-version-check "$torch_req" "ossrl$extras @ file://$root/$wheel"
"$venv/bin/ossrl" info
