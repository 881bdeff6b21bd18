#!/usr/bin/env bash
# One-shot GPU check for a lent H100/H200 (no network): build, test, benchmark, sanitize; a table last.
#
#   bash benchmarks/step/gpu_check.sh [OUTDIR] [--dry-run]
#
# OUTDIR defaults to $OUT, else ./gpu_out. Every step logs to its own file in a scratch directory; a failed step
# is recorded and the later steps still run, so one run yields everything. OUTDIR receives three files only (the
# device tool brings back a handful): gpu_check.tar.gz (every log, JSON and benchmark table), summary.md and
# results.json, refreshed after every step of a GPU run (marked partial until the end), so a run killed from
# outside still returns the steps it finished. A time budget (GPU_CHECK_BUDGET_S, default 520 s: one 600 s
# device command with margin; keep it 30 s under the command's timeout) bounds the whole run: each step gets
# min(its cap, time left), and a step is skipped when less than its minimum is left.
#
# Steps (GPU), in the order they run (by value: what the lease is for comes first):
#   facts          nvidia-smi, versions (torch, triton, nvcc, compute-sanitizer), SMs, capability -> facts.json
#   build          TORCH_CUDA_ARCH_LIST from the device's capability (sm_90 on an H200), MAX_JOBS=nproc,
#                  python3 setup.py build_ext --inplace (no pip, no network; pip -e --no-index fallback only
#                  when setup.py fails before compiling anything)
#   build_check    csgd_ext.available_backends("cuda")["native"] is None; the cubins (cuobjdump) are for the
#                  device's architecture alone (sm_90 on an H200), else FAIL
#   tests_gpu      python3 -m pytest -m gpu tests (native CUDA and compiled Triton) -> tests_gpu.xml
#   bench          benchmarks/step/gpu_bench.py: fused SGD vs native vs Triton, eager and CUDA graph, copy BW
#                  (bench_retry: the same without a contender that left CUDA unusable, if one did)
#   host_overhead  benchmarks/step/host_overhead.py: host time of CSGD.step on ResNet-50's 161 tensors
#   small_step     benchmarks/step/gpu_small_step.py --backend native,triton without a sanitizer: unaligned
#                  (storage-offset) tensors, every cluster path, against the reference
#   memcheck_native / racecheck_native / memcheck_triton
#                  compute-sanitizer on the same small step (skipped on gVisor, where the tool refuses the
#                  device); PYTORCH_NO_CUDA_MEMORY_CACHING=1 so out-of-bounds accesses are seen
#   bench_extra    (if time is left) ResNet-56 training step, merged vs unmerged inference latency
#   triton_suite   (if time is left) tests/test_triton_backend.py on CUDA (its non-gpu-marked tests)
#   summary        the table (printed last), summary.md, results.json
#
# torch-pruning (planning, used by the latency benchmark) is not on the lent machine: when it does not import,
# the pure-Python wheel carried in benchmarks/step/wheels/ is put on PYTHONPATH (imported from the zip, nothing is
# installed). No test needs it.
#
# --dry-run (CPU machine, CI): the device's setup reproduced (the installed torch-pruning and mlxtend hidden), then
# the same steps, each checked without a GPU, in three parallel lanes: the scripts run in their CPU/tiny modes
# (native CPU kernel, Triton interpreter), pytest -m gpu --collect-only (once with torch-pruning hidden and no
# wheel: the count must equal the count with it), setup.py byte-compiled, not built; steps that would repeat
# another's work are reported as SKIP with the reason.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python3}"
DRY=0
OUTDIR=""
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $a" >&2; exit 2 ;;
    *) OUTDIR="$a" ;;
  esac
done
FINAL="${OUTDIR:-${OUT:-./gpu_out}}"
mkdir -p "$FINAL" || exit 2
FINAL="$(cd "$FINAL" && pwd)"
# every step writes here; FINAL gets the archive and the summary at the end
OUTDIR="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")" || exit 2
BUDGET="${GPU_CHECK_BUDGET_S:-520}"
START=$(date +%s)
STEPS="$OUTDIR/steps.tsv"
MAIN_LOG="$OUTDIR/gpu_check.log"
: > "$STEPS"
: > "$MAIN_LOG"
rm -f "$OUTDIR/DRY_RUN"
if [ "$DRY" = 1 ]; then
  touch "$OUTDIR/DRY_RUN"
  export OMP_NUM_THREADS=1  # tiny CPU work, steps in parallel: no OpenMP oversubscription
