"""Whole-loop speed: outer steps of this tree's lower-level choices against the
pre-redesign main (L-BFGS, batched engine), side by side in one run.

Cases (FoE with Lorentzian experts, Ritz recycling k = 5 for the hypergradient, MINRES
rtol 1e-3, lower gtol 1e-6, Adam lr 1e-2 from the same θ):

* ``mnist``: embedded MNIST digits 28×28, 50 % inpainting, 5 % noise, 24 DCT 5×5 filters
  (p = −1), B samples per step (``--batch``, 1 and 16 in the README);
* ``bsds64``: BSDS300 train crops 64×64, Gaussian blur σ = 1.5, 1 % noise, 16 DCT 7×7
  filters (p = −2), B = 4 (needs ``--data``).

Runs, each in its own worker process, stepped in turn so that all see the same load:
``old`` (tag ``pre-redesign``: ``BatchedBilevelEngine``, L-BFGS), and this tree's engine
with ``lbfgs``, ``newton_krylov``, ``newton_krylov`` with the FFT preconditioner on its
inner solves (``nk_fft``; ``solver.lower.preconditioner=fft``), each of these two with
adaptive recycling instead of Ritz k = 5 (``nk_auto``, ``nk_fft_auto``;
``recycle.adaptive=true``: Ritz vectors, at most 5, only while they pay in seconds), and with
the preconditioner on the hypergradient solve too, which then does not recycle
(``nk_fft_all``; also
``solver.preconditioner=fft recycle=none``: its hypergradients meet rtol in the
preconditioner's norm, so its θ path differs from the others' by the solve's accuracy).
Prints, per run, the median over steps 2.. of the step and lower-level milliseconds and
their ratios to ``old`` (and the ratio of the step's process CPU time, which other jobs
on the machine disturb less; ratios are medians of per-step ratios), lower-level counts
per step (iterations, f+∇f evaluations, HVPs, summed over the samples), Krylov
iterations per step, and how far the run's upper losses and θ path are from ``old``'s
(largest relative difference).

    python benchmarks/bench_whole_loop.py [--case mnist] [--batch 16] [--steps 8]
        [--data ../shared/data/bsds300] [--tag pre-redesign]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

MODES = ("old", "lbfgs", "newton_krylov", "nk_auto", "nk_fft", "nk_fft_auto", "nk_fft_all")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bsds300"


def _samples(case: str, batch: int, data: str, be) -> tuple[list, object]:
    """The case's problems and its initial θ, built from the cwd's tree."""
    from problems import FieldsOfExperts, GaussianBlur, ImagingProblem, Inpainting
    from problems.datasets import load_bsds300, load_embedded_mnist
    from problems.foe import dct_filters, initial_theta

    if case == "mnist":
        images = load_embedded_mnist().images[:batch]
        reg = FieldsOfExperts(images[0].shape, 5, 24, expert="lorentzian")
        return ([ImagingProblem.from_image(img, be, Inpainting(img.shape, 0.5, seed=i), reg,
                                           noise_level=0.05, seed=i)
                 for i, img in enumerate(images)], initial_theta(dct_filters(5), -1.0))
    images = load_bsds300(data, "train", crop=64, count=batch)
    reg = FieldsOfExperts(images[0].shape, 7, 16, expert="lorentzian")
    return ([ImagingProblem.from_image(img, be, GaussianBlur(img.shape, 1.5), reg,
                                       noise_level=0.01, seed=i)
             for i, img in enumerate(images)], initial_theta(dct_filters(7)[:16], -2.0))


def worker(mode: str, case: str, batch: int, data: str) -> None:
    """Build the run of ``mode`` from the cwd's tree; answer one JSON line per 'step'."""
    sys.path.insert(0, os.getcwd())
    from backends import get_backend, tune_cpu_allocator
    from framework.krylov.recycle import RecycleConfig
    from framework.krylov.stopping import StopConfig

    tune_cpu_allocator()
    be = get_backend("numpy")
    problems, theta0 = _samples(case, batch, data, be)
    common = dict(recycle=RecycleConfig("ritz", 5), stop=StopConfig(rtol=1e-3),
                  lower_gtol=1e-6)
    if mode == "old":
        from framework.batched_engine import BatchedBilevelEngine
        from framework.engine import EngineConfig
        from framework.outer import Adam

        engine = BatchedBilevelEngine(problems, EngineConfig(**common), backend=be)
    else:
        from framework.bilevel.engine import BilevelEngine, EngineConfig
        from framework.optim import Adam

        lower = dict(lower_solver="lbfgs") if mode == "lbfgs" else dict(
            lower_solver="newton_krylov",
            lower_preconditioner="fft" if mode.startswith("nk_fft") else "none")
        if mode.endswith("auto"):  # recycle only while it pays (at most k = 5)
            common.update(recycle=RecycleConfig("ritz", 5, adaptive=True))
        if mode == "nk_fft_all":  # the hypergradient solve preconditioned too (no recycling)
            common.update(recycle=RecycleConfig(), preconditioner="fft")
        engine = BilevelEngine(problems, EngineConfig(**common, **lower), backend=be)
    theta, adam = be.asarray(theta0), Adam(lr=1e-2)
    print(json.dumps({"ready": True}), flush=True)
    for _ in sys.stdin:
        t0, c0 = time.perf_counter(), time.process_time()
        result = engine.evaluate(theta)
        theta = adam.step(theta, result.grad).theta
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        m = result.metrics()
        print(json.dumps({
            "ms": seconds * 1e3, "cpu_ms": cpu * 1e3, "lower_ms": m["time_lower"] * 1e3,
            "loss": result.loss,
            "theta": be.to_numpy(theta).ravel().tolist(),
            **{key: m[key] for key in ("lower_iterations", "lower_grad_evals", "lower_hvp",
                                       "krylov_iterations")},
        }), flush=True)


