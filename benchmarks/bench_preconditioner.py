"""The FFT preconditioner (problems/preconditioners.py) on the imaging Hessians: MINRES
iterations and seconds with and without it, side by side in one process.

Systems H(x*, θ) w = g: x* the lower-level solution (L-BFGS to ‖∇f‖ ≤ 1e-6) of the first
sample, θ the preset's initial DCT filters at exponent p (and 100× weaker, p − 2), g a
fixed random right-hand side; MINRES from a zero start to rtol.  Cases:

* ``bsds64`` / ``bsds256``: BSDS300 train crop (64×64, 256×256), Gaussian blur σ = 1.5,
  1 % noise, FoE 16 DCT 7×7 Lorentzian, p = −2 (the ``bsds_deblur`` preset) — skipped
  with a reason when the data folder is absent;
* ``mnist``: embedded MNIST digit, inpainting 40 %, 5 % noise, FoE 24 DCT 5×5, p = −1
  (the default preset).

Timing: ``--rounds`` rounds alternating plain / preconditioned, best of ``--repeats``
each; the preconditioned time includes building M.  Prints iterations, HVPs,
preconditioner applications, ms and the ratio, and the BLAS threads.

    python benchmarks/bench_preconditioner.py [--data ../shared/data/bsds300] [--rounds 3]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from backends import get_backend
from backends.counting import CountingOperator
from benchmarks.trees import blas_threads
from framework.krylov import rminres
from framework.optim import lbfgs
from problems.datasets import load_bsds300, load_embedded_mnist
from problems.foe import FieldsOfExperts, dct_filters, initial_theta
from problems.imaging import ImagingProblem
from problems.operators import GaussianBlur, Inpainting
from problems.preconditioners import fft_preconditioner

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bsds300"


def case_problem(case: str, data: Path, be):
    """(problem, kernel size, filters, exponent) of ``case``; None without its data."""
    if case == "mnist":
        image = load_embedded_mnist().images[0]
        reg = FieldsOfExperts(image.shape, 5, 24, expert="lorentzian")
        op = Inpainting(image.shape, 0.4, seed=0)
        problem = ImagingProblem.from_image(image, be, op, reg, noise_level=0.05, seed=0)
        return problem, 5, 24, -1.0
    if not (data / "images" / "train").is_dir():
        return None
    crop = 64 if case == "bsds64" else 256
    image = load_bsds300(data, "train", crop=crop, count=1)[0]
    reg = FieldsOfExperts(image.shape, 7, 16, expert="lorentzian")
    op = GaussianBlur(image.shape, 1.5)
    problem = ImagingProblem.from_image(image, be, op, reg, noise_level=0.01, seed=0)
    return problem, 7, 16, -2.0


def case_exponents(cases, data: Path, be, weaker: float = 2.0):
    """(case, problem, kernel size, filters, p) for each case and p in (p0, p0 − weaker)
    (p0 only when ``weaker`` is 0); prints a line for a case skipped without its data."""
    for case in cases:
        built = case_problem(case, data, be)
        if built is None:
            print(f"{case:>8}  skipped: no BSDS300 train images under {data}")
            continue
        problem, k, count, p0 = built
        for p in (p0, p0 - weaker) if weaker else (p0,):
            yield case, problem, k, count, p


def best(call, repeats: int) -> tuple[float, object]:
    out, t = None, float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = call()
        t = min(t, time.perf_counter() - t0)
    return t, out


def lower_solution(problem, theta):
    """x*(θ) by L-BFGS to ‖∇f‖ ≤ 1e-6."""
    return lbfgs(lambda x: problem.lower_objective(x, theta),
                 lambda x: problem.lower_grad(x, theta), problem.y, gtol=1e-6, maxiter=5000,
                 value_and_grad=lambda x: problem.lower_value_and_grad(x, theta)).x


def measure(problem, x, theta, g, rtol: float, rounds: int, repeats: int):
    """(plain result, preconditioned result, best seconds of each), alternating."""
    H = problem.linearize(x, theta)
    plain_op, pre_op = CountingOperator(H, problem.n), CountingOperator(H, problem.n)

    def plain():
        return rminres(plain_op, g, rtol=rtol)

    def preconditioned():
        return rminres(pre_op, g, rtol=rtol, M=fft_preconditioner(problem, x, theta))

    times, res = {"plain": float("inf"), "pre": float("inf")}, {}
    for _ in range(rounds):
        for name, call in (("plain", plain), ("pre", preconditioned)):
            t, res[name] = best(call, repeats)
            times[name] = min(times[name], t)
    return res["plain"], res["pre"], times["plain"], times["pre"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=["mnist", "bsds64", "bsds256"])
    args = parser.parse_args()
    be = get_backend("numpy")
    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"BLAS (threadpoolctl): {blas_threads()}; {args.rounds} alternating rounds, best of "
          f"{args.repeats}; preconditioned time includes building M")
    print(f"{'case':>8} {'p':>5} {'rtol':>6} {'its':>5} {'its M':>6} {'HVP':>5} {'HVP M':>6} "
          f"{'M appl':>6} {'ms':>8} {'ms M':>8} {'time M/plain':>12}")
    for case, problem, k, count, p in case_exponents(args.cases, args.data, be):
        theta = be.asarray(initial_theta(dct_filters(k)[:count], p))
        x = lower_solution(problem, theta)
        g = be.asarray(np.random.default_rng(0).standard_normal(problem.n))
        for rtol in (1e-3, 1e-6):
            a, b, t_a, t_b = measure(problem, x, theta, g, rtol, args.rounds, args.repeats)
            hvp_a, hvp_b = a.iterations + a.check_matvecs, b.iterations + b.check_matvecs
            print(f"{case:>8} {p:>5.1f} {rtol:>6.0e} {a.iterations:>5} {b.iterations:>6} "
                  f"{hvp_a:>5} {hvp_b:>6} {b.preconditioner_passes:>6} "
                  f"{t_a * 1e3:>8.1f} {t_b * 1e3:>8.1f} {t_b / t_a:>12.2f}"
                  f"{'' if a.converged and b.converged else '  NOT CONVERGED'}")


if __name__ == "__main__":
    main()