fi

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this tree's csgd_ext and benchmarks
export PYTHONUNBUFFERED=1
# nvcc, compute-sanitizer, cuobjdump; the interpreter's own bin (ninja for torch's extension build)
[ -d /usr/local/cuda/bin ] && export PATH="$PATH:/usr/local/cuda/bin"
PYBIN=$(dirname "$(command -v "$PY" 2>/dev/null || echo /usr/bin/python3)")
export PATH="$PATH:$PYBIN"
unset CSGD_EXT_NO_NATIVE CSGD_EXT_NO_CUDA TRITON_INTERPRET
BASE_PYTHONPATH="$PYTHONPATH"
if [ "$DRY" = 1 ]; then
  # the lent machine's setup: no torch-pruning, no mlxtend (a package that refuses to import hides this machine's)
  for pkg in torch_pruning mlxtend; do
    mkdir -p "$OUTDIR/hidden_pkgs/$pkg"
    echo "raise ImportError('$pkg is hidden by gpu_check.sh --dry-run: the lent GPU machine has none')" \
      > "$OUTDIR/hidden_pkgs/$pkg/__init__.py"
  done
  BASE_PYTHONPATH="$OUTDIR/hidden_pkgs:$PYTHONPATH"
  HIDDEN=" (hidden, with mlxtend, as on the lent machine)"
  export PYTHONPATH="$BASE_PYTHONPATH"
fi
TP_NOTE="torch-pruning: installed"
[ "$DRY" = 1 ] && "$PY" -c "import mlxtend" >/dev/null 2>&1 && { echo "gpu_check.sh: mlxtend not hidden" >&2; exit 2; }
if ! "$PY" -c "import torch_pruning" >/dev/null 2>&1; then
  WHEEL=$(ls "$ROOT"/benchmarks/step/wheels/torch_pruning-*-py3-none-any.whl 2>/dev/null | tail -n 1)
  if [ -n "$WHEEL" ]; then
    export PYTHONPATH="$WHEEL:$PYTHONPATH"
    TP_NOTE="torch-pruning: not installed${HIDDEN:-}; using the carried wheel $(basename "$WHEEL") (zip import)"
  else
    TP_NOTE="torch-pruning: not installed and no wheel in benchmarks/step/wheels/ (planning steps will fail)"
  fi
fi

say() { echo "$*" | tee -a "$MAIN_LOG"; }

# checkpoint: after each step of a GPU run, FINAL gets the summary and archive of the steps done so far (marked
# partial), so that a run killed from outside (the device command's limit) still brings its results back
checkpoint() {
  [ "$DRY" = 1 ] && return 0  # the dry run's lanes run in parallel: one summary at the end
  GPU_CHECK_PARTIAL=1 GPU_CHECK_WALL_S=$(elapsed) GPU_CHECK_FINAL="$FINAL" "$PY" benchmarks/step/gpu_report.py summary \
    "$OUTDIR" >/dev/null 2>&1
  cp "$OUTDIR/summary.md" "$OUTDIR/results.json" "$FINAL/" 2>/dev/null
  tar -czf "$OUTDIR.part.tar.gz" -C "$OUTDIR" . 2>/dev/null && mv -f "$OUTDIR.part.tar.gz" "$FINAL/gpu_check.tar.gz"
}
elapsed() { echo $(( $(date +%s) - START )); }
remaining() { echo $(( BUDGET - $(elapsed) )); }

# skip_step NAME REASON
skip_step() {
  printf '%s\tSKIP\t0\t-\t%s.log\t%s\n' "$1" "$1" "$2" >> "$STEPS"
  echo "skipped: $2" > "$OUTDIR/$1.log"
  say "== [$(elapsed)s] $1: SKIP ($2)"
  checkpoint
}

# run_step NAME CAP_S MIN_S CMD... : runs CMD with a limit of min(CAP_S, time left) into OUTDIR/NAME.log;
# skipped when less than MIN_S is left. Never stops the script.
run_step() {
  local name=$1 cap=$2 min=$3 rem limit t0 t1 rc status secs note="${NOTE:-}"
  shift 3
  rem=$(remaining)
  if (( rem < min )); then
    skip_step "$name" "no time left (${rem} s of the ${BUDGET} s budget, needs ${min} s)"
    return 0
  fi
  limit=$(( cap < rem ? cap : rem ))
  say "== [$(elapsed)s] $name (limit ${limit} s): $*"
  { echo "# command: $*"; echo "# started $(date -u +%FT%TZ), limit ${limit} s"; } > "$OUTDIR/$name.log"
  t0=$(date +%s.%N)
  timeout -k 10 "$limit" "$@" >> "$OUTDIR/$name.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  case $rc in 0) status=PASS ;; 124|137) status=TIMEOUT ;; *) status=FAIL ;; esac
  printf '%s\t%s\t%s\t%s\t%s.log\t%s\n' "$name" "$status" "$secs" "$rc" "$name" "$note" >> "$STEPS"
  say "== [$(elapsed)s] $name -> $status (rc $rc, ${secs} s)"
  tail -n 4 "$OUTDIR/$name.log" | cut -c1-200 | sed 's/^/      /' | tee -a "$MAIN_LOG"
  checkpoint
}
NOTE=""
say "$TP_NOTE"

