"""Batched vs one-by-one hypergradients: time per outer step on a mini-batch.

B MNIST inpainting samples (embedded digits, 28×28, 50 % removed, 5 % noise), FoE with 24
DCT 5×5 Lorentzian filters; both engines start from the same θ and take the same Adam
steps (the batched engine reproduces the per-sample one, so the work is identical), with
Ritz recycling (k configurable).  Time per outer step is the median over the steps after
the first; ratios are measured side by side in this run.

    python benchmarks/bench_batched_engine.py [--batch 16] [--steps 6] [--k 5]
        [--backend numpy|cupy] [--dataset mnist|bsds --data ../shared/data] [--sigma 3]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import statistics
import sys
import time

from backends import get_backend, tune_cpu_allocator
from framework.batched_engine import BatchedBilevelEngine
from framework.engine import BilevelEngine, EngineConfig
from framework.krylov.recycle import RecycleConfig
from framework.krylov.stopping import StopConfig
from framework.outer import Adam
from problems import (
    FieldsOfExperts,
    GaussianBlur,
    ImagingProblem,
    Inpainting,
    dct_filters,
    load_bsds300,
    load_embedded_mnist,
)
from problems.foe import initial_theta


def build(be, args):
    if args.dataset == "mnist":
        images = load_embedded_mnist().images[: args.batch]
        shape = (28, 28)

        def op(i):
            return Inpainting(shape, 0.5, seed=i)

        noise = 0.05
    else:
        images = load_bsds300(args.data + "/bsds300", "train", crop=args.crop, count=args.batch)
        shape = (args.crop, args.crop)

        def op(i):
            return GaussianBlur(shape, args.sigma)

        noise = 0.2
    reg = FieldsOfExperts(shape, 5, 24, expert="lorentzian")
    return [ImagingProblem.from_image(img, be, op(i), reg, noise_level=noise, seed=i)
            for i, img in enumerate(images)]


def run(engine, theta0, steps, sync):
    theta, adam, times, iters = theta0, Adam(lr=1e-2), [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        result = engine.evaluate(theta)
        theta = adam.step(theta, result.grad).theta
        sync()
        times.append(time.perf_counter() - t0)
        iters.append(sum(r.krylov_iterations for r in result.samples))
    return times, iters, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--dataset", choices=["mnist", "bsds"], default="mnist")
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--sigma", type=float, default=3.0)
    parser.add_argument("--check-every", type=int, default=8)
    parser.add_argument("--skip-unbatched", action="store_true")
    args = parser.parse_args()
    tuned = tune_cpu_allocator()
    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"inputs: backend {args.backend}, B = {args.batch} {args.dataset} samples, FoE 24 DCT "
          f"5×5 Lorentzian, Ritz k = {args.k}, MINRES rtol 1e-3, L-BFGS gtol 1e-6, "
          f"{args.steps} Adam steps, check_every = {args.check_every}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}, "
          f"glibc heap tuning {'on' if tuned else 'off'}")
    be = get_backend(args.backend)
    problems = build(be, args)
    cfg = EngineConfig(recycle=RecycleConfig("ritz", args.k), stop=StopConfig(rtol=1e-3),
                       lower_gtol=1e-6)
    theta0 = be.asarray(initial_theta(dct_filters(5), -1.0))
    rows = {}
    engines = [("batched", BatchedBilevelEngine(problems, cfg, backend=be,
                                                check_every=args.check_every))]
    if not args.skip_unbatched:
        engines.insert(0, ("one-by-one", BilevelEngine(problems, cfg, backend=be)))
    for name, engine in engines:
        times, iters, last = run(engine, theta0, args.steps, be.sync)
        per_step = statistics.median(times[1:]) if len(times) > 1 else times[0]
        m = last.metrics()
        apps = m.get("batch_applications", m["operator_applications"])
        passes = m.get("batch_passes", m["operator_passes"])
        rows[name] = per_step
        print(f"{name:<11} {per_step * 1e3:9.1f} ms/step  Krylov iterations/step {iters[-1]:5d}  "
              f"last step: applications {apps:.0f}, passes {passes:.0f}, "
              f"{apps / sum(r.time_krylov + r.time_recycle + r.time_jac for r in last.samples):.0f}"
              f" Hessian-phase applications/s")
    if len(rows) == 2:
        print(f"speed-up batched vs one-by-one: {rows['one-by-one'] / rows['batched']:.2f}×")
    if args.backend == "cupy":
        import cupy

        print(f"peak GPU memory (pool): {cupy.get_default_memory_pool().total_bytes() / 2**20:.1f}"
              " MiB")


if __name__ == "__main__":
    main()
