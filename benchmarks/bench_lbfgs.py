"""The one batch-first ``framework.optim.lbfgs`` against the two L-BFGS of tag ``pre-redesign``.

Lower level: FoE 28×28 MNIST inpainting (digit i of the embedded sample, Inpainting(0.5,
seed=i), 5 % relative noise (seed i); 24 DCT 5×5 filters, Lorentzian experts, exponent
−1), L-BFGS from y with the fused value and gradient, memory 10, maxiter 1000.  Cases:

* single: one sample with a 1-D x0 — old ``framework.lowerlevel.lbfgs`` vs new ``lbfgs``;
* batch: B samples (B, n) with ``rows_value_and_grad`` — old
  ``framework.lowerlevel_batched.lbfgs_batched`` vs new ``lbfgs``.

The old solvers are loaded from the tag's sources (``git show TAG:path``) into this
process, so both run on the same problem code, in one process, alternately: ``--rounds``
rounds of (old, new), each the best of ``--repeats`` solves; the best over rounds counts.
Prints the command, the BLAS threads, and per case and gtol the iterations and
evaluations of both codes, the time per solve and per iteration (ms), and the ratio
new/old.

Usage: python benchmarks/bench_lbfgs.py [--tag pre-redesign] [--batch 16]
                                        [--gtol 1e-6 1e-8] [--rounds 7] [--repeats 3]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from threadpoolctl import threadpool_info

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an install

from backends import get_backend, tune_cpu_allocator
from framework.optim import lbfgs
from problems.datasets import load_embedded_mnist
from problems.foe import FieldsOfExperts, dct_filters, initial_theta
from problems.imaging import ImagingProblem
from problems.operators import Inpainting

REPO = Path(__file__).resolve().parents[1]


def load_old_solvers(tag: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(lbfgs, lbfgs_batched) of ``tag``, executed from the tag's sources."""

    def load(path: str, name: str) -> types.ModuleType:
        source = subprocess.run(["git", "show", f"{tag}:{path}"], cwd=REPO, check=True,
                                capture_output=True, text=True).stdout
        module = types.ModuleType(name)
        module.__file__ = f"{tag}:{path}"
        sys.modules[name] = module  # dataclasses look their module up while executing it
        exec(compile(source, module.__file__, "exec"), module.__dict__)
        return module

    unbatched = load("framework/lowerlevel.py", "framework.lowerlevel")
    batched = load("framework/lowerlevel_batched.py", "framework.lowerlevel_batched")
    return unbatched.lbfgs, batched.lbfgs_batched


def problems_for(size: int) -> tuple[list[ImagingProblem], Any]:
    be = get_backend("numpy")
    images = load_embedded_mnist().images[:size]
    shape = images.shape[1:]
    reg = FieldsOfExperts(shape, 5, 24, expert="lorentzian")
    problems = [
        ImagingProblem.from_image(
            img, be, Inpainting(shape, 0.5, seed=i), reg, noise_level=0.05, seed=i
        )
        for i, img in enumerate(images)
    ]
    return problems, be.asarray(initial_theta(dct_filters(5), -1.0))


def single_solver(solver: Callable[..., Any], p: ImagingProblem, theta: Any, gtol: float):
    def solve() -> Any:
        return solver(
            lambda z: p.lower_objective(z, theta), lambda z: p.lower_grad(z, theta), p.y,
            value_and_grad=lambda z: p.lower_value_and_grad(z, theta),
            gtol=gtol, maxiter=1000, memory=10,
        )

    return solve


def batch_solver(solver: Callable[..., Any], batch: ImagingProblem, theta: Any,
                 gtol: float):
    def solve() -> Any:
        return solver(
            lambda Z: batch.lower_objective(Z, theta), lambda Z: batch.lower_grad(Z, theta),
            batch.Y,
            rows_value_and_grad=lambda Z, rows: batch.subset(rows).lower_value_and_grad(
                Z, theta),
            gtol=gtol, maxiter=1000, memory=10,
        )

    return solve


