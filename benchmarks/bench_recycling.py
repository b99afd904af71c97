"""Recycling strategies on a synthetic slowly varying SPD sequence.

H_t = 2-D Laplacian + drifting diagonal (n = side²), g_t drifting, Jᵀ = 20 smooth modes
(``problems.sequences.drifting_sequence``).  Every strategy solves the same sequence with
warm starts; figures are totals over the sequence and ratios to warm-started MINRES
without recycling, all measured in this one run.

    python benchmarks/bench_recycling.py [--side 64] [--count 30] [--k 10] [--rtol 1e-6]
"""

from __future__ import annotations

import os

# One BLAS thread unless the caller says otherwise: small dense steps (d × d eigh, Gram
# matrices) run up to 25× slower with two OpenBLAS threads on a loaded 2-core machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import sys
import time

import numpy as np

from backends.threads import pool_threads
from framework.krylov.recycle import RecycleConfig
from framework.krylov.sequence import solve_sequence
from framework.krylov.stopping import StopConfig
from problems.sequences import drifting_sequence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--count", type=int, default=30)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rtol", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    k = args.k
    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"BLAS threads (threadpoolctl): {pool_threads()}")
    print(f"inputs: n = {args.side**2}, {args.count} systems, k = {k}, rtol = {args.rtol}, "
          f"seed = {args.seed}, p = 20 (Jᵀ rows)")
    seq = drifting_sequence(side=args.side, count=args.count, seed=args.seed)
    systems = seq.systems(with_jacobian=True, with_reference=True)
    runs = [
        ("none", RecycleConfig(), "residual"),
        ("ritz-small", RecycleConfig("ritz", k), "residual"),
        ("ritz-mix", RecycleConfig("ritz", k, which="mix"), "residual"),
        ("harmonic", RecycleConfig("harmonic_ritz", k), "residual"),
        ("rgen-left", RecycleConfig("rgen_left", k), "residual"),
        ("rgen-right", RecycleConfig("rgen_right", k), "residual"),
        ("rgen-both", RecycleConfig("rgen_both", k), "residual"),
        ("ritz s=2k", RecycleConfig("ritz", k, max_vectors=2 * k), "residual"),
        ("ritz s=4k", RecycleConfig("ritz", k, max_vectors=4 * k), "residual"),
        ("ritz outer", RecycleConfig("ritz", k, selection="outer"), "residual"),
        ("ritz+NSC", RecycleConfig("ritz", k), "hypergradient"),
        ("rgen-right+NSC", RecycleConfig("rgen_right", k), "hypergradient"),
    ]
    header = (f"{'strategy':<15} {'iters':>6} {'HVP':>6} {'Jᵀ':>6} {'apps':>6} {'passes':>6} "
              f"{'time s':>7} {'it/none':>7} {'app/none':>8} {'pass/none':>9} {'t/none':>6} "
              f"{'hg err mean':>11} {'hg err max':>10}")
    print(header)
    base = None
    for name, cfg, stop in runs:
        t0 = time.perf_counter()
        res = solve_sequence(systems, recycle=cfg, stop=StopConfig(stop, rtol=args.rtol))
        seconds = time.perf_counter() - t0
        hvp = int(res.total("hvp"))
        jt = int(res.total("jac_t"))
        errors = np.array([r.hg_error for r in res.records])
        row = (res.iterations, res.applications, res.passes, seconds)
        if base is None:
            base = row
        print(f"{name:<15} {res.iterations:>6} {hvp:>6} {jt:>6} {res.applications:>6} "
              f"{res.passes:>6} {seconds:>7.2f} {row[0] / base[0]:>7.2f} {row[1] / base[1]:>8.2f} "
              f"{row[2] / base[2]:>9.2f} {row[3] / base[3]:>6.2f} {errors.mean():>11.2e} "
              f"{errors.max():>10.2e}")


if __name__ == "__main__":
    main()
