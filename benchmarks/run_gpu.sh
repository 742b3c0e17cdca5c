#!/usr/bin/env bash
# One prepared GPU check (issue 12): install missing wheels, GPU tests, GPU benchmark, a summary; a CPU smoke run without a GPU.
#
# From anywhere:  bash benchmarks/run_gpu.sh [DATA_DIR] [OUT_DIR]
#   DATA_DIR  MNIST's four IDX files (default: $HESSIAN_APPROX_DATA, else .gpudata/, else ../shared/data/mnist)
#   OUT_DIR   the results (default benchmarks/results/gpu): bench_gpu_<stamp>.json (device, timings, targets)
#             and run_gpu_<stamp>.json (each step's status, time and note, the device probe), both written atomically
# Environment: PYTHON (default .venv/bin/python where it exists, else python3); RUN_GPU_BUDGET, seconds for the
#   whole run (default 540, inside a 10-minute command limit: every step is cut to what is left, 30 s kept for the
#   summary); RUN_GPU_SITE, where wheels are installed (default /tmp/hessian-approx-site).
# Wheels: the machine may have no network; any package this Python lacks is installed from .whl/*.whl (no index,
#   no dependencies), e.g. PyHessian, backpack-for-pytorch, unfoldNd. jax with CUDA must already be there (the
#   `cuda` extra: pip install -e ".[cuda]"); its wheels are too large to carry.
# With a GPU (jax.default_backend() == "gpu"): tests/jax_impl/test_gpu.py (GPU against CPU in float64) and the full
#   benchmark (benchmarks/bench_gpu.py: 60,000 MNIST samples). Without one: the same tests (their GPU part skips,
#   saying why) and `bench_gpu run --smoke` on scikit-learn's digits, about 1-2 minutes on 2 cores; the targets
#   are recorded as not applicable. Exit status 0 when every step that ran passed, else 1; 2 for a bad argument.
set -uo pipefail
START=$(date +%s)
BUDGET=${RUN_GPU_BUDGET:-540}
SITE=${RUN_GPU_SITE:-/tmp/hessian-approx-site}
ARG_DATA=${1:+$(realpath -m -- "$1")}  # arguments are read from the caller's folder
OUT_DIR=$(realpath -m -- "${2:-$(dirname "$0")/results/gpu}")
cd "$(dirname "$0")/.." || exit 2  # the repository root
if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
[[ $BUDGET =~ ^[0-9]+$ ]] || { echo "error: RUN_GPU_BUDGET is '$BUDGET'; pass a whole number of seconds, e.g. 540" >&2; exit 2; }
command -v "$PY" >/dev/null || { echo "error: Python '$PY' not found; set PYTHON to the interpreter that has jax" >&2; exit 2; }
has_mnist() { [[ -n $1 && ( -e $1/train-images-idx3-ubyte.gz || -e $1/train-images-idx3-ubyte ) ]]; }
DATA=
for cand in "$ARG_DATA" "${HESSIAN_APPROX_DATA:-}" .gpudata ../shared/data/mnist; do
  if has_mnist "$cand"; then DATA=$cand; break; fi
done
if [[ -n $ARG_DATA && $DATA != "$ARG_DATA" ]]; then
  echo "error: $1 holds no MNIST IDX files (train-images-idx3-ubyte[.gz]); pass the folder with MNIST's four IDX files" >&2
  exit 2
fi
mkdir -p "$OUT_DIR" 2>/dev/null && [[ -w $OUT_DIR ]] || { echo "error: cannot write to $OUT_DIR; pass a writable OUT_DIR" >&2; exit 2; }
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
while [[ -e $OUT_DIR/bench_gpu_$STAMP.json || -e $OUT_DIR/run_gpu_$STAMP.json ]]; do STAMP=$STAMP-x; done
WORK=$(mktemp -d "${TMPDIR:-/tmp}/run_gpu.XXXXXX") || exit 2
STEPS=$WORK/steps.tsv
: > "$STEPS"
export PY SITE PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}
# JAX takes half the card, not its default 75%, so that torch (PyHessian) finds room beside it
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}
FAILED=0

