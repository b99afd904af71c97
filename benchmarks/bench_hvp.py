"""Time Hessian-vector products of the FoE lower level (NumPy).

Sample: the first embedded MNIST digit (28×28), inpainting with 50 % of the pixels
removed (seed 0), 5 % relative noise; 24 DCT 5×5 filters, Lorentzian experts,
exponents −1.  Prints the command, the inputs and µs per HVP for one vector and for a
block of 30 (one pass), plus µs per vector for the block.

Usage: python benchmarks/bench_hvp.py [--repeats R]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import sys
import time

import numpy as np

from backends import get_backend
from backends.threads import pool_threads
from problems.datasets import load_embedded_mnist
from problems.foe import FieldsOfExperts, dct_filters, initial_theta
from problems.imaging import ImagingProblem
from problems.operators import Inpainting


def best_time(fn, repeats: int, number: int) -> float:
    """Best over ``repeats`` of the mean time of ``number`` calls, in µs."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--number", type=int, default=50)
    args = parser.parse_args()

    backend = get_backend("numpy")
    image = load_embedded_mnist().images[0]
    shape = image.shape
    regularizer = FieldsOfExperts(shape, 5, 24, expert="lorentzian")
    operator = Inpainting(shape, 0.5, seed=0)
    problem = ImagingProblem.from_image(
        image, backend, operator, regularizer, noise_level=0.05, seed=0
    )
    theta = backend.asarray(initial_theta(dct_filters(5), -1.0))
    x = problem.y
    rng = np.random.default_rng(0)
    v1 = backend.asarray(rng.standard_normal(problem.n))
    v30 = backend.asarray(rng.standard_normal((problem.n, 30)))

    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"BLAS threads (threadpoolctl): {pool_threads()}")
    print(f"inputs: MNIST digit 0 {shape}, {operator!r}, {regularizer!r}, "
          f"theta = DCT filters with exponent -1, numpy {np.__version__}, float64")
    t1 = best_time(lambda: problem.hvp(x, theta, v1), args.repeats, args.number)
    t30 = best_time(lambda: problem.hvp(x, theta, v30), args.repeats, max(1, args.number // 5))
    print(f"HVP, single vector: {t1:10.1f} µs per call")
    print(f"HVP, block of 30:   {t30:10.1f} µs per call ({t30 / 30:.1f} µs per vector)")
    lin = problem.linearize(x, theta)  # what the Krylov solves use: x-dependent work once
    l1 = best_time(lambda: lin.hvp(v1), args.repeats, args.number)
    l30 = best_time(lambda: lin.hvp(v30), args.repeats, max(1, args.number // 5))
    setup = best_time(lambda: problem.linearize(x, theta), args.repeats, args.number)
    print(f"linearized HVP, single vector: {l1:10.1f} µs per call (setup {setup:.1f} µs once)")
    print(f"linearized HVP, block of 30:   {l30:10.1f} µs per call ({l30 / 30:.1f} µs/vector)")


if __name__ == "__main__":
    main()
