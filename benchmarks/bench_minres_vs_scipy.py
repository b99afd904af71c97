"""Time per iteration of rminres (no recycling) vs scipy.sparse.linalg.minres.

Operator: 2-D Laplacian (5-point, zero boundary) plus a positive diagonal, as a SciPy CSR
matrix shared by both solvers; NumPy backend.  Both run a fixed number of iterations
(tolerance unreachable), alternating, and the best of ``--repeats`` runs is kept.

    python benchmarks/bench_minres_vs_scipy.py [--sizes 10000 100000 1000000] [--iters 100]
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
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from backends.threads import pool_threads
from framework.krylov import rminres


def laplacian_plus_diagonal(side: int, seed: int = 0) -> sp.csr_matrix:
    one_d = sp.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(side, side))
    eye = sp.identity(side)
    lap = sp.kron(one_d, eye) + sp.kron(eye, one_d)
    diag = np.random.default_rng(seed).uniform(0.01, 0.1, side * side)
    return (lap + sp.diags(diag)).tocsr()


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"BLAS threads (threadpoolctl): {pool_threads()}")
    print(f"inputs: 2-D Laplacian + diag U(0.01, 0.1), {args.iters} iterations, "
          f"best of {args.repeats}, numpy {np.__version__}")
    print(f"{'n':>9} {'scipy µs/it':>12} {'rminres µs/it':>14} {'ratio':>6}")
    for n in args.sizes:
        side = round(np.sqrt(n))
        A = laplacian_plus_diagonal(side)
        b = np.random.default_rng(1).standard_normal(side * side)

        def run_scipy(A=A, b=b):
            spla.minres(A, b, maxiter=args.iters, rtol=1e-300)

        def run_ours(A=A, b=b):
            res = rminres(lambda v: A @ v, b, maxiter=args.iters, rtol=0.0, true_residual=False)
            assert res.iterations == args.iters

        ours = scipy = float("inf")
        for _ in range(args.repeats):  # alternate so both see the same machine state
            scipy = min(scipy, best_time(run_scipy, 1))
            ours = min(ours, best_time(run_ours, 1))
        per = 1e6 / args.iters
        print(f"{side * side:>9} {scipy * per:>12.1f} {ours * per:>14.1f} {ours / scipy:>6.2f}")


if __name__ == "__main__":
    main()
