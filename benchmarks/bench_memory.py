"""Peak working memory of recycled MINRES solves, in vectors of length n (tracemalloc).

A diagonal SPD system (eigenvalues 1 … 1e3, n = 10⁵ by default) solved three times in a
row with Ritz recycling (k = 10), the harvest capped at s stored Lanczos vectors
(``max_vectors``) or not; prints, per solve, the iterations and the peak of the memory
allocated during the solve (recycle-space set-up, iteration, harvest) divided by 8n bytes.

    python benchmarks/bench_memory.py [--n 100000] [--k 10] [--caps 40 none]
"""

from __future__ import annotations

import argparse
import os
import sys
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from framework.krylov.recycle import RecycleConfig, Recycler
from framework.krylov.sequence import recycled_solve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--caps", nargs="+", default=["40", "none"])
    args = parser.parse_args()
    n, k = args.n, args.k
    d = np.linspace(1.0, 1e3, n)

    def H(v: np.ndarray) -> np.ndarray:
        return d * v if v.ndim == 1 else d[:, None] * v

    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"inputs: diagonal SPD n = {n}, eigenvalues 1 … 1e3, Ritz k = {k}, 3 solves, "
          "MINRES rtol 1e-5 (the default), x0 = 0")
    for cap in args.caps:
        s = None if cap == "none" else int(cap)
        recycler = Recycler(RecycleConfig("ritz", k, max_vectors=s))
        g, carry = np.random.default_rng(0).standard_normal(n), None
        for t in range(3):
            tracemalloc.start()
            solved = recycled_solve(H, g, recycler=recycler, carry=carry, maxiter=300)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            carry = solved.carry
            bound = "" if s is None else f" (k + s + 10 = {k + s + 10})"
            print(f"max_vectors={cap}: solve {t}: {solved.result.iterations} iterations, "
                  f"peak {peak / (8 * n):.1f} vectors{bound}")


if __name__ == "__main__":
    main()
