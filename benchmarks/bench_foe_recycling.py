"""Recycling strategies on recorded FoE Hessian sequences (MNIST inpainting).

One training run (Adam, no recycling) records θ_t and x_t; then every strategy re-solves
the same T systems H(x_t, θ_t) w = ∇ℓ(x_t) with warm starts, as the paper does.  Reports
iterations, HVPs, Jᵀ products, applications, sequential passes, wall time (all ratios
measured side by side in this run) and the relative hypergradient error against tight
solves (rtol 1e-10).

    python benchmarks/bench_foe_recycling.py [--steps 30] [--rtol 1e-3 1e-6] [--k 5 10 30]
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
from framework.bilevel.engine import BilevelEngine, EngineConfig
from framework.bilevel.recording import record_training
from framework.krylov.recycle import RecycleConfig
from framework.krylov.sequence import solve_sequence
from framework.krylov.stopping import StopConfig
from framework.optim import Adam
from problems import FieldsOfExperts, ImagingProblem, Inpainting, dct_filters, load_embedded_mnist
from problems.foe import initial_theta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--sample", type=int, default=0)
    parser.add_argument("--rtol", type=float, nargs="+", default=[1e-3, 1e-6])
    parser.add_argument("--k", type=int, nargs="+", default=[5, 10, 30])
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--save", type=str, default=None, help="write the recording (.npz)")
    args = parser.parse_args()
    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"BLAS threads (threadpoolctl): {pool_threads()}")
    print(f"inputs: embedded MNIST digit {args.sample}, 28×28, inpainting 70 % removed, "
          f"noise 0.05, FoE 24 DCT 5×5 Lorentzian filters, θ₀ exponent −1, Adam lr "
          f"{args.lr}, {args.steps} recorded steps (lower gtol 1e-8)")
    be = get_backend("numpy")
    image = load_embedded_mnist().images[args.sample]
    problem = ImagingProblem.from_image(
        image, be, Inpainting((28, 28), 0.7, seed=args.sample),
        FieldsOfExperts((28, 28), 5, 24, expert="lorentzian"), noise_level=0.05,
        seed=args.sample,
    )
    engine = BilevelEngine([problem], EngineConfig(stop=StopConfig(rtol=1e-8),
                                                   lower_gtol=1e-8), backend=be)
    theta0 = be.asarray(initial_theta(dct_filters(5), -1.0))
    t0 = time.perf_counter()
    recording, losses = record_training(engine, Adam(lr=args.lr), theta0, args.steps)
    print(f"recorded {recording.steps} systems in {time.perf_counter() - t0:.1f} s; upper "
          f"loss {losses[0]:.4f} → {losses[-1]:.4f}")
    if args.save:
        print("saved", recording.save(args.save))
    systems = recording.systems(problem, be, references=True)
    runs = [("none", RecycleConfig(), "residual")]
    for k in args.k:
        runs += [
            (f"ritz-small k={k}", RecycleConfig("ritz", k), "residual"),
            (f"harmonic k={k}", RecycleConfig("harmonic_ritz", k), "residual"),
            (f"rgen-right k={k}", RecycleConfig("rgen_right", k), "residual"),
            (f"rgen-left k={k}", RecycleConfig("rgen_left", k), "residual"),
            (f"rgen-right+NSC k={k}", RecycleConfig("rgen_right", k), "hypergradient"),
        ]
    for rtol in args.rtol:
        print(f"\nMINRES rtol = {rtol}")
        print(f"{'strategy':<22} {'iters':>6} {'HVP':>6} {'Jᵀ':>6} {'apps':>6} {'passes':>6} "
              f"{'it/none':>7} {'app/none':>8} {'pass/none':>9} {'t/none':>6} "
              f"{'hg err mean':>11} {'hg err max':>10}")
        base = None
        for name, cfg, stop in runs:
            t0 = time.perf_counter()
            res = solve_sequence(systems, recycle=cfg, stop=StopConfig(stop, rtol=rtol))
            seconds = time.perf_counter() - t0
            errors = np.array([r.hg_error for r in res.records])
            row = (res.iterations, res.applications, res.passes, seconds)
            base = base or row
            print(f"{name:<22} {res.iterations:>6} {int(res.total('hvp')):>6} "
                  f"{int(res.total('jac_t')):>6} {res.applications:>6} {res.passes:>6} "
                  f"{row[0] / base[0]:>7.2f} {row[1] / base[1]:>8.2f} {row[2] / base[2]:>9.2f} "
                  f"{row[3] / base[3]:>6.2f} {errors.mean():>11.2e} {errors.max():>10.2e}")


if __name__ == "__main__":
    main()
