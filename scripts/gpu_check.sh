#!/usr/bin/env bash
# GPU check: build fwdkern with the CUDA kernels for sm_90, run every GPU test (CUDA kernels and
# compiled Triton, bit-identical Rademacher streams against the CPU), then the GPU benchmarks of
# bench/ (seeded ops, LoRA dual at the bench shapes incl. cuda vs triton, dual attention, the
# whole-model K=8 step from a random-weight config, the quantized-base LoRA dual (int8/int4, triton
# dequant-in-registers vs the cuda composition), the K=8 step on fp32/int8/int4 bases and the causal-LM
# client step of the federated suite: K tangents + the guard's probe vs backprop vs inference) with their
# floors. Writes JSON + a markdown table into the output folder and prints the table last. Sized for
# <= 9 minutes on an H100/H200 (every stage runs under a hard `timeout`, all stages share one deadline).
#
#   bash scripts/gpu_check.sh [OUT_DIR] [--dry-run] [--no-build]
#
# OUT_DIR     default bench/results/gpu_<date>/
# --dry-run   on any machine: build the CPU kernels, check that every test file, benchmark and
#             selected test/benchmark id exists (pytest --collect-only), print what would run;
#             exit non-zero when a piece is missing
# --no-build  skip the build (the checkout's fwdkern/_C*.so is used as it is)
# FWDKERN_GPU_CHECK_EXTRA   extra test selections (files or file::test), space separated
#
# The GPU machine has no package registry: the build uses the installed setuptools/pybind11
# (pip --no-build-isolation --no-deps) and copies the built extension into the checkout, so the
# tests and benchmarks (run from the checkout) import that build.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}

DRY=0
BUILD=1
OUT=""
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    --no-build) BUILD=0 ;;
    -h|--help) sed -n 2,22p "$0"; exit 0 ;;
    -*) echo "gpu_check: unknown option $a" >&2; exit 2 ;;
    *) OUT="$a" ;;
  esac
done
OUT=${OUT:-bench/results/gpu_$(date +%Y-%m-%d)}
(( DRY )) && OUT=$(mktemp -d)  # a dry run writes nothing into the checkout

# Stage budgets (seconds): 515 in all, so that even the kill grace of a stage that times out
# keeps the whole check under 9 minutes.
DEADLINE=$(( $(date +%s) + 515 ))
declare -A BUDGET=([build]=140 [select]=20 [tests]=115 [bench_seeded]=30 [bench_lora]=60 [bench_attention]=25
                   [bench_engine]=45 [bench_quant]=25 [bench_quant_engine]=30 [bench_fl_client]=25)
(( DRY )) && BUDGET[select]=240  # collection on a small CPU machine
# SIGINT first: pytest then still writes its JUnit / benchmark JSON for what finished.
STOP=(timeout -s INT -k 15)

# What runs. Tests: "file|regex on the test name" ('' = the whole file).
TEST_SELECTIONS=(
  "tests/test_seeded.py|gpu"
  "tests/test_lora.py|gpu"
  "tests/test_triton_lora.py|"
  "tests/test_attention.py|triton|opcheck"
  "tests/test_backends.py|gpu"
  "tests/test_ops_inputs.py|gpu"
  "tests/test_quant.py|gpu"
)
for extra in ${FWDKERN_GPU_CHECK_EXTRA:-}; do TEST_SELECTIONS+=("$extra|"); done
# Benchmarks: "stage|file::function|regex on the parameter id".
BENCH_SELECTIONS=(
  "bench_seeded|bench/bench_seeded.py::test_seeded_gpu|^(?!.*reference_gpu)|1048576"
  "bench_lora|bench/bench_lora.py::test_lora_dual_gpu|"
  "bench_attention|bench/bench_engine.py::test_dual_attention_gpu|"
  "bench_engine|bench/bench_engine.py::test_engine_smollm2_gpu|"
  "bench_quant|bench/bench_quant.py::test_quant_lora_dual_gpu|"
  "bench_quant_engine|bench/bench_quant.py::test_quant_engine_gpu|"
  "bench_fl_client|bench/bench_fl.py::test_causal_lm_client_step_gpu|"
)

log() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }
left() { echo $(( DEADLINE - $(date +%s) )); }
budget() {  # timeout for a stage: its budget, or what is left of the deadline
  local b=${BUDGET[$1]} l; l=$(left)
  (( l < 1 )) && l=1
  echo $(( b < l ? b : l ))
}

mkdir -p "$OUT"
STAGES="$OUT/stages.tsv"
: > "$STAGES"
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$STAGES"; }  # stage, status, seconds

# ------------------------------------------------------------------------------------- build
find_nvcc() {
  for c in "${FWDKERN_NVCC:-}" "${CUDA_HOME:-/nonexistent}/bin/nvcc" /usr/local/cuda/bin/nvcc "$(command -v nvcc)"; do
    [[ -n "$c" && -x "$c" ]] && { echo "$c"; return 0; }
  done
  "$PY" -c "import nvidia.cuda_nvcc as m, os; p = os.path.join(list(m.__path__)[0], 'bin', 'nvcc'); \
print(p) if os.access(p, os.X_OK) else exit(1)" 2>/dev/null
}

build() {
  local t0=$SECONDS to; to=$(budget build)
  if (( DRY )); then
    log "build (CPU kernels, dry run)"
    if FWDKERN_CUDA=0 timeout "$to" "$PY" setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1; then
      record build ok $((SECONDS - t0)); return 0
    fi
    record build failed $((SECONDS - t0)); tail -20 "$OUT/build.log"; return 1
  fi
  local nvcc status=ok
  nvcc=$(find_nvcc) || nvcc=""
  if [[ -n "$nvcc" ]]; then
    log "build: CUDA kernels for sm_90 with $nvcc"
    FWDKERN_NVCC="$nvcc" FWDKERN_CUDA=1 FWDKERN_CUDA_ARCHS=90 timeout "$to" \
      "$PY" -m pip install --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1 || status=failed
  else
    log "build: no nvcc found (FWDKERN_NVCC, CUDA_HOME, PATH, nvidia-cuda-nvcc); CPU kernels only"
    status=no_nvcc
  fi
  if [[ $status != ok ]]; then
    # Without the CUDA kernels the cuda backend's tests and benchmarks skip; triton still runs.
    FWDKERN_CUDA=0 timeout "$(budget build)" "$PY" -m pip install --no-build-isolation --no-deps . \
      >> "$OUT/build.log" 2>&1 || { record build failed $((SECONDS - t0)); tail -30 "$OUT/build.log"; return 1; }
    status="cpu_only_($status)"
  fi
  local so
  so=$(cd / && "$PY" -c "import fwdkern._C as m; print(m.__file__)") || { record build failed $((SECONDS - t0)); return 1; }
  cp -f "$so" fwdkern/
  "$PY" -c "import fwdkern, sys; b = fwdkern.backends; print('with_cuda', b._ext().with_cuda, 'cuda kernels usable', \
b.has_cuda_kernels(), 'triton', b.available('triton', 'cuda'))" | tee -a "$OUT/build.log"
  record build "$status" $((SECONDS - t0))
}

