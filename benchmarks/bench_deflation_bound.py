"""The most any recycle space of dimension k can save: RMINRES with the k exact eigenvectors
of H of smallest |λ|, deflated for free, against plain MINRES on the same system.

The system is the hypergradient solve H(x*, θ₀) w = ∇ₓL(x*) of one BSDS300 deblurring crop
(``bench_adaptive_recycling``'s BSDS case: Gaussian blur σ = 1.5, 1 % noise, FoE with 16
DCT 7×7 filters, Lorentzian, weights 10^p; x* by Newton–Krylov to ‖∇f‖ ≤ 1e-6).  H is
formed densely from n block HVPs and diagonalised (``numpy.linalg.eigh``), so the crop
must be small (64×64: n = 4096, about 30 s).  For each k, ``rminres`` runs from zero with
the recycle space spanned by the k eigenvectors (C = HU built outside the count), to
‖r‖ ≤ rtol‖g‖; the printed true residual is recomputed from the returned x.  Recycled
vectors are free here, so the iteration ratio is a lower bound on the time ratio any
recycle-space selection (Ritz, harmonic Ritz, RGen) can reach on this system.

    python benchmarks/bench_deflation_bound.py [--crop 64] [--exponent -2]
        [--rtol 1e-3 1e-6] [--dims 0 10 30 100 300 1000] [--data ../shared/data/bsds300]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_adaptive_recycling import CASES, DEFAULT_DATA, engine, problems

from backends import get_backend
from backends.threads import pool_threads
from framework.krylov.minres import rminres
from framework.krylov.recycle_space import RecycleSpace
from problems.foe import dct_filters, initial_theta

BLOCK = 256  # columns of the identity per HVP block when forming H


def dense_hessian(linearization, n: int) -> np.ndarray:
    """H from n HVPs in blocks of BLOCK columns, symmetrised (its asymmetry is printed)."""
    H = np.empty((n, n))
    for j in range(0, n, BLOCK):
        cols = np.arange(j, min(j + BLOCK, n))
        E = np.zeros((n, cols.size))
        E[cols, np.arange(cols.size)] = 1.0
        H[:, cols] = np.asarray(linearization.hvp(E))
    print(f"‖H − Hᵀ‖/‖H‖ = {np.linalg.norm(H - H.T) / np.linalg.norm(H):.1e}")
    return (H + H.T) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--exponent", type=float, default=-2.0, help="p: FoE weights 10^p")
    parser.add_argument("--rtol", type=float, nargs="+", default=[1e-3, 1e-6])
    parser.add_argument("--dims", type=int, nargs="+", default=[0, 10, 30, 100, 300, 1000])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    be = get_backend("numpy")
    case = CASES["bsds64"]
    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"inputs: BSDS300 train crop 0, {args.crop}×{args.crop}, p = {args.exponent:g}; "
          f"BLAS threads (threadpoolctl): {pool_threads()}")
    samples = problems(case, args.data, 1, be, crop=args.crop)
    if samples is None:
        print(f"skipped: no BSDS300 at {args.data}")
        return
    problem = samples[0]
    theta = be.asarray(initial_theta(dct_filters(case.kernel)[: problem.regularizer.num_filters],
                                     args.exponent))
    x = engine(case, "none", samples, be).lower_solutions(theta)[0]
    g = np.asarray(problem.upper_grad(x))
    t0 = time.perf_counter()
    H = dense_hessian(problem.linearize(x, theta), problem.n)
    lam, V = np.linalg.eigh(H)
    order = np.argsort(np.abs(lam))
    lam, V = lam[order], V[:, order]
    print(f"n = {problem.n}; H formed and diagonalised in {time.perf_counter() - t0:.1f} s; "
          f"|λ| from {abs(lam[0]):.3g} to {abs(lam[-1]):.3g} (κ = {abs(lam[-1] / lam[0]):.3g})")
    print("\n| rtol | k | iterations | / k = 0 | λ_{k+1}/λ_1 | true ‖r‖/‖g‖ | status |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for rtol in args.rtol:
        plain = None
        for k in args.dims:
            space = RecycleSpace.from_basis(lambda Y: H @ Y, V[:, :k]) if k else None
            result = rminres(H, g, recycle=space, rtol=rtol, maxiter=20 * problem.n)
            iterations = int(result.iterations)
            plain = plain or iterations
            residual = np.linalg.norm(H @ np.asarray(result.x) - g) / np.linalg.norm(g)
            print(f"| {rtol:g} | {k} | {iterations} | {iterations / plain:.2f} | "
                  f"{abs(lam[k] / lam[0]):.3g} | {residual:.1e} | {result.status.name} |")


if __name__ == "__main__":
    main()
