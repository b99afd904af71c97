"""What a learned mixture of expert widths costs per lower-level evaluation (NumPy).

The FoE part of the ``bsds_deblur_learn`` preset (48 DCT 7×7 filters, Student-t expert at
γ = 0.05, reflecting boundary, zero-mean filters) on a batch of random 64×64 images, with
one width (the preset) and with the mixtures of ``problem.expert_widths``.  Per batch it
times R and ∇R together (what each L-BFGS iteration of the lower level pays), the HVP of
one column (each MINRES iteration of a Hessian solve) and Jᵀ of one column (once per
hypergradient).  The widths are timed in interleaved rounds, so all see the same load;
the best round of each is printed, and its ratio to one width.  The heap is tuned as in
a run (``backends.tune_cpu_allocator``).

Usage: python benchmarks/bench_expert_widths.py [--batch B] [--rounds R]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import time

import numpy as np

from backends import tune_cpu_allocator
from problems.foe import FieldsOfExperts, dct_filters, initial_theta

WIDTHS = {1: (1.0,), 3: (1 / 3, 1.0, 3.0), 5: (0.25, 0.5, 1.0, 2.0, 4.0)}


def seconds(fn, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--number", type=int, default=3)
    args = parser.parse_args()
    tune_cpu_allocator()  # as a run's NumPy heap
    print(f"python benchmarks/bench_expert_widths.py --batch {args.batch} "
          f"--rounds {args.rounds} --number {args.number}  "
          f"(OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']})")
    rng = np.random.default_rng(0)
    X = rng.random((args.batch, 64 * 64))
    V = rng.standard_normal((args.batch, 64 * 64, 1))
    cases = {}
    for m, widths in WIDTHS.items():
        reg = FieldsOfExperts((64, 64), 7, 48, expert="student_t", gamma=0.05,
                              boundary="symmetric", zero_mean=True, widths=widths)
        theta = initial_theta(dct_filters(7)[:48], -5.0, m)
        lin = reg.linearize(np, X, theta)
        lin.weight(), lin.jac_t(V)  # the HVP's and Jᵀ's cached parts, built once
        cases[m] = {
            "R and ∇R": lambda reg=reg, theta=theta: reg.rows_value_and_grad(np, X, theta),
            "HVP": lambda lin=lin: lin.hvp(V),
            "Jᵀ": lambda lin=lin: lin.jac_t(V),
        }
    best = {(m, name): float("inf") for m in cases for name in cases[m]}
    for _ in range(args.rounds):  # interleaved: every width sees the same load
        for m, ops in cases.items():
            for name, fn in ops.items():
                best[m, name] = min(best[m, name], seconds(fn, args.number))
    print(f"batch of {args.batch} 64×64 images, 48 7×7 filters; best of {args.rounds} rounds")
    print(f"{'widths':>6} | {'operation':<9} | {'ms':>8} | vs one width")
    for (m, name), t in best.items():
        print(f"{m:>6} | {name:<9} | {t * 1e3:8.1f} | {t / best[1, name]:.2f}×")


if __name__ == "__main__":
    main()
