"""Time the batched imaging problem and the batched L-BFGS against per-sample loops.

Samples: the first B embedded MNIST digits (28×28), inpainting with 50 % of the pixels
removed (mask seed i for digit i), 5 % relative noise (seed i); 24 DCT 5×5 filters,
Lorentzian experts, exponents −1.  Prints the command, the inputs, and
  - one batched HVP (B, n) vs B unbatched HVPs, each with and without ``linearize``;
  - a block of b vectors per sample (B, n, b), batched, linearized;
  - the fused lower-level value and gradient per sample for batches of 1, 2, 4, … B:
    how much a batch saves per sample on this machine (the ceiling for any batched
    speed-up of the lower level, which dominates an outer step);
  - one batched L-BFGS (all B lower-level problems together, evaluating only the samples
    still searching) vs B sequential ``lbfgs`` runs, both with the fused evaluation.

Usage: python benchmarks/bench_batched_problem.py [--backend numpy|cupy] [--batch 16]

On the CPU, batched temporaries are a few MB (e.g. 24 × 16·784 float64); glibc would serve
each from a fresh mmap, and the page faults on first touch cost more than the arithmetic,
so the script calls ``backends.tune_cpu_allocator`` (as the runner does).  It sets one
BLAS thread unless OPENBLAS_NUM_THREADS is set.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import sys
import time
from collections.abc import Callable

import numpy as np

from backends import get_backend, tune_cpu_allocator
from framework.optim import lbfgs
from problems.batched import BatchedImagingProblem
from problems.datasets import load_embedded_mnist
from problems.foe import FieldsOfExperts, dct_filters, initial_theta
from problems.imaging import ImagingProblem
from problems.linearization import linearize
from problems.operators import Inpainting


def best_time(
    fn: Callable[[], object], sync: Callable[[], None], repeats: int, number: int
) -> float:
    """Best over ``repeats`` of the mean time of ``number`` calls, in ms."""
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        sync()
        best = min(best, (time.perf_counter() - start) / number)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--number", type=int, default=10)
    parser.add_argument("--gtol", type=float, default=1e-6)
    args = parser.parse_args()

    tuned = tune_cpu_allocator()
    be = get_backend(args.backend)
    sync = be.sync
    images = load_embedded_mnist().images[: args.batch]
    shape = images.shape[1:]
    reg = FieldsOfExperts(shape, 5, 24, expert="lorentzian")
    problems = [
        ImagingProblem.from_image(
            img, be, Inpainting(shape, 0.5, seed=i), reg, noise_level=0.05, seed=i
        )
        for i, img in enumerate(images)
    ]
    batch = BatchedImagingProblem.from_problems(problems)
    theta = be.asarray(initial_theta(dct_filters(5), -1.0))
    rng = np.random.default_rng(0)
    B, n = batch.batch_size, batch.n
    X = batch.Y
    V = be.asarray(rng.standard_normal((B, n)))
    Vb = be.asarray(rng.standard_normal((B, n, args.block)))

    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"inputs: B={B} MNIST digits {shape}, Inpainting(0.5, seed=i), {reg!r}, "
          f"theta = DCT filters, exponent -1; backend {be!r}, float64")
    print(f"environment: OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}, "
          f"glibc heap tuning {'on' if tuned else 'off'}")

    def timed(fn: Callable[[], object], number: int = args.number) -> float:
        return best_time(fn, sync, args.repeats, number)

    lin_b = batch.linearize(X, theta)
    lins = [linearize(p, X[i, :], theta) for i, p in enumerate(problems)]
    rows = [V[i, :] for i in range(B)]
    xs = [X[i, :] for i in range(B)]
    t_loop = timed(lambda: [p.hvp(xs[i], theta, rows[i]) for i, p in enumerate(problems)])
    t_loop_lin = timed(lambda: [lins[i].hvp(rows[i]) for i in range(B)])
    t_batch = timed(lambda: batch.hvp(X, theta, V))
    t_batch_lin = timed(lambda: lin_b.hvp(V))
    t_block = timed(lambda: batch.hvp(X, theta, Vb), max(1, args.number // 5))
    t_block_lin = timed(lambda: lin_b.hvp(Vb), max(1, args.number // 5))
    t_lin_setup = timed(lambda: batch.linearize(X, theta))
    print(f"\nHVP, {B} samples × 1 vector (ms per {B} HVPs):")
    print(f"  {B} unbatched hvp calls         {t_loop:9.3f}")
    print(f"  {B} unbatched linearized hvp    {t_loop_lin:9.3f}   "
          f"(×{t_loop / t_loop_lin:.2f} vs unbatched)")
    print(f"  1 batched hvp                   {t_batch:9.3f}   "
          f"(×{t_loop / t_batch:.2f} vs unbatched)")
    print(f"  1 batched linearized hvp        {t_batch_lin:9.3f}   "
          f"(×{t_loop / t_batch_lin:.2f} vs unbatched, ×{t_batch / t_batch_lin:.2f} vs batched)")
    print(f"  batched linearize() setup       {t_lin_setup:9.3f}   (once per (X, θ))")
    print(f"HVP, {B} samples × block of {args.block} (ms per pass of {B * args.block} HVPs):")
    print(f"  batched hvp                     {t_block:9.3f}")
    print(f"  batched linearized hvp          {t_block_lin:9.3f}   (×{t_block / t_block_lin:.2f})")

    print(f"\nFused lower-level value and gradient, per sample (µs), batches of the first "
          f"b samples; the unbatched call on one sample: "
          f"{timed(lambda: problems[0].lower_value_and_grad(xs[0], theta)) * 1e3:.0f} µs")
    size = 1
    while size <= B:
        sub = batch.subset(range(size))
        Xs = X[:size, :]
        t = timed(lambda sub=sub, Xs=Xs: sub.lower_value_and_grad(Xs, theta))
        print(f"  b = {size:3d}   {t * 1e3 / size:7.0f} µs/sample")
        size *= 2

    def fun(Z):
        return batch.lower_objective(Z, theta)

    def grad(Z):
        return batch.lower_grad(Z, theta)

    def rows_value_and_grad(Z, rows):
        return batch.subset(rows).lower_value_and_grad(Z, theta)

    def solve_one(i: int):
        p = problems[i]
        return lbfgs(
            lambda z: p.lower_objective(z, theta), lambda z: p.lower_grad(z, theta), xs[i],
            gtol=args.gtol, maxiter=1000,
            value_and_grad=lambda z: p.lower_value_and_grad(z, theta),
        )

    batched_runs = []
    sequential_runs = []
    t_lb = timed(lambda: batched_runs.append(lbfgs(
        fun, grad, X, gtol=args.gtol, rows_value_and_grad=rows_value_and_grad)), 1)
    t_ls = timed(lambda: sequential_runs.append([solve_one(i) for i in range(B)]), 1)
    rb, rs = batched_runs[-1], sequential_runs[-1]
    its_s = [r.iterations for r in rs]
    Xb = be.to_numpy(rb.x)
    diff = max(
        np.linalg.norm(Xb[i] - be.to_numpy(r.x)) / np.linalg.norm(be.to_numpy(r.x))
        for i, r in enumerate(rs)
    )
    evals_s = sum(r.f_evals for r in rs)
    print(f"\nL-BFGS, {B} lower-level problems from y, gtol={args.gtol} (ms per solve of all {B}):")
    print(f"  {B} sequential lbfgs on (n,)     {t_ls:9.1f}   iterations "
          f"{min(its_s)}..{max(its_s)}, f/grad evaluations {evals_s}")
    print(f"  lbfgs on (B, n)                 {t_lb:9.1f}   (×{t_ls / t_lb:.2f})   iterations "
          f"{min(rb.iterations)}..{max(rb.iterations)}, batched f/grad calls "
          f"{rb.evaluation_rounds}, "
          f"per-sample evaluations {sum(rb.f_evals)}")
    print(f"  all converged: batched {rb.all_converged}, sequential "
          f"{all(r.converged for r in rs)}; max relative difference of solutions {diff:.2e}")

if __name__ == "__main__":
    main()
