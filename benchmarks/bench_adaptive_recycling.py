"""Adaptive recycling (``recycle.adaptive``) against no recycling and fixed Ritz recycling.

For each case, three fresh engines (recycle none; Ritz with k vectors; Ritz adaptive with
at most k) train from the same θ with Adam (lr 1e-2), stepped in turn in one process so
that they see the same machine load; the lower level is Newton–Krylov (gtol 1e-6).  The
Hessian phase of a step is the recycle/stopping set-up plus the Krylov solve (the engine's
measured ``PhaseTimes.recycle + krylov``; linearisation, −Jᵀw and the lower level are
the same work in all three and left out).

Cases (BSDS ones skipped without the data):
* ``mnist``: MNIST inpainting (embedded digits 0..B−1, 40 % removed, 5 % noise), FoE 24
  DCT 5×5 Lorentzian, p = −1, k = 10, MINRES rtol 1e-3;
* ``bsds64``: BSDS300 train crops 64×64, Gaussian blur σ = 1.5, 1 % noise, FoE 16 DCT 7×7
  Lorentzian, p = −2, k = 30, rtol 1e-3;
* ``bsds256``: the same on 256×256 crops with rtol 1e-6 (long systems, where recycling
  must pay).

``--preconditioner`` adds the same three with the FFT preconditioner M on the Hessian solve
(``M``, ``ritz+M``, ``adaptive+M``; building M counts in the Hessian phase); ``--rtol``
replaces the cases' tolerance (BSDS 64×64 at 1e-6 is the preconditioning issue's case).

Prints per case and mode the Hessian-phase seconds (sum over steps), its ratio to no
recycling, Krylov iterations and operator applications, the adaptive run's dimension per
step, and the largest relative difference of the upper losses against no recycling.

    python benchmarks/bench_adaptive_recycling.py [--cases mnist bsds64 bsds256]
        [--steps 20] [--batch 4] [--data ../shared/data/bsds300] [--preconditioner]
        [--rtol 1e-6]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backends import get_backend, tune_cpu_allocator
from backends.threads import pool_threads
from framework.bilevel.engine import BilevelEngine, EngineConfig, LowerSolver
from framework.krylov.recycle import RecycleConfig
from framework.krylov.stopping import StopConfig
from framework.optim import Adam
from problems import FieldsOfExperts, GaussianBlur, ImagingProblem, Inpainting
from problems.datasets import load_bsds300, load_embedded_mnist
from problems.foe import dct_filters, initial_theta

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bsds300"
MODES = ("none", "ritz", "adaptive")


@dataclass(frozen=True)
class Case:
    name: str
    dim: int
    rtol: float
    kernel: int
    exponent: float


CASES = {"mnist": Case("mnist", 10, 1e-3, 5, -1.0), "bsds64": Case("bsds64", 30, 1e-3, 7, -2.0),
         "bsds256": Case("bsds256", 30, 1e-6, 7, -2.0)}


def problems(case: Case, data: Path, batch: int, be, crop: int | None = None) -> list | None:
    if case.name == "mnist":
        images = load_embedded_mnist().images[:batch]
        reg = FieldsOfExperts(images[0].shape, 5, 24, expert="lorentzian")
        return [ImagingProblem.from_image(img, be, Inpainting(img.shape, 0.4, seed=i), reg,
                                          noise_level=0.05, seed=i)
                for i, img in enumerate(images)]
    if not (data / "images" / "train").is_dir():
        return None
    crop = crop or (64 if case.name == "bsds64" else 256)
    images = load_bsds300(data, "train", crop=crop, count=batch)
    reg = FieldsOfExperts(images[0].shape, 7, 16, expert="lorentzian")
    return [ImagingProblem.from_image(img, be, GaussianBlur(img.shape, 1.5), reg,
                                      noise_level=0.01, seed=i)
            for i, img in enumerate(images)]


def engine(case: Case, mode: str, samples: list, be) -> BilevelEngine:
    kind = mode.removesuffix("+M")
    recycle = RecycleConfig() if kind in ("none", "M") else RecycleConfig(
        "ritz", case.dim, adaptive=kind == "adaptive")
    cfg = EngineConfig(recycle=recycle, stop=StopConfig(rtol=case.rtol), lower_gtol=1e-6,
                       lower_solver=LowerSolver.newton_krylov,
                       preconditioner="fft" if mode.endswith("M") else "none")
    return BilevelEngine(samples, cfg, backend=be)


def run_case(case: Case, samples: list, steps: int, be,
             modes: tuple[str, ...] = MODES) -> dict[str, list[dict]]:
    runs = {mode: dict(engine=engine(case, mode, samples, be), adam=Adam(lr=1e-2), log=[],
                       theta=be.asarray(initial_theta(
                           dct_filters(case.kernel)[: samples[0].regularizer.num_filters],
                           case.exponent)))
            for mode in modes}
    for _ in range(steps):
        for mode in modes:
            run = runs[mode]
            result = run["engine"].evaluate(run["theta"])
            run["theta"] = run["adam"].step(run["theta"], result.grad).theta
            s = result.samples
            run["log"].append(dict(
                hessian=result.times.recycle + result.times.krylov, loss=result.loss,
                iterations=sum(r.krylov_iterations for r in s), hvp=sum(r.hvp for r in s),
                dim=max(r.recycle_dim for r in s)))
    return {mode: runs[mode]["log"] for mode in modes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--preconditioner", action="store_true",
                        help="also M, ritz+M and adaptive+M (FFT preconditioner)")
    parser.add_argument("--rtol", type=float, default=None, help="every case's tolerance")
    args = parser.parse_args()
    modes = MODES + (("M", "ritz+M", "adaptive+M") if args.preconditioner else ())
    tune_cpu_allocator()
    be = get_backend("numpy")
    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"inputs: {args.steps} Adam steps (lr 1e-2), B = {args.batch} samples per step, "
          f"Newton–Krylov lower level (gtol 1e-6); BLAS threads (threadpoolctl): "
          f"{pool_threads()}")
    for name in args.cases:
        case = CASES[name]
        if args.rtol is not None:
            case = replace(case, rtol=args.rtol)
        samples = problems(case, args.data, args.batch, be)
        if samples is None:
            print(f"\n{name}: skipped (no BSDS300 at {args.data})")
            continue
        logs = run_case(case, samples, args.steps, be, modes)
        plain = sum(s["hessian"] for s in logs["none"])
        print(f"\n{name} (k = {case.dim}, rtol {case.rtol:g}, n = {samples[0].n})")
        print(f"{'mode':<10} {'Hessian s':>10} {'/ none':>7} {'iterations':>11} {'HVPs':>7} "
              f"{'max rel loss diff':>18}")
        for mode in modes:
            log = logs[mode]
            seconds = sum(s["hessian"] for s in log)
            diff = max(abs(a["loss"] - b["loss"]) / abs(b["loss"])
                       for a, b in zip(log, logs["none"], strict=True))
            print(f"{mode:<10} {seconds:>10.3f} {seconds / plain:>7.3f} "
                  f"{sum(s['iterations'] for s in log):>11} {sum(s['hvp'] for s in log):>7} "
                  f"{diff:>18.2e}")
        for mode in modes:
            if mode.startswith("adaptive"):
                print(f"{mode} dimension per step:", " ".join(str(s["dim"]) for s in logs[mode]))


if __name__ == "__main__":
    main()
