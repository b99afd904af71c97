"""Do BLAS threads pay?  One vs two threads (threadpoolctl) on this project's kernels.

    python benchmarks/bench_threads.py [--repeats 5]

Cases: the FoE lower-level value and gradient (MNIST 28×28 inpainting, one sample and
16 samples; BSDS300 256×256 deblurring when ../shared/data/bsds300 exists) and dense
quadratic-problem gradients (n = 256 … 2048, a q = 3 stack of n × n matrices).  Each case
is timed with 1 and 2 threads alternately (median of ``--repeats`` rounds) so that both see
the same machine load; the ratio t(1)/t(2) > 1 means the second thread pays.  This is what
``backends.threads.choose_num_threads`` is based on.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from threadpoolctl import threadpool_limits

REPO = Path(__file__).resolve().parents[1]
BSDS = REPO.parent / "shared" / "data" / "bsds300"
sys.path.insert(0, str(REPO))

from backends import get_backend  # noqa: E402
from backends.threads import pool_threads  # noqa: E402
from framework.experiment.config import ProblemConfig  # noqa: E402
from problems.factory import build_problems  # noqa: E402
from problems.quadratic import QuadraticProblem  # noqa: E402


def _time(fn: Callable[[], object], threads: int, inner: int) -> float:
    with threadpool_limits(limits=threads):
        fn()
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - start) / inner


def _imaging_case(name: str, crop: int, count: int) -> tuple[str, Callable[[], object]]:
    be = get_backend("numpy")
    preset = OmegaConf.load(REPO / "conf" / "problem" / f"{name}.yaml")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ProblemConfig), preset))
    cfg.num_samples = count
    if name == "bsds_deblur":
        cfg.crop, cfg.data_path = crop, str(BSDS)
    problem_set = build_problems(cfg, be, 0)
    problems = problem_set.problems
    theta = be.asarray(problem_set.theta0)
    xs = [p.y for p in problems]

    def evaluate() -> object:
        return [p.lower_value_and_grad(x, theta) for p, x in zip(problems, xs, strict=True)]

    return f"FoE value+grad {name} {crop}×{crop}, {count} sample(s)", evaluate


def _dense_case(n: int) -> tuple[str, Callable[[], object]]:
    problem = QuadraticProblem(n=n, num_terms=3, seed=0)
    theta = np.zeros(3)
    x = np.ones(n)
    return f"dense quadratic gradient, n = {n} ({3 * n * n:,} entries)", (
        lambda: problem.lower_grad(x, theta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with threadpool_limits(limits=2):
        two = pool_threads()
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"cpus: {os.cpu_count()}, BLAS pool reaches {two} thread(s) when asked for 2; "
          f"load average {os.getloadavg()[0]:.1f}")
    cases = []
    cases.append(_imaging_case("mnist_inpainting", 28, 1))
    cases.append(_imaging_case("mnist_inpainting", 28, 16))
    if BSDS.is_dir():
        cases.append(_imaging_case("bsds_deblur", 256, 1))
    else:
        print(f"BSDS 256×256 case skipped: no images at {BSDS}")
    cases += [_dense_case(n) for n in (256, 512, 1024, 2048)]
    for label, fn in cases:
        start = time.perf_counter()
        fn()
        inner = max(1, int(0.05 / max(time.perf_counter() - start, 1e-6)))
        one, two_t = [], []
        for _ in range(args.repeats):
            one.append(_time(fn, 1, inner))
            two_t.append(_time(fn, 2, inner))
        t1, t2 = statistics.median(one), statistics.median(two_t)
        print(f"{label:55s} 1 thread {t1 * 1e3:8.3f} ms  2 threads {t2 * 1e3:8.3f} ms  "
              f"t1/t2 {t1 / t2:4.2f}")


if __name__ == "__main__":
    main()