if [ "$DRY" = 1 ]; then
  # ---- dry run: every step checked on this CPU machine, in three lanes (CI time) ----------------------------
  say "gpu_check.sh --dry-run: checking every step on this machine (no GPU used), output in $OUTDIR"
  for f in benchmarks/step/gpu_report.py benchmarks/step/gpu_small_step.py benchmarks/step/gpu_bench.py \
           benchmarks/step/host_overhead.py setup.py; do
    [ -f "$f" ] || say "MISSING: $f"
  done
  (
    run_step facts 60 5 bash -c "bash -n '$0' && echo 'gpu_check.sh: syntax ok' && \
      (command -v nvidia-smi >/dev/null && nvidia-smi || echo 'nvidia-smi: not here (dry run)') && \
      '$PY' benchmarks/step/gpu_report.py facts '$OUTDIR'"
    NOTE="dry run: setup.py byte-compiled, not built" \
    run_step build 30 5 "$PY" -m py_compile setup.py
    NOTE="dry run: collect only, torch-pruning hidden and no wheel (the count must equal the count with it)" \
    run_step tests_gpu 120 5 env PYTHONPATH="$BASE_PYTHONPATH" "$PY" benchmarks/step/gpu_report.py collect-gpu-tests \
      "$OUTDIR"
    skip_step triton_suite "dry run: tests_gpu's collection imported tests/test_triton_backend.py"
  ) &
  (
    # one process for both backends: the native CPU kernel and the Triton interpreter
    NOTE="dry run: on CPU (native kernel and Triton interpreter)" \
    run_step small_step 90 5 "$PY" benchmarks/step/gpu_small_step.py --dry-run --backend native,triton
    for s in memcheck_native racecheck_native memcheck_triton; do
      skip_step "$s" "dry run: no sanitizer on CPU; its small step ran in small_step"
    done
    # every section in one process, with the GPU run's flags (the dry run clamps rounds and sizes)
    run_step bench 120 5 "$PY" benchmarks/step/gpu_bench.py --dry-run --sections step,train,latency --rounds 15 \
      --budget-s 120 --out "$OUTDIR/bench"
    skip_step bench_extra "dry run: its sections (train, latency) ran in the bench step's process"
  ) &
  (
    run_step build_check 60 5 "$PY" benchmarks/step/gpu_report.py build-check "$OUTDIR"
    run_step host_overhead 90 5 "$PY" benchmarks/step/host_overhead.py --dry-run --steps 300 \
      --json "$OUTDIR/host_overhead.json"
  ) &
  wait
