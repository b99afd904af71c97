#!/usr/bin/env bash
# One prepared device check (run through the device tool when a session is lent a GPU):
# installs the project with CuPy, runs the CuPy test subset, then the GPU benchmark
# (B = 64 BSDS 64×64 crops, blur σ = 3, CuPy vs NumPy in one run).  Output goes to
# $OUT/gpu_check.log when OUT is set.
set -uo pipefail
log="${OUT:-.}/gpu_check.log"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -m pip install -q -e '.[test,gpu]' 2>&1 | tail -2
  python3 -m pytest -q -rs tests/test_cupy.py
  data="${DATA:-../shared/data}"
  if [ -d "$data/bsds300" ]; then
    python3 benchmarks/bench_batched_engine.py --dataset bsds --data "$data" --batch 64 \
      --crop 64 --backends numpy cupy --skip-unbatched --steps 4
  else
    echo "no BSDS300 at $data: running the MNIST variant"
    python3 benchmarks/bench_batched_engine.py --batch 16 --backends numpy cupy --steps 4
  fi
} 2>&1 | tee "$log"
