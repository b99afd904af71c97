"""The batch-first problem's kernels against the old per-sample and batched twins, side by side.

Samples: the first B embedded MNIST digits (28×28), inpainting with 50 % of the pixels
removed (mask seed i for digit i), 5 % relative noise (seed i); 24 DCT 5×5 filters,
Lorentzian experts, exponents −1.  For each code version (this tree, and tag
``pre-redesign`` checked out into a temporary git worktree) a worker subprocess with that
tree as cwd times, per call and per sample:
  - B = 1 (one sample, x (n,)): the fused value+gradient, ``hvp`` (v (n,)), ``jac_t``
    (w (n,)), the linearised HVP of one vector and of a block (n, b) (what the Krylov
    solves use); old code: the per-sample ``ImagingProblem``;
  - B = 16 (X (B, n)): the same on the batch; old code: ``BatchedImagingProblem``;
  - the fused value+gradient per sample for batches of 1, 2, 4, … B.
Workers of the two versions alternate for ``--rounds`` rounds (so both see the same
machine load); each figure is the best over rounds of the best of ``--repeats`` means of
``--number`` calls.  Prints the command, the inputs, µs, new/old ratios and the BLAS
threads of each worker (one, unless OPENBLAS_NUM_THREADS is set).

Usage: python benchmarks/bench_batched_problem.py [--batch 16] [--rounds 3] [--ref pre-redesign]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def best_time(fn: Callable[[], object], repeats: int, number: int) -> float:
    """Best over ``repeats`` of the mean time of ``number`` calls, in µs."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best * 1e6


def worker(args: argparse.Namespace) -> None:
    """Time the kernels of the ``problems`` package found in the cwd; print JSON."""
    sys.path.insert(0, os.getcwd())
    import numpy as np
    from threadpoolctl import threadpool_info

    from backends import get_backend, tune_cpu_allocator
    from problems.datasets import load_embedded_mnist
    from problems.foe import FieldsOfExperts, dct_filters, initial_theta
    from problems.imaging import ImagingProblem
    from problems.operators import Inpainting

    try:  # the old tree: per-sample problems and a separate batched class
        from problems.batched import BatchedImagingProblem

        stack = BatchedImagingProblem.from_problems
    except ImportError:  # the batch-first tree
        stack = ImagingProblem.concat

    tune_cpu_allocator()
    be = get_backend("numpy")
    images = load_embedded_mnist().images[: args.batch]
    shape = images.shape[1:]
    reg = FieldsOfExperts(shape, 5, 24, expert="lorentzian")
    problems = [
        ImagingProblem.from_image(img, be, Inpainting(shape, 0.5, seed=i), reg,
                                  noise_level=0.05, seed=i)
        for i, img in enumerate(images)
    ]
    theta = be.asarray(initial_theta(dct_filters(5)[:24], -1.0))
    rng = np.random.default_rng(0)
    n, B, b = problems[0].n, args.batch, args.block
    rep, num = args.repeats, args.number
    out: dict[str, float] = {}

    one = problems[0]
    x = be.asarray(images[0].reshape(-1) + 0.05 * rng.standard_normal(n))
    v, vb = be.asarray(rng.standard_normal(n)), be.asarray(rng.standard_normal((n, b)))
    lin = one.linearize(x, theta)
    out["B=1 value+grad"] = best_time(lambda: one.lower_value_and_grad(x, theta), rep, num)
    out["B=1 hvp"] = best_time(lambda: one.hvp(x, theta, v), rep, num)
    out["B=1 jac_t"] = best_time(lambda: one.jac_t(x, theta, v), rep, num)
    out["B=1 linearized hvp"] = best_time(lambda: lin.hvp(v), rep, num)
    out[f"B=1 linearized hvp block b={b}"] = best_time(lambda: lin.hvp(vb), rep, num)
    out[f"B=1 linearized jac_t block b={b}"] = best_time(lambda: lin.jac_t(vb), rep, num)

    batch = stack(problems)
    X = be.asarray(images.reshape(B, n) + 0.05 * rng.standard_normal((B, n)))
    V = be.asarray(rng.standard_normal((B, n)))
    lin_b = batch.linearize(X, theta)
    per = f"B={B} per sample"
    out[f"{per} value+grad"] = best_time(lambda: batch.lower_value_and_grad(X, theta), rep,
                                         num) / B
    out[f"{per} hvp"] = best_time(lambda: batch.hvp(X, theta, V), rep, num) / B
    out[f"{per} jac_t"] = best_time(lambda: batch.jac_t(X, theta, V), rep, num) / B
    out[f"{per} linearized hvp"] = best_time(lambda: lin_b.hvp(V), rep, num) / B
    out[f"{per} linearized jac_t"] = best_time(lambda: lin_b.jac_t(V), rep, num) / B
    size = 1
    while size <= B:
        sub = stack(problems[:size])
        Xs = X[:size, :]
        out[f"curve B={size} value+grad per sample"] = best_time(
            lambda s=sub, a=Xs: s.lower_value_and_grad(a, theta), rep, num) / size
        size *= 2
    blas = [f"{i['internal_api']} {i['num_threads']}" for i in threadpool_info()
            if i["user_api"] == "blas"]
    print(json.dumps({"times": out, "blas": blas}))


def run_worker(cwd: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--batch", str(args.batch),
           "--block", str(args.block), "--repeats", str(args.repeats), "--number",
           str(args.number)]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker in {cwd} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--number", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ref", default="pre-redesign", help="git ref of the old code")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"inputs: {args.batch} MNIST digits 28×28, inpainting 50 %, FoE 24 DCT 5×5 filters "
          f"(Lorentzian), block b = {args.block}; best of {args.rounds} alternating rounds × "
          f"{args.repeats} repeats × {args.number} calls; OPENBLAS_NUM_THREADS="
          f"{os.environ.get('OPENBLAS_NUM_THREADS')}")
    with tempfile.TemporaryDirectory(prefix="bench-problem-") as tmp:
        old_tree = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q",
                        str(old_tree), args.ref], check=True)
        try:
            best: dict[str, dict[str, float]] = {"old": {}, "new": {}}
            blas: dict[str, list[str]] = {}
            for _ in range(args.rounds):
                for name, cwd in (("old", old_tree), ("new", REPO)):
                    got = run_worker(cwd, args)
                    blas[name] = got["blas"]
                    for key, value in got["times"].items():
                        best[name][key] = min(best[name].get(key, float("inf")), value)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                            str(old_tree)], check=False)
    print(f"BLAS threads: old {blas['old']}, new {blas['new']}")
    print(f"{'kernel (µs per sample)':<44} {'old ' + args.ref:>18} {'new':>10} {'new/old':>8}")
    for key, old in best["old"].items():
        new = best["new"][key]
        print(f"{key:<44} {old:>18.1f} {new:>10.1f} {new / old:>8.3f}")


if __name__ == "__main__":
    main()