def _relative(a: list[float], b: list[float]) -> float:
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("mnist", "bsds64"), default="mnist")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--tag", default="pre-redesign")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, case, batch, data = args.worker
        worker(mode, case, int(batch), data)
        return
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.trees import ROOT, blas_threads, checkout, stepped_workers

    if args.case == "bsds64" and not (args.data / "images" / "train").is_dir():
        sys.exit(f"bsds64 needs the BSDS300 folder (with images/train): --data {args.data} "
                 "has none")
    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"inputs: case {args.case}, B = {args.batch}, {args.steps} Adam steps (lr 1e-2), "
          f"Ritz k = 5, MINRES rtol 1e-3, lower gtol 1e-6, runs stepped in turn; BLAS "
          f"(threadpoolctl): {blas_threads()}; old = BatchedBilevelEngine of tag {args.tag}")
    me = os.path.abspath(__file__)
    with checkout(args.tag) as old_root:
        steps = stepped_workers(
            {mode: ([sys.executable, me, "--worker", mode, args.case, str(args.batch),
                     str(args.data)], old_root if mode == "old" else ROOT) for mode in MODES},
            args.steps)
    old = steps["old"]
    print(f"{'run':<14} {'ms/step':>9} {'lower ms':>9} {'step/old':>9} {'cpu/old':>8} "
          f"{'lower/old':>10} "
          f"{'lower it':>9} {'f+∇f':>6} {'HVP':>6} {'Krylov it':>10} {'loss vs old':>12} "
          f"{'θ vs old':>9}   (counts: medians per step, summed over samples)")
    for mode in MODES:
        s = steps[mode][1:]
        median = lambda key, s=s: statistics.median(x[key] for x in s)  # noqa: E731
        ratio = lambda key, s=s: statistics.median(  # noqa: E731
            x[key] / y[key] for x, y in zip(s, old[1:], strict=True))
        loss = max(abs(x["loss"] - y["loss"]) / abs(y["loss"])
                   for x, y in zip(steps[mode], old, strict=True))
        theta = max(_relative(x["theta"], y["theta"]) for x, y in zip(steps[mode], old,
                                                                       strict=True))
        print(f"{mode:<14} {median('ms'):>9.1f} {median('lower_ms'):>9.1f} "
              f"{ratio('ms'):>9.3f} {ratio('cpu_ms'):>8.3f} {ratio('lower_ms'):>10.3f} "
              f"{median('lower_iterations'):>9.0f} {median('lower_grad_evals'):>6.0f} "
              f"{median('lower_hvp'):>6.0f} {median('krylov_iterations'):>10.0f} "
              f"{loss:>12.1e} {theta:>9.1e}")


if __name__ == "__main__":
    main()
