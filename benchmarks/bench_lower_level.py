"""The lower level of the one engine: L-BFGS vs inexact Newton–Krylov, side by side.

MNIST inpainting (embedded digits, 28×28, 50 % removed, 5 % noise), FoE with 24 DCT 5×5
Lorentzian filters, Ritz recycling k = 5 for the hypergradient, MINRES rtol 1e-3, lower
gtol 1e-6, Adam (lr 1e-2) from the same θ.  For each batch size, each repeat runs the
two lower solvers' outer loops in one process with fresh engines, stepping them in
turn (lbfgs, newton_krylov, lbfgs, …) so both see the same machine load.

Prints, per batch size and solver, the median over steps (steps 2.. of each repeat) of
the lower-level seconds and the whole-step seconds (evaluate + Adam), best and median
over repeats, with the lower-level counts per step (iterations, f+∇f evaluations, HVPs,
summed over the samples), and the upper-loss trajectories of both with their relative
difference per step and the largest relative difference of the θ paths.

    python benchmarks/bench_lower_level.py [--batches 1 16] [--steps 8] [--repeats 3]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import statistics
import sys
import time

import numpy as np
from threadpoolctl import threadpool_info

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backends import get_backend, tune_cpu_allocator
from framework.bilevel.engine import BilevelEngine, EngineConfig, LowerSolver
from framework.krylov.recycle import RecycleConfig
from framework.krylov.stopping import StopConfig
from framework.optim import Adam
from problems import FieldsOfExperts, ImagingProblem, Inpainting, load_embedded_mnist
from problems.foe import dct_filters, initial_theta

SOLVERS = tuple(LowerSolver)


def problems(be, batch):
    reg = FieldsOfExperts((28, 28), 5, 24, expert="lorentzian")
    return [ImagingProblem.from_image(img, be, Inpainting((28, 28), 0.5, seed=i), reg,
                                      noise_level=0.05, seed=i)
            for i, img in enumerate(load_embedded_mnist().images[:batch])]


def run_once(be, batch, steps):
    """One repeat: both solvers' outer loops stepped in turn; per-step figures."""
    runs = {}
    for solver in SOLVERS:
        cfg = EngineConfig(recycle=RecycleConfig("ritz", 5), stop=StopConfig(rtol=1e-3),
                           lower_gtol=1e-6, lower_solver=solver)
        runs[solver] = dict(engine=BilevelEngine(problems(be, batch), cfg, backend=be),
                            theta=be.asarray(initial_theta(dct_filters(5), -1.0)),
                            adam=Adam(lr=1e-2), steps=[])
    for _ in range(steps):
        for solver in SOLVERS:
            run = runs[solver]
            t0 = time.perf_counter()
            result = run["engine"].evaluate(run["theta"])
            run["theta"] = run["adam"].step(run["theta"], result.grad).theta
            seconds = time.perf_counter() - t0
            s = result.samples
            run["steps"].append(dict(
                step=seconds, lower=result.times.lower, loss=result.loss,
                theta=be.to_numpy(run["theta"]).copy(),
                iterations=sum(r.lower_iterations for r in s),
                evals=sum(r.lower_grad_evals for r in s), hvp=sum(r.lower_hvp for r in s),
                converged=all(r.lower_converged for r in s)))
    return {solver: runs[solver]["steps"] for solver in SOLVERS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tune_cpu_allocator()
    be = get_backend("numpy")
    blas = [(i.get("internal_api"), i.get("num_threads")) for i in threadpool_info()
            if i.get("user_api") == "blas"]
    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"inputs: MNIST inpainting B = {args.batches}, FoE 24 DCT 5×5 Lorentzian, Ritz k = 5, "
          f"MINRES rtol 1e-3, lower gtol 1e-6, {args.steps} Adam steps (lr 1e-2) from the "
          f"same θ, {args.repeats} repeats; BLAS (threadpoolctl): {blas}")
    for batch in args.batches:
        repeats = [run_once(be, batch, args.steps) for _ in range(args.repeats)]
        print(f"\nB = {batch}: seconds per outer step (median over steps 2..; best / median "
              f"over repeats); counts per step (median, summed over samples)")
        print(f"{'solver':<14} {'lower s':>17} {'step s':>17} {'iters':>6} {'f+∇f':>6} "
              f"{'HVPs':>6} {'all converged':>14}")
        medians = {}
        for solver in SOLVERS:
            lower = [statistics.median(s["lower"] for s in r[solver][1:]) for r in repeats]
            step = [statistics.median(s["step"] for s in r[solver][1:]) for r in repeats]
            medians[solver] = (statistics.median(lower), statistics.median(step))
            steps = repeats[0][solver]
            count = lambda key, steps=steps: statistics.median(s[key] for s in steps)  # noqa: E731
            print(f"{solver:<14} {min(lower):>8.4f} / {statistics.median(lower):.4f} "
                  f"{min(step):>8.4f} / {statistics.median(step):.4f} {count('iterations'):>6.0f} "
                  f"{count('evals'):>6.0f} {count('hvp'):>6.0f} "
                  f"{all(s['converged'] for r in repeats for s in r[solver])!s:>14}")
        lb, nk = (medians[s] for s in SOLVERS)
        print(f"newton_krylov / lbfgs (medians): lower {nk[0] / lb[0]:.3f}×, "
              f"whole step {nk[1] / lb[1]:.3f}×")
        a, b = (repeats[0][s] for s in SOLVERS)
        print(f"{'step':>4} {'loss lbfgs':>20} {'loss newton_krylov':>20} {'rel diff':>10}")
        for k, (x, y) in enumerate(zip(a, b, strict=True)):
            print(f"{k:>4} {x['loss']:>20.12f} {y['loss']:>20.12f} "
                  f"{abs(x['loss'] - y['loss']) / abs(x['loss']):>10.2e}")
        theta_diff = max(np.linalg.norm(x["theta"] - y["theta"]) / np.linalg.norm(x["theta"])
                         for x, y in zip(a, b, strict=True))
        print(f"θ paths: largest relative difference {theta_diff:.2e} "
              f"({'within' if theta_diff <= 1e-6 else 'NOT within'} 1e-6)")


if __name__ == "__main__":
    main()