# step NAME CAP NOTE COMMAND...: run COMMAND under `timeout` (CAP seconds, less if the budget has less left),
# its output shown and kept in $WORK/NAME.log; append NAME, status, seconds, NOTE, log to $STEPS.
step() {
  local name=$1 cap=$2 note=$3; shift 3
  local left=$(( BUDGET - ($(date +%s) - START) - 30 ))
  if (( left < 15 )); then
    printf '%s\tskipped\t0\tno time left in the %s s budget\t\n' "$name" "$BUDGET" >> "$STEPS"
    echo "== $name: skipped, no time left in the $BUDGET s budget"; FAILED=1; return 1
  fi
  local limit=$(( cap < left ? cap : left )) log=$WORK/$name.log t0 rc status
  echo "== $name (at most $limit s): $*"
  t0=$(date +%s.%N)
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  status=ok
  if (( rc == 124 || rc == 137 )); then status="timeout ${limit}s"; elif (( rc != 0 )); then status="failed ($rc)"; fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b - a}')" \
    "$note" "$log" >> "$STEPS"
  (( rc == 0 )) || FAILED=1
  return $rc
}

skip() {  # skip NAME WHY
  printf '%s\tskipped\t0\t%s\t\n' "$1" "$2" >> "$STEPS"
  echo "== $1: skipped, $2"
}

# the wheels in .whl/ whose distribution this Python lacks, installed into $SITE (no index, no dependencies)
install_wheels() {
  shopt -s nullglob
  local wheels=(.whl/*.whl) missing=() w dist
  if (( ${#wheels[@]} == 0 )); then echo "no .whl/*.whl: nothing to install"; return 0; fi
  for w in "${wheels[@]}"; do
    dist=${w##*/}; dist=${dist%%-*}
    if "$PY" -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "$dist" 2>/dev/null; then
      echo "have $dist"
    else
      missing+=("$w")
    fi
  done
  if (( ${#missing[@]} == 0 )); then echo "installed none: every wheel's package is present"; return 0; fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${missing[@]}" \
    && echo "installed ${missing[*]##*/} into $SITE"
}
export -f install_wheels

probe() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "nvidia-smi: not available"
  "$PY" -c 'import jax; print("jax", jax.__version__, "backend=" + jax.default_backend(), jax.devices())'
}
export -f probe

step install 90 "" bash -c install_wheels
step probe 90 "" bash -c probe
BACKEND=$( [[ -f $WORK/probe.log ]] && sed -n 's/.*backend=\([a-z]*\).*/\1/p' "$WORK/probe.log" | tail -n 1)
if [[ $BACKEND == gpu ]]; then
  MODE=gpu
else
  MODE=cpu
  echo "== no GPU (jax backend: ${BACKEND:-unknown}): GPU tests skip, the benchmark runs as a CPU smoke run, GPU targets not applicable"
fi
step tests "$([[ $MODE == gpu ]] && echo 200 || echo 120)" "" \
  "$PY" -m pytest -q -p no:cacheprovider tests/jax_impl/test_gpu.py
if [[ $MODE == gpu && -z $DATA ]]; then
  skip bench "MNIST not found: pass DATA_DIR with MNIST's four IDX files (.gpudata/ when carried to the device)"
  FAILED=1
elif [[ $MODE == gpu ]]; then
  step bench 300 "" "$PY" -m benchmarks.bench_gpu run --out "$OUT_DIR" --stamp "$STAMP" --data-dir "$DATA"
else
  step bench 150 "" "$PY" -m benchmarks.bench_gpu run --smoke --out "$OUT_DIR" --stamp "$STAMP"
fi
echo "== summary"
"$PY" -m benchmarks.bench_gpu summary --steps "$STEPS" --out "$OUT_DIR" --stamp "$STAMP" --mode "$MODE" || FAILED=1
echo "total $(( $(date +%s) - START )) s; results in $OUT_DIR (stamp $STAMP)"
rm -rf "$WORK"
exit $FAILED
