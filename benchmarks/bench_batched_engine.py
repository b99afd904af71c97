"""Batched vs one-by-one hypergradients: time per outer step on a mini-batch.

B MNIST inpainting samples (embedded digits, 28×28, 50 % removed, 5 % noise), FoE with 24
DCT 5×5 Lorentzian filters; both engines start from the same θ and take the same Adam
steps (the batched engine reproduces the per-sample one, so the work is identical), with
Ritz recycling (k configurable).  Time per outer step is the median over the steps after
the first; ratios are measured side by side in this run.

    python benchmarks/bench_batched_engine.py [--batch 16] [--steps 6] [--k 5]
        [--backends numpy cupy] [--dataset mnist|bsds --data ../shared/data] [--sigma 3]

GPU check (issue 6): B = 64 BSDS 64×64 crops, blur σ = 3, CuPy vs NumPy in one run:

    python benchmarks/bench_batched_engine.py --dataset bsds --batch 64 --crop 64 \
        --backends numpy cupy --skip-unbatched --steps 4
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


def run(engine, theta0, steps, sync, peak):
    theta, adam, times, iters = theta0, Adam(lr=1e-2), [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        result = engine.evaluate(theta)
        theta = adam.step(theta, result.grad).theta
        sync()
        times.append(time.perf_counter() - t0)
        iters.append(sum(r.krylov_iterations for r in result.samples))
        peak()
    return times, iters, result


def gpu_memory_probe(backend_name: str):
    """A callable recording the CuPy pool's high-water mark (no-op elsewhere)."""
    state = {"peak": 0}
    if backend_name != "cupy":
        return (lambda: None), state
    import cupy

    pool = cupy.get_default_memory_pool()

    def probe() -> None:
        state["peak"] = max(state["peak"], pool.total_bytes())

    return probe, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--backends", nargs="+", default=["numpy"])
    parser.add_argument("--dataset", choices=["mnist", "bsds"], default="mnist")
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--sigma", type=float, default=3.0)
    parser.add_argument("--check-every", type=int, default=8)
    parser.add_argument("--skip-unbatched", action="store_true")
    args = parser.parse_args()
    tuned = tune_cpu_allocator()
    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"inputs: backends {args.backends}, B = {args.batch} {args.dataset} samples, FoE 24 "
          f"DCT 5×5 Lorentzian, Ritz k = {args.k}, MINRES rtol 1e-3, L-BFGS gtol 1e-6, "
          f"{args.steps} Adam steps (median of steps 2..), check_every = {args.check_every}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}, "
          f"glibc heap tuning {'on' if tuned else 'off'}")
    cfg = EngineConfig(recycle=RecycleConfig("ritz", args.k), stop=StopConfig(rtol=1e-3),
                       lower_gtol=1e-6)
    per_step = {}
    for backend_name in args.backends:
        be = get_backend(backend_name)
        problems = build(be, args)
        n = problems[0].n
        theta0 = be.asarray(initial_theta(dct_filters(5), -1.0))
        engines = [("batched", BatchedBilevelEngine(problems, cfg, backend=be,
                                                    check_every=args.check_every))]
        if not args.skip_unbatched:
            engines.insert(0, ("one-by-one", BilevelEngine(problems, cfg, backend=be)))
        for name, engine in engines:
            probe, mem = gpu_memory_probe(backend_name)
            times, iters, last = run(engine, theta0, args.steps, be.sync, probe)
            step = statistics.median(times[1:]) if len(times) > 1 else times[0]
            per_step[(backend_name, name)] = step
            m = last.metrics()
            apps = m.get("batch_applications", m["operator_applications"])
            passes = m.get("batch_passes", m["operator_passes"])
            hess_time = sum(r.time_krylov + r.time_recycle + r.time_jac for r in last.samples)
            line = (f"{backend_name:<6} {name:<11} {step * 1e3:9.1f} ms/step  Krylov "
                    f"iterations/step {iters[-1]:5d}  last step: applications {apps:.0f}, "
                    f"passes {passes:.0f}, {apps / hess_time:.0f} Hessian-phase applications/s")
            if backend_name == "cupy":
                line += f", peak GPU pool {mem['peak'] / 2**20:.1f} MiB"
            print(line)
        recycle_bytes = n * (2 * args.k) * 8
        print(f"{backend_name:<6} recycle state per sample: U and C, n·2k·8 = {recycle_bytes} B "
              f"(n = {n}); the harvest adds n·(m+1)·8 B while a solve runs")
    for backend_name in args.backends:
        if (backend_name, "one-by-one") in per_step:
            ratio = per_step[(backend_name, "one-by-one")] / per_step[(backend_name, "batched")]
            print(f"speed-up batched vs one-by-one on {backend_name}: {ratio:.2f}×")
    if ("numpy", "batched") in per_step and ("cupy", "batched") in per_step:
        ratio = per_step[("numpy", "batched")] / per_step[("cupy", "batched")]
        print(f"speed-up CuPy vs NumPy (batched): {ratio:.2f}×")


if __name__ == "__main__":
    main()