def best_of(solve: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """(best wall time, best CPU time of this process, in ms; the last result)."""
    wall = cpu = float("inf")
    result = None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = solve()
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    return wall * 1e3, cpu * 1e3, result


def counts(result: Any, code: str, case: str) -> tuple[int, int, int, bool]:
    """(iterations of the slowest sample, evaluation rounds, sample evaluations, converged)."""
    if case == "single":
        return result.iterations, result.f_evals, result.f_evals, result.converged
    rounds = result.f_evals if code == "old" else result.evaluation_rounds
    per_sample = result.sample_f_evals if code == "old" else result.f_evals
    return max(result.iterations), rounds, sum(per_sample), all(result.converged)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", default="pre-redesign")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--gtol", type=float, nargs="+", default=[1e-6, 1e-8])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    tuned = tune_cpu_allocator()
    old_lbfgs, old_lbfgs_batched = load_old_solvers(args.tag)
    problems, theta = problems_for(args.batch)
    batch = ImagingProblem.concat(problems)
    blas = [f"{i['internal_api']} {i['num_threads']} thread(s)" for i in threadpool_info()
            if i.get("user_api") == "blas"]
    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"code: framework.optim from {Path(sys.modules['framework.optim'].__file__).parent}")
    print(f"BLAS: {', '.join(blas)}; OPENBLAS_NUM_THREADS="
          f"{os.environ.get('OPENBLAS_NUM_THREADS')}; glibc heap tuning {'on' if tuned else 'off'}")
    print(f"inputs: FoE 28x28 MNIST inpainting (0.5), 24 DCT 5x5 filters, Lorentzian, "
          f"memory 10; old = {args.tag} (lowerlevel.lbfgs / lowerlevel_batched.lbfgs_batched), "
          f"new = framework.optim.lbfgs")
    print(f"timing: {args.rounds} rounds alternating old/new in this process, best of "
          f"{args.repeats} solves each, best over rounds")
    print("columns: iterations (slowest sample), evaluation rounds, sample evaluations, "
          "converged, wall and CPU ms per solve, CPU ms per iteration, new/old per iteration "
          "(wall, CPU)")
    print(f"\n{'case':>6} {'gtol':>6} {'code':>4} {'its':>4} {'rounds':>6} {'evals':>5} "
          f"{'conv':>5} {'wall':>8} {'cpu':>8} {'cpu/it':>7} {'new/old wall':>12} "
          f"{'new/old cpu':>11}")
    for case in ("single", "batch"):
        for gtol in args.gtol:
            if case == "single":
                solvers = {"old": single_solver(old_lbfgs, problems[0], theta, gtol),
                           "new": single_solver(lbfgs, problems[0], theta, gtol)}
            else:
                solvers = {"old": batch_solver(old_lbfgs_batched, batch, theta, gtol),
                           "new": batch_solver(lbfgs, batch, theta, gtol)}
            wall = {"old": float("inf"), "new": float("inf")}
            cpu = dict(wall)
            results: dict[str, Any] = {}
            for _ in range(args.rounds):
                for code, solve in solvers.items():
                    w, c, results[code] = best_of(solve, args.repeats)
                    wall[code], cpu[code] = min(wall[code], w), min(cpu[code], c)
            its = {code: counts(results[code], code, case)[0] for code in wall}
            label = "B=1" if case == "single" else f"B={args.batch}"
            for code in ("old", "new"):
                _, rounds, evals, conv = counts(results[code], code, case)
                ratios = ""
                if code == "new":  # per iteration
                    r_wall = (wall["new"] / its["new"]) / (wall["old"] / its["old"])
                    r_cpu = (cpu["new"] / its["new"]) / (cpu["old"] / its["old"])
                    ratios = f"{r_wall:12.3f} {r_cpu:11.3f}"
                print(f"{label:>6} {gtol:6.0e} {code:>4} {its[code]:4d} {rounds:6d} {evals:5d} "
                      f"{conv!s:>5} {wall[code]:8.2f} {cpu[code]:8.2f} "
                      f"{cpu[code] / its[code]:7.3f} {ratios}")


if __name__ == "__main__":
    main()
