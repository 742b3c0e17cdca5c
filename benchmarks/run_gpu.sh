#!/usr/bin/env bash
# Run `hessian-approx bench` (and a short reproduce) on a GPU machine and record the device.
#
# On a machine with an NVIDIA GPU whose Python already has jax[cuda], torch, flax, optax
# (e.g. the lent device here), from the repository root:
#   bash benchmarks/run_gpu.sh [DATA_DIR] [OUT_DIR]
# Missing pure-Python packages (backpack-for-pytorch, pyhessian) may be provided as wheels
# in .whl/ (see the device README); they are installed into /tmp/site without network.
set -euo pipefail
DATA=${1:-${HESSIAN_APPROX_DATA:-../shared/data/mnist}}
OUT=${2:-${OUT:-benchmarks/results}}
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"
$PY -m benchmarks.cli bench --data-dir "$DATA" --out "$OUT"
$PY -m benchmarks.cli reproduce --data-dir "$DATA" --out "$OUT/reproduce_gpu"
