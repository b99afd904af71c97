#!/usr/bin/env bash
# One prepared device check for a session that is lent a GPU: the CuPy test subset, then
# the GPU benchmark (B = 64 BSDS 64×64 crops, blur σ = 3, CuPy vs NumPy in one run).
#
# The device machine has numpy, scipy, matplotlib, tqdm, pytest and cupy-cuda13x but no
# network and not array-api-compat; ../shared does not travel.  Prepare once, here:
#   echo /.whl/ >> .git/info/exclude; echo /.gpudata/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp -d .whl array-api-compat==1.16.0
#   mkdir -p .gpudata/bsds300/images && cp -r ../shared/data/bsds300/images/train \
#       .gpudata/bsds300/images/
# then run it with the device tool: command "bash benchmarks/gpu_check.sh",
# carry [".whl", ".gpudata"], a timeout that leaves room for a rerun.
set -uo pipefail
log="${OUT:-.}/gpu_check.log"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  fi
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  python3 -m pytest -q -rs -p no:cacheprovider tests/test_cupy.py
  data="${DATA:-.gpudata}"
  if [ -d "$data/bsds300" ]; then
    python3 benchmarks/bench_batched_engine.py --dataset bsds --data "$data" --batch 64 \
      --crop 64 --backends numpy cupy --skip-unbatched --steps 4
  else
    echo "no BSDS300 under $data: running the MNIST variant (embedded digits)"
    python3 benchmarks/bench_batched_engine.py --batch 16 --backends numpy cupy --steps 4
  fi
  # the dask_cuda engine (one GPU worker) against the in-process CuPy engine, where the
  # machine has dask_cuda and the project's dependencies (hydra, dask, mlflow)
  if python3 -c "import dask_cuda, hydra, distributed" 2>/dev/null; then
    python3 -m pytest -q -rs -p no:cacheprovider --durations=0 -m gpu tests/test_cluster.py
  else
    echo "dask_cuda or the project's dependencies are missing: dask_cuda stage skipped"
  fi
} 2>&1 | tee "$log"
