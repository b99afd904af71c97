"""Compaction on and off, side by side: seconds per outer step and per phase, Krylov
iterations, Hessian applications (rows × passes) and passes.

    python benchmarks/bench_compaction.py [--steps 4] [--theta-path theta.npz] [override ...]

Two engines of the same config (Hydra overrides as for ``hyperkrylov``; default: the
default job's problem, B = all its samples) differ only in ``solver.compact_rows``: 0
(off) and the config's (on; default 16).  Along one
θ path (gradient steps θ ← θ − ``outer.lr``·∇θ from the uncompacted engine's
hypergradients, from ``--theta-path``'s θ or the problem's θ₀) both evaluate every θ,
alternating which goes first, so both see the same load; their losses must agree to the
bit.  Printed per
engine: the median over the steps after the first of the step's seconds and of its
Hessian (Krylov) phase, and the totals of Krylov iterations (identical by construction),
Hessian applications and passes as the problem counts them (the lower level's separately).
For the BSDS recipe of the README:

    python benchmarks/bench_compaction.py experiment=bsds_deblur_learn \\
        problem.data_path=/path/to/BSDS300 --theta-path outputs/bsds-learn/theta.npz
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from threadpoolctl import threadpool_info

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from framework.experiment.config import validate  # noqa: E402
from framework.experiment.engine_setup import build_samples, make_engine  # noqa: E402
from framework.experiment.theta_file import read_theta  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--theta-path", default=None)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides")
    args = parser.parse_intermixed_args()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = validate(compose(config_name="config",
                               overrides=[*args.overrides, "tracking=disabled"]))
    backend, problem_set = build_samples(cfg)
    engines, rows_on = {}, cfg.solver.compact_rows
    if rows_on == 0:
        raise SystemExit("solver.compact_rows=0 turns compaction off; give a positive count")
    for compact in (False, True):
        cfg.solver.compact_rows = rows_on if compact else 0
        engines[compact] = make_engine(problem_set, cfg, backend)
    theta = backend.asarray(problem_set.theta0 if args.theta_path is None else read_theta(
        "--theta-path", args.theta_path, problem_set.theta0.shape))
    indices = list(range(len(problem_set)))
    blas = sum(entry["num_threads"] for entry in threadpool_info()
               if entry["user_api"] == "blas")
    print(f"command: python benchmarks/bench_compaction.py {' '.join(sys.argv[1:])}")
    print(f"B = {len(indices)} samples, {args.steps} steps, compact_rows {rows_on}; "
          f"BLAS threads {blas}; load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    rows: dict[bool, list[tuple]] = {False: [], True: []}
    for step in range(args.steps):
        results = {}
        for compact in ((False, True) if step % 2 == 0 else (True, False)):
            t0 = time.perf_counter()
            results[compact] = engines[compact].evaluate(theta, indices)
            seconds = time.perf_counter() - t0
            r = results[compact]
            rows[compact].append((seconds, r.times.krylov, r.times.lower,
                                  sum(s.krylov_iterations for s in r.samples),
                                  r.counts.hvp, r.counts.hvp_passes, r.lower_counts.hvp))
        if results[True].loss != results[False].loss:
            raise SystemExit(f"step {step + 1}: the losses differ "
                             f"({results[True].loss!r} vs {results[False].loss!r})")
        print(f"step {step + 1}: loss {results[False].loss:.6g}; s off/on "
              f"{rows[False][-1][0]:.2f}/{rows[True][-1][0]:.2f}; Krylov phase "
              f"{rows[False][-1][1]:.2f}/{rows[True][-1][1]:.2f}", flush=True)
        theta = theta - cfg.outer.lr * results[False].grad
    print("\n| compact | s/step | Krylov phase s | lower phase s | Krylov iterations "
          "| Hessian applications | Hessian passes | lower-level HVPs |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for compact, table in rows.items():
        later = table[1:] or table
        med = [statistics.median(r[k] for r in later) for k in range(3)]
        total = np.sum([r[3:] for r in table], axis=0)
        print(f"| {'on' if compact else 'off'} | {med[0]:.3f} | {med[1]:.3f} | {med[2]:.3f} | "
              + " | ".join(str(int(v)) for v in total) + " |")
    off, on = (statistics.median(r[0] for r in rows[c][1:] or rows[c]) for c in (False, True))
    print(f"\nspeed-up per step (medians after the first step): {off / on:.2f}×")


if __name__ == "__main__":
    main()
