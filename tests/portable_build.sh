#!/usr/bin/env bash
# The portable build (CSGD_EXT_NATIVE_ARCH=0: no -march=native) checked against torch SGD, once, in CI.
#
# Builds the extension into a temporary directory, puts it beside a copy of the package, checks that this copy
# is the one Python loads (host code built for baseline x86-64: build_info says simd=sse2), then runs the
# equivalence file and the CPU-copy test against it. Skipped, saying so, only where no C++ compiler is present.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if ! command -v "${CXX:-g++}" >/dev/null 2>&1 && ! command -v c++ >/dev/null 2>&1; then
  echo "portable build: SKIPPED: no C++ compiler on this machine"
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s)
mkdir -p "$tmp/pkg"
cp -r csgd_ext "$tmp/pkg/"
rm -f "$tmp/pkg/csgd_ext/"_C*.so
CSGD_EXT_NATIVE_ARCH=0 CSGD_EXT_NO_CUDA=1 "$PY" setup.py -q build_ext --build-lib "$tmp/lib" \
  --build-temp "$tmp/build" > "$tmp/build.log" 2>&1 || { tail -40 "$tmp/build.log"; exit 1; }
cp "$tmp/lib/csgd_ext/"_C*.so "$tmp/pkg/csgd_ext/"
export PYTHONPATH="$tmp/pkg${PYTHONPATH:+:$PYTHONPATH}"
root="$(pwd)"
cd "$tmp"  # not the checkout: Python puts the working directory first on its path
"$PY" - "$tmp/pkg" <<'PYEOF'
import os, sys, torch, csgd_ext, csgd_ext._C
info = torch.ops.csgd_ext.build_info()
where = os.path.dirname(csgd_ext._C.__file__)
assert where.startswith(sys.argv[1]), f"the portable build is not the one loaded: {where}"
assert "simd=sse2" in info, f"not a portable (baseline x86-64) build: {info}"
print(f"portable build: {info}; CPU kernel copy: {torch.ops.csgd_ext.cpu_kernel_isa()}")
PYEOF
"$PY" -m pytest -q -p no:cacheprovider "$root/tests/test_optim_sgd_equivalence.py" "$root/tests/test_cpu_isa.py"
echo "portable build: passed in $(( $(date +%s) - start )) s"
