"""Batched vs one-by-one hypergradients: time per outer step on a mini-batch.

B MNIST inpainting samples (embedded digits, 28×28, 50 % removed, 5 % noise), FoE with 24
DCT 5×5 Lorentzian filters; both engines start from the same θ and take the same Adam
steps (the batched engine reproduces the per-sample one, so the work is identical), with
Ritz recycling (k configurable).  The engines are stepped in turn (one-by-one, batched,
one-by-one, …) so that both see the same machine load; time per outer step is the median
over the steps after the first, and the speed-up is the median of the per-step ratios.

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
from framework.bilevel.batched_engine import BatchedBilevelEngine
from framework.bilevel.engine import BilevelEngine, EngineConfig
from framework.krylov.recycle import RecycleConfig
from framework.krylov.stopping import StopConfig
from framework.optim import Adam
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


class Run:
    """One engine's outer run: its own θ and Adam state, step times and last result."""

    def __init__(self, name, engine, theta0, sync, peak):
        self.name, self.engine, self.sync, self.peak = name, engine, sync, peak
        self.theta, self.adam = theta0, Adam(lr=1e-2)
        self.times, self.iters, self.result = [], [], None

    def step(self):
        t0 = time.perf_counter()
        result = self.engine.evaluate(self.theta)
        self.theta = self.adam.step(self.theta, result.grad).theta
        self.sync()
        self.times.append(time.perf_counter() - t0)
        self.iters.append(sum(r.krylov_iterations for r in result.samples))
        self.result = result
        self.peak()


def run_interleaved(runs, steps):
    """Step the engines in turn (A, B, A, B, …) so that both see the same machine load;
    the per-step ratio is then measured side by side."""
    for _ in range(steps):
        for r in runs:
            r.step()


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
    parser.add_argument("--check-every", type=int, default=None,
                        help="batched host checks (default: 1 on the CPU, 8 on a GPU)")
    parser.add_argument("--skip-unbatched", action="store_true")
    args = parser.parse_args()
    tuned = tune_cpu_allocator()
    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"inputs: backends {args.backends}, B = {args.batch} {args.dataset} samples, FoE 24 "
          f"DCT 5×5 Lorentzian, Ritz k = {args.k}, MINRES rtol 1e-3, L-BFGS gtol 1e-6, "
          f"{args.steps} Adam steps (median of steps 2..), engines stepped in turn, "
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
        runs = []
        if not args.skip_unbatched:
            runs.append(Run("one-by-one", BilevelEngine(problems, cfg, backend=be), theta0,
                            be.sync, lambda: None))
        probe, mem = gpu_memory_probe(backend_name)
        batched = BatchedBilevelEngine(problems, cfg, backend=be, check_every=args.check_every)
        runs.append(Run("batched", batched, theta0, be.sync, probe))
        print(f"{backend_name:<6} batched engine checks convergence every "
              f"{batched.check_every} iteration(s)")
        run_interleaved(runs, args.steps)
        for r in runs:
            step = statistics.median(r.times[1:]) if len(r.times) > 1 else r.times[0]
            per_step[(backend_name, r.name)] = step
            m = r.result.metrics()
            apps = m.get("batch_applications", m["operator_applications"])
            passes = m.get("batch_passes", m["operator_passes"])
            samples = r.result.samples
            hess_time = sum(x.time_krylov + x.time_recycle + x.time_jac for x in samples)
            lower_time = sum(x.time_lower for x in samples)
            line = (f"{backend_name:<6} {r.name:<11} {step * 1e3:9.1f} ms/step  Krylov "
                    f"iterations/step {r.iters[-1]:5d}  last step: applications {apps:.0f}, "
                    f"passes {passes:.0f}, {apps / hess_time:.0f} Hessian-phase "
                    f"applications/s; lower level {lower_time * 1e3:.0f} ms, Hessian phase "
                    f"{hess_time * 1e3:.0f} ms")
            if "batch_host_syncs" in m:
                line += f"; host syncs {m['batch_host_syncs']:.0f}"
            if backend_name == "cupy" and r.name == "batched":
                line += f", peak GPU pool {mem['peak'] / 2**20:.1f} MiB"
            print(line)
        if len(runs) == 2:
            ratios = [a / b for a, b in zip(runs[0].times[1:], runs[1].times[1:], strict=True)]
            per_step[(backend_name, "ratios")] = ratios
        recycle_bytes = n * (2 * args.k) * 8
        print(f"{backend_name:<6} recycle state per sample: U and C, n·2k·8 = {recycle_bytes} B "
              f"(n = {n}); the harvest adds n·(m+1)·8 B while a solve runs")
    for backend_name in args.backends:
        ratios = per_step.get((backend_name, "ratios"))
        if ratios:
            print(f"speed-up batched vs one-by-one on {backend_name}: median "
                  f"{statistics.median(ratios):.2f}× (per-step ratios of interleaved steps "
                  f"2..{args.steps}: {min(ratios):.2f}–{max(ratios):.2f}×)")
    if ("numpy", "batched") in per_step and ("cupy", "batched") in per_step:
        ratio = per_step[("numpy", "batched")] / per_step[("cupy", "batched")]
        print(f"speed-up CuPy vs NumPy (batched): {ratio:.2f}×")


if __name__ == "__main__":
    main()