# --------------------------------------------------------------------------------- selections
# Collects tests/ and bench/ once and writes, per selection, the matching node ids to
# $OUT/ids_<name>.txt. Prints one line per selection: name, count, pattern; exit 1 if any
# file is missing or a selection matches nothing.
select_ids() {
  local files=() s
  for s in "${TEST_SELECTIONS[@]}"; do files+=("${s%%|*}"); done
  for s in "${BENCH_SELECTIONS[@]}"; do s=${s#*|}; files+=("${s%%::*}"); done
  local missing=0 f
  for f in "${files[@]%%::*}"; do
    [[ -f "$f" ]] || { echo "MISSING file: $f"; missing=1; }
  done
  (( missing )) && return 1
  local uniq
  uniq=$(printf '%s\n' "${files[@]%%::*}" | sort -u)
  # Collection only needs the test ids: it must not depend on a built _C (a dry run with --no-build).
  # shellcheck disable=SC2086
  FWDKERN_ALLOW_NO_EXT=1 timeout "$(budget select)" "$PY" -m pytest --collect-only -q -p no:cacheprovider $uniq > "$OUT/collect.txt" 2>&1
  local rc=$?
  if (( rc != 0 )); then
    echo "MISSING: collection failed (pytest exit $rc)"; tail -30 "$OUT/collect.txt"; return 1
  fi
  "$PY" - "$OUT" "${#TEST_SELECTIONS[@]}" "${TEST_SELECTIONS[@]}" "${BENCH_SELECTIONS[@]}" <<'EOF'
import re, sys
out, n_tests, sels = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
ids = [l.strip() for l in open(f"{out}/collect.txt") if "::" in l and not l.startswith(" ")]
bad = 0
for i, sel in enumerate(sels):
    if i < n_tests:
        target, _, pattern = sel.partition("|")
        name = f"tests_{i}"
    else:
        name, _, rest = sel.partition("|")
        target, _, pattern = rest.partition("|")
    file, _, func = target.partition("::")
    rx = re.compile(pattern or "")
    hits = []
    for nid in ids:
        nfile, _, test = nid.partition("::")
        base, _, param = test.partition("[")
        if nfile != file or (func and base != func):
            continue
        if rx.search(param if i >= n_tests else base):
            hits.append(nid)
    with open(f"{out}/ids_{name}.txt", "w") as f:
        f.write("\n".join(hits) + ("\n" if hits else ""))
    print(f"{name}\t{len(hits)}\t{target}{'  [' + pattern + ']' if pattern else ''}")
    bad |= not hits
sys.exit(1 if bad else 0)
EOF
}

# -------------------------------------------------------------------------------------- tests
run_tests() {
  local t0=$SECONDS to shards ids="$OUT/ids_tests_all.txt"
  to=$(budget tests)
  cat "$OUT"/ids_tests_*[0-9].txt 2>/dev/null | sort -u > "$ids"
  shards=$(( $(nproc) / 2 )); (( shards < 1 )) && shards=1; (( shards > 8 )) && shards=8
  log "tests: $(wc -l < "$ids") GPU tests in $shards processes (timeout ${to}s)"
  split -n "r/$shards" -d "$ids" "$OUT/shard_"
  local pids=() i=0 f args
  for f in "$OUT"/shard_*; do
    [[ -s "$f" ]] || continue
    mapfile -t args < "$f"  # node ids hold brackets: no word splitting or globbing
    FWDKERN_AUTOTUNE=quick "${STOP[@]}" "$to" "$PY" -m pytest -q -p no:cacheprovider -o junit_family=xunit2 \
      --junitxml="$OUT/tests_$i.xml" "${args[@]}" > "$OUT/tests_$i.log" 2>&1 &
    pids+=($!); i=$((i + 1))
  done
  local status=ok p
  for p in "${pids[@]}"; do wait "$p" || status=failed; done
  rm -f "$OUT"/shard_*
  record tests "$status" $((SECONDS - t0))
}

# --------------------------------------------------------------------------------- benchmarks
run_bench() {  # stage
  local stage=$1 t0=$SECONDS to status=ok args
  to=$(budget "$stage")
  mapfile -t args < "$OUT/ids_$stage.txt"
  (( ${#args[@]} )) || { record "$stage" nothing_selected 0; return; }
  log "$stage: ${#args[@]} benchmarks (timeout ${to}s)"
  FWDKERN_AUTOTUNE=quick FWDKERN_BENCH_QUICK=1 HF_HUB_OFFLINE=1 "${STOP[@]}" "$to" "$PY" -m pytest -q -p no:cacheprovider \
    --benchmark-only --benchmark-json="$OUT/$stage.json" "${args[@]}" > "$OUT/$stage.log" 2>&1
  case $? in
    0) ;; 124|130|137) status=timeout ;; *) status=failed ;;
  esac
  record "$stage" "$status" $((SECONDS - t0))
}

# ------------------------------------------------------------------------------------- report
report() {
  "$PY" - "$OUT" <<'EOF'
import glob, json, os, sys
import xml.etree.ElementTree as ET

out = sys.argv[1]
stages = [l.rstrip("\n").split("\t") for l in open(f"{out}/stages.tsv") if l.strip()]
tests = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
failed = []
for x in glob.glob(f"{out}/tests_*.xml"):
    for suite in ET.parse(x).getroot().iter("testsuite"):
        for k in tests:
            tests[k] += int(suite.get(k, 0))
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
rows = []
for path in sorted(glob.glob(f"{out}/bench_*.json")):
    try:
        data = json.load(open(path))
    except (OSError, ValueError):
        continue
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        ratio = next((f"{k} {info[k]:.2f}" for k in ("time_over_floor", "vs_floor", "ratio_to_inference", "vs_inference")
                      if isinstance(info.get(k), (int, float))), "")
        peak = info.get("peak_extra_bytes")
        rows.append((b.get("group") or b["name"], info.get("provider", ""), b["stats"]["median"] * 1e3, ratio,
                     f"{peak / 2**20:.1f}" if isinstance(peak, (int, float)) else ""))
summary = {"stages": [dict(stage=s, status=st, seconds=int(t)) for s, st, t in stages], "tests": tests,
           "failed_tests": failed, "benchmarks": [dict(zip(("group", "provider", "median_ms", "ratio", "peak_extra_mib"), r))
                                                  for r in rows]}
with open(f"{out}/summary.json", "w") as f:
    json.dump(summary, f, indent=2)
lines = ["# GPU check", "", "| stage | status | seconds |", "|---|---|---|"]
lines += [f"| {s} | {st} | {t} |" for s, st, t in stages]
lines += ["", f"Tests: {tests['tests']} run, {tests['failures'] + tests['errors']} failed, {tests['skipped']} skipped"]
lines += [f"- FAILED {n}" for n in failed[:40]]
lines += ["", "| benchmark | provider | median (ms) | vs floor / inference | peak extra (MiB) |", "|---|---|---|---|---|"]
lines += [f"| {g} | {p} | {m:.3f} | {r} | {pk} |" for g, p, m, r, pk in rows]
open(f"{out}/summary.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
bad = tests["failures"] + tests["errors"] or any(st in ("failed",) for _, st, _ in stages)
sys.exit(1 if bad else 0)
EOF
}

# --------------------------------------------------------------------------------------- main
if (( BUILD )); then
  if ! build; then
    (( DRY )) && exit 1
    report; exit 1
  fi
fi
log "selecting tests and benchmarks"
SEL=$(select_ids); SEL_RC=$?
if (( DRY )); then
  echo "gpu_check --dry-run: would run (into $OUT):"
  echo "  build: FWDKERN_CUDA=1 FWDKERN_CUDA_ARCHS=90 $PY -m pip install --no-build-isolation --no-deps ."
  echo "  GPU tests (FWDKERN_AUTOTUNE=quick, sharded over processes):"
  while IFS=$'\t' read -r name count what; do
    [[ $name == tests_* ]] && echo "    $what: $count tests"
  done <<< "$SEL"
  echo "  GPU benchmarks (FWDKERN_BENCH_QUICK=1, one process each, in this order):"
  while IFS=$'\t' read -r name count what; do
    [[ $name == bench_* ]] && echo "    $name: $what: $count benchmarks (timeout ${BUDGET[$name]}s)"
  done <<< "$SEL"
  grep -h "MISSING" <<< "$SEL" || true
  rm -rf "$OUT"
  if (( SEL_RC != 0 )); then
    echo "gpu_check --dry-run: a piece is missing (a selection above matched nothing)" >&2
    exit 1
  fi
  exit 0
fi
echo "$SEL"
(( SEL_RC != 0 )) && log "warning: some selections matched nothing (see above)"
run_tests
for stage in bench_seeded bench_lora bench_attention bench_engine bench_quant bench_quant_engine bench_fl_client; do
  run_bench "$stage"
done
report
