#!/usr/bin/env bash
# Developer build without a wheel: compiles ossrl._C into build/dev-NAME and lays out an
# importable package there (the sources copied, the module beside them).
#   scripts/dev_build.sh NAME            then: PYTHONPATH=build/dev-NAME/pkg pytest tests/...
# OSSRL_CUDA=ON|OFF|AUTO (default OFF here: CUDA compiles are slow); OSSRL_AREAS=moe,attention
# limits the kernels compiled, so one area builds while another is half-written.
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:-main}
b=build/dev-$name
py=${PYTHON:-python}
# CUDA C++20 needs CMake >= 3.28: prefer the one installed beside the Python (pip's cmake).
pybin=$(dirname "$(command -v "$py")")
[ -x "$pybin/cmake" ] && export PATH="$pybin:$PATH"
cmake -S . -B "$b" -G Ninja -DPython_EXECUTABLE="$(command -v "$py")" \
  -DOSSRL_CUDA="${OSSRL_CUDA:-OFF}" -DOSSRL_AREAS="${OSSRL_AREAS:-all}" \
  -DSKBUILD_PROJECT_VERSION=0.0.0.dev >/dev/null
cmake --build "$b"
mkdir -p "$b/pkg"
rm -rf "$b/pkg/ossrl"
cp -r python/ossrl "$b/pkg/ossrl"
cp "$b"/_C*.so "$b/pkg/ossrl/"
echo "built: PYTHONPATH=$b/pkg"