else
  say "gpu_check.sh: output in $OUTDIR, budget ${BUDGET} s"
  # ---- a. device facts ----------------------------------------------------------------------------------
  run_step facts 60 5 bash -c "nvidia-smi; \
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,persistence_mode,mig.mode.current --format=csv; \
    uname -a; nproc; free -g | head -2; \
    '$PY' benchmarks/step/gpu_report.py facts '$OUTDIR'"
  ARCH=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1])).get('arch') or '')" "$OUTDIR/facts.json" 2>/dev/null)
  RUNTIME=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1])).get('runtime') or '')" "$OUTDIR/facts.json" 2>/dev/null)

  # ---- b. build in place for this device --------------------------------------------------------------
  if [ -z "$ARCH" ]; then
    skip_step build "no CUDA device capability in facts.json (torch sees no GPU?)"
  else
    export TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)"
    say "   TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
    b0=$(date +%s)
    run_step build 300 60 "$PY" setup.py build_ext --inplace
    if tail -n 1 "$STEPS" | grep -q $'\tFAIL\t' && (( $(date +%s) - b0 < 30 )); then
      # setup.py failed before compiling anything: pip's editable install (no deps, no isolation, offline)
      NOTE="fallback after setup.py build_ext failed early" \
      run_step build_pip 300 60 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
    fi
  fi
  run_step build_check 60 5 "$PY" benchmarks/step/gpu_report.py build-check "$OUTDIR"

  # ---- c. GPU tests of every backend (native CUDA, compiled Triton) -------------------------------------
  run_step tests_gpu 240 30 "$PY" -m pytest -m gpu tests -v -rfEs -p no:cacheprovider --durations=10 \
    --junitxml="$OUTDIR/tests_gpu.xml"

  # ---- d. GPU benchmark (before the sanitizers: its numbers are what the lease is for) ------------------
  run_step bench 200 60 "$PY" benchmarks/step/gpu_bench.py --out "$OUTDIR/bench" --budget-s 110
  BROKEN=$(sed -n 's/^CUDA_BROKEN_BY=//p' "$OUTDIR/bench.log" | tail -n 1)
  if [ -n "$BROKEN" ]; then
    # one contender left CUDA unusable (a sticky error): measure the others in a fresh process
    others=$(echo "sgd-fused,csgd-native,csgd-triton" | tr ',' '\n' | grep -vx "$BROKEN" | paste -sd, -)
    NOTE="rerun without $BROKEN, which left CUDA unusable" \
    run_step bench_retry 150 60 "$PY" benchmarks/step/gpu_bench.py --out "$OUTDIR/bench_retry" --budget-s 80 \
      --contenders "$others"
  fi

  # ---- e. host overhead; the small step (unaligned tensors, every path) without a sanitizer ----------------
  run_step host_overhead 60 20 "$PY" benchmarks/step/host_overhead.py --steps 300 --json "$OUTDIR/host_overhead.json"
  run_step small_step 90 20 "$PY" benchmarks/step/gpu_small_step.py --backend native,triton

  # ---- f. compute-sanitizer on the small step (Firecracker; gVisor refuses it) ---------------------------
  SAN=$(command -v compute-sanitizer || true)
  if [ "$RUNTIME" = gvisor ]; then
    for s in memcheck_native racecheck_native memcheck_triton; do
      skip_step "$s" "gVisor runtime (kernel $(uname -r)): compute-sanitizer refuses the device there (KINDS.md)"
    done
  elif [ -z "$SAN" ]; then
    for s in memcheck_native racecheck_native memcheck_triton; do skip_step "$s" "compute-sanitizer not found"; done
  else
    SANOPTS=(--error-exitcode 97 --print-limit 30)
    # no caching allocator under memcheck: an access past a tensor's end must leave its own allocation
    run_step memcheck_native 100 40 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck "${SANOPTS[@]}" \
      --leak-check no "$PY" benchmarks/step/gpu_small_step.py --backend native
    run_step racecheck_native 90 40 "$SAN" --tool racecheck "${SANOPTS[@]}" \
      "$PY" benchmarks/step/gpu_small_step.py --backend native
    run_step memcheck_triton 120 40 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck "${SANOPTS[@]}" \
      --leak-check no "$PY" benchmarks/step/gpu_small_step.py --backend triton
  fi

  # ---- optional steps if time is left --------------------------------------------------------------------
  run_step bench_extra 150 100 "$PY" benchmarks/step/gpu_bench.py --sections train,latency --rounds 15 \
    --out "$OUTDIR/bench_extra"
  run_step triton_suite 150 60 "$PY" -m pytest tests/test_triton_backend.py -m "not gpu" -q -rfE \
    -p no:cacheprovider --junitxml="$OUTDIR/triton_suite.xml"
fi

# ---- g. summary: the table last; OUTDIR -> one archive in FINAL ------------------------------------------
say "== [$(elapsed)s] summary (steps done in $(elapsed) s of the ${BUDGET} s budget)"
rm -rf "$OUTDIR/hidden_pkgs"
GPU_CHECK_WALL_S=$(elapsed) GPU_CHECK_FINAL="$FINAL" "$PY" benchmarks/step/gpu_report.py summary "$OUTDIR" \
  | tee "$OUTDIR/summary.txt"
rc=${PIPESTATUS[0]}
cp "$OUTDIR/summary.md" "$OUTDIR/results.json" "$FINAL/" 2>/dev/null
tar -czf "$OUTDIR.part.tar.gz" -C "$OUTDIR" . && mv -f "$OUTDIR.part.tar.gz" "$FINAL/gpu_check.tar.gz" \
  && rm -rf "$OUTDIR"
exit "$rc"
