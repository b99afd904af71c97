"""Preconditioning and recycling together on short sequences of imaging Hessian systems:
Hessian-phase seconds, iterations and applications with and without the FFT
preconditioner, with and without Ritz recycling, side by side in one process.

For each case and exponent p (the preset's and 100× weaker, p − 2) a short training run
(Adam lr 1e-2, ``--steps`` outer steps, B = 1; Newton–Krylov lower level to ‖∇f‖ ≤ 1e-6)
records x_t, θ_t; then four solvers walk the same systems H(x_t, θ_t) w = ∇ℓ(x_t) with
warm starts (w_{t−1} as x0), interleaved system by system:

* ``plain``  MINRES, rule ‖r‖ ≤ rtol‖g‖;
* ``M``      MINRES with the FFT preconditioner (rule ‖r‖_M ≤ rtol‖g‖_M);
* ``ritz``   RMINRES, Ritz vectors (small), k as the paper presets (``--k``), cap 100;
* ``ritz+M`` both: the recycle space M-orthonormal, prepared per system with its M.

The Hessian phase is what the engine times per system: building M, preparing the space
(C = HU: k HVPs, 2k applications of M), the solve and −Jᵀw.  The hypergradient error is
relative to a preconditioned solve to rtol 1e-10.  Cases as ``bench_preconditioner.py``
(BSDS deblurring 64×64 / 256×256 skipped with a reason without the data; MNIST
inpainting).

    python benchmarks/bench_preconditioned_recycling.py --data ../shared/data/bsds300 \\
        [--cases mnist bsds64 bsds256] [--steps 3] [--k 30] [--rtol 1e-3 1e-6]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from backends import get_backend
from benchmarks.bench_preconditioner import DEFAULT_DATA, case_exponents
from benchmarks.trees import blas_threads
from framework.bilevel.engine import BilevelEngine, EngineConfig
from framework.bilevel.recording import record_training
from framework.krylov import rminres
from framework.krylov.recycle import RecycleConfig, Recycler
from framework.krylov.stopping import StopConfig
from framework.optim import Adam
from problems.foe import dct_filters, initial_theta
from problems.preconditioners import fft_preconditioner


class Tally:
    """An operator on rows (1, n) and blocks (1, n, k) that counts its applied vectors."""

    def __init__(self, apply):
        self.apply, self.count = apply, 0

    def __call__(self, V):
        self.count += 1 if V.ndim == 2 else int(V.shape[-1])
        return self.apply(V)


class Walker:
    """One solver configuration walking the sequence with its warm start and carry."""

    def __init__(self, name: str, preconditioned: bool, k: int, rtol: float) -> None:
        self.name, self.preconditioned, self.rtol = name, preconditioned, rtol
        self.recycler = Recycler(RecycleConfig("ritz", k) if k else RecycleConfig())
        self.carry = self.w = None
        self.seconds = 0.0
        self.iterations = self.hvp = self.m = 0
        self.errors: list[float] = []
        self.converged = True

    def solve(self, problem, x, theta, g, reference) -> None:
        lin = problem.linearize(x, theta)
        H, J = Tally(lin), Tally(lin.jac_t)
        t0 = time.perf_counter()
        M = Tally(fft_preconditioner(problem, x, theta)) if self.preconditioned else None
        space = self.recycler.prepare(self.carry, H, like=g, M=M)
        res = rminres(H, g, x0=self.w, M=M, recycle=space, rtol=self.rtol,
                      harvest=self.recycler.harvester(), true_residual=False)
        hypergradient = -J(res.x)
        self.seconds += time.perf_counter() - t0
        self.carry, self.w = self.recycler.carry_after(res, space), res.x
        self.iterations += res.iterations[0]
        self.hvp += H.count
        self.m += 0 if M is None else M.count
        self.converged &= bool(res.converged[0])
        self.errors.append(float(np.linalg.norm(hypergradient - reference)
                                 / np.linalg.norm(reference)))


def record(problem, be, theta0, steps: int):
    """θ_t, x_t of ``steps`` Adam steps (the preconditioned, unrecycled solver)."""
    engine = BilevelEngine([problem], EngineConfig(
        stop=StopConfig(rtol=1e-6), lower_gtol=1e-6, lower_maxiter=500,
        lower_solver="newton_krylov", lower_preconditioner="fft", preconditioner="fft"),
        backend=be)
    recording, _ = record_training(engine, Adam(lr=1e-2), theta0, steps)
    return recording


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cases", nargs="+", default=["mnist", "bsds64", "bsds256"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--rtol", type=float, nargs="+", default=[1e-3, 1e-6])
    parser.add_argument("--weaker", type=float, default=2.0,
                        help="also p − this (0: the preset's p only)")
    args = parser.parse_args()
    be = get_backend("numpy")
    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"BLAS (threadpoolctl): {blas_threads()}; load average {os.getloadavg()}")
    print(f"{'case':>8} {'p':>5} {'rtol':>6} {'solver':>7} {'its':>5} {'HVP':>5} {'M':>5} "
          f"{'s':>8} {'s/plain':>7} {'hg err max':>10}")
    for case, problem, size, count, p in case_exponents(args.cases, args.data, be,
                                                        args.weaker):
        theta0 = be.asarray(initial_theta(dct_filters(size)[:count], p))
        t0 = time.perf_counter()
        recording = record(problem, be, theta0, args.steps)
        systems = []
        for t in range(recording.steps):
            x = be.asarray(recording.xs[t, 0])[None, :]  # a batch of one: rows (1, n)
            theta = be.asarray(recording.thetas[t])
            g = problem.upper_grad(x)
            lin = problem.linearize(x, theta)
            tight = rminres(lin, g, rtol=1e-10, M=fft_preconditioner(problem, x, theta))
            systems.append((x, theta, g, -lin.jac_t(tight.x)))
        print(f"{case:>8} {p:>5.1f}  recorded {recording.steps} systems and references "
              f"in {time.perf_counter() - t0:.1f} s")
        for rtol in args.rtol:
            walkers = [Walker("plain", False, 0, rtol), Walker("M", True, 0, rtol),
                       Walker("ritz", False, args.k, rtol),
                       Walker("ritz+M", True, args.k, rtol)]
            for x, theta, g, reference in systems:
                for walker in walkers:
                    walker.solve(problem, x, theta, g, reference)
            base = walkers[0].seconds
            for w in walkers:
                print(f"{case:>8} {p:>5.1f} {rtol:>6.0e} {w.name:>7} {w.iterations:>5} "
                      f"{w.hvp:>5} {w.m:>5} {w.seconds:>8.2f} {w.seconds / base:>7.2f} "
                      f"{max(w.errors):>10.1e}{'' if w.converged else '  NOT CONVERGED'}",
                      flush=True)
    print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
