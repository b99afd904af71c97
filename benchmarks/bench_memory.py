"""Peak working memory of recycled MINRES solves, and what the cap on stored Lanczos
vectors (``max_vectors`` = s) costs in iterations and seconds.

Memory: a diagonal SPD system (eigenvalues 1 … 1e3, n = 10⁵ by default) solved three
times in a row with Ritz recycling (k = 10), the harvest capped at s or not; per solve the
iterations and, by tracemalloc, the peak of the memory allocated (a) by ``rminres`` alone
(the space U, C = HU given), net of what it returns (x and the k carried vectors) — what
tests/test_recycling.py bounds by n·(k + s + 10) — and (b) by the whole recycled solve
(C = HU set-up included), in vectors of n (8n bytes).

Cost (``--cost``): sequences with warm starts and Ritz recycling, each cap against no cap
in the same run: the synthetic sequence of bench_recycling.py (n = 4096, 30 systems,
rtol 1e-6, k = 10) and 30 recorded FoE Hessian systems of bench_foe_recycling.py (MNIST
inpainting; rtol 1e-3 and 1e-6, k = 10 and 30); totals, the longest solve, seconds.

    python benchmarks/bench_memory.py [--n 100000] [--k 10] [--caps 40 none]
                                      [--cost] [--cost-caps none 200 100 50 20]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backends import get_backend
from backends.threads import pool_threads
from framework.bilevel.engine import BilevelEngine, EngineConfig
from framework.bilevel.recording import record_training
from framework.krylov import rminres
from framework.krylov.recycle import RecycleConfig, Recycler
from framework.krylov.sequence import recycled_solve, solve_sequence
from framework.krylov.stopping import StopConfig
from framework.optim import Adam
from problems import FieldsOfExperts, ImagingProblem, Inpainting, dct_filters, load_embedded_mnist
from problems.foe import initial_theta
from problems.sequences import drifting_sequence


def _cap(text: str) -> int | None:
    return None if text == "none" else int(text)


def memory(n: int, k: int, caps: list[str]) -> None:
    d = np.linspace(1.0, 1e3, n)

    def H(v: np.ndarray) -> np.ndarray:
        return d * v if v.ndim == 1 else d[:, None] * v

    print(f"\nmemory: diagonal SPD n = {n}, eigenvalues 1 … 1e3, Ritz k = {k}, 3 solves in a "
          "row, MINRES rtol 1e-5 (the default), x0 = 0; vectors of n")
    print(f"{'max_vectors':>11} {'solve':>5} {'iters':>5} {'rminres net':>11} "
          f"{'k + s + 10':>10} {'with set-up':>11}")
    for cap in caps:
        s = _cap(cap)
        recycler = Recycler(RecycleConfig("ritz", k, max_vectors=s))
        g, carry = np.random.default_rng(0).standard_normal(n), None
        for t in range(3):
            space = recycler.prepare(carry, H, like=g)
            tracemalloc.start()
            res = rminres(H, g, recycle=space, harvest=recycler.harvester(), maxiter=300)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            returned = res.x.nbytes + (0 if res.harvest is None else res.harvest.basis.nbytes)
            tracemalloc.start()
            solved = recycled_solve(H, g, recycler=recycler, carry=carry, maxiter=300)
            whole = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            carry = solved.carry
            bound = "" if s is None else k + s + 10
            print(f"{cap:>11} {t:>5} {res.iterations:>5} {(peak - returned) / (8 * n):>11.1f} "
                  f"{bound:>10} {whole / (8 * n):>11.1f}")


def foe_systems(steps: int) -> list:
    be = get_backend("numpy")
    image = load_embedded_mnist().images[0]
    problem = ImagingProblem.from_image(
        image, be, Inpainting((28, 28), 0.7, seed=0),
        FieldsOfExperts((28, 28), 5, 24, expert="lorentzian"), noise_level=0.05, seed=0)
    engine = BilevelEngine([problem], EngineConfig(stop=StopConfig(rtol=1e-8),
                                                   lower_gtol=1e-8), backend=be)
    theta0 = be.asarray(initial_theta(dct_filters(5), -1.0))
    recording, _ = record_training(engine, Adam(lr=1e-2), theta0, steps)
    return recording.systems(problem, be)


def cost(caps: list[str]) -> None:
    synthetic = drifting_sequence(side=64, count=30, seed=0).systems(with_jacobian=True)
    cases = [("synthetic n = 4096, rtol 1e-6", synthetic, 1e-6, 10, "ritz", "residual"),
             ("synthetic, RGen-R + NSC", synthetic, 1e-6, 10, "rgen_right", "hypergradient")]
    foe = foe_systems(30)
    cases += [(f"FoE MNIST 28×28, rtol {rtol:g}", foe, rtol, k, "ritz", "residual")
              for rtol in (1e-3, 1e-6) for k in (10, 30)]
    print("\ncost of the cap: 30 systems, warm starts, recycling (Ritz unless named); "
          "ratios to no cap")
    print(f"{'sequence':<30} {'k':>3} {'s':>5} {'iters':>6} {'longest':>7} {'time s':>7} "
          f"{'it/none':>7} {'t/none':>6}")
    for name, systems, rtol, k, strategy, rule in cases:
        base = None
        for cap in caps:
            cfg = RecycleConfig(strategy, k, max_vectors=_cap(cap))
            t0 = time.perf_counter()
            res = solve_sequence(systems, recycle=cfg, stop=StopConfig(rule, rtol=rtol))
            seconds = time.perf_counter() - t0
            longest = max(r.iterations for r in res.records)
            base = base or (res.iterations, seconds)
            print(f"{name:<30} {k:>3} {cap:>5} {res.iterations:>6} {longest:>7} "
                  f"{seconds:>7.2f} {res.iterations / base[0]:>7.3f} {seconds / base[1]:>6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--caps", nargs="+", default=["40", "100", "none"])
    parser.add_argument("--cost", action="store_true", help="also measure the cap's cost")
    parser.add_argument("--cost-caps", nargs="+", default=["none", "200", "100", "50", "20"])
    args = parser.parse_args()
    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"BLAS threads (threadpoolctl): {pool_threads()}; load average "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    memory(args.n, args.k, args.caps)
    if args.cost:
        cost(args.cost_caps)


if __name__ == "__main__":
    main()
