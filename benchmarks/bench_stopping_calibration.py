"""Calibration of the stopping rules: is the true relative hypergradient error ≤ τ?

For each sequence (the synthetic drifting sequence; MNIST inpainting and BSDS300 deblurring
recorded with the paper's *_small presets, shortened by ``--steps``) every rule
(``residual``, ``hypergradient`` = NSC, ``hypergradient_change`` at the safety factors
``--safety`` × rate windows ``--window``, and an oracle that knows w*) re-solves all systems
with warm starts and RGen-L(R) recycling at each tolerance τ; the true error
‖Jᵀw − Jᵀw*‖/‖Jᵀw*‖ of every system is measured against a tight solve (rtol 1e-10).
Prints per (sequence, τ, rule): the fraction of systems with error ≤ τ, max error/τ, the
iterations, operator applications (HVP + Jᵀ) and the share of NSC's iteration saving over
the residual rule that the rule keeps.  ``--sweep`` runs the safety factors
1, 1.5, 2, 3, 4 and adds the trade-off table: per sequence and τ, reliability (share ≤ τ,
max error/τ) against iterations and the NSC saving kept, one row per rule.  BSDS is
skipped (with the reason) without the data.

    python benchmarks/bench_stopping_calibration.py [--steps 30] [--k 10] [--sweep]
        [--safety 1 2] [--window 2] [--only synthetic mnist bsds]
        [--data ../shared/data/bsds300] [--mnist sequence.npz] [--bsds sequence.npz]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hydra import compose, initialize_config_module

from backends import get_backend
from backends.threads import pool_threads
from framework.experiment.resolve import load_sequence, problem_from_recording
from framework.experiment.runner import run
from framework.krylov.recycle import RecycleConfig
from framework.krylov.sequence import solve_sequence
from framework.krylov.stopping import IterationState, StopConfig
from problems.sequences import drifting_sequence

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bsds300"
TOLERANCES = (1e-2, 1e-3, 1e-4)
SWEEP = (1.0, 1.5, 2.0, 3.0, 4.0)


class OracleRule:
    """Stops at the first iterate whose true relative hypergradient error is ≤ rtol (it
    knows −Jᵀw*): the fewest iterations any reliable rule could take on this trajectory."""

    needs_residual, needs_iterate, batch = False, True, True

    def __init__(self, reference: Any, jac_t: Any, rtol: float) -> None:
        self.reference, self.jac_t, self.rtol = reference, jac_t, rtol

    def __call__(self, state: IterationState) -> Any:
        error = np.linalg.norm(self.jac_t(state.iterate) + self.reference, axis=-1)
        return error <= self.rtol * np.linalg.norm(self.reference)


@dataclass
class OracleStop(StopConfig):
    """``StopConfig`` whose rule is the oracle of the next system of the sequence."""

    references: Iterator[Any] = field(default_factory=lambda: iter(()))

    def rule(self, space: Any, jac_t: Any, b: Any) -> Any:
        return OracleRule(next(self.references), jac_t, self.rtol)


def recorded_systems(path: Path | None, preset: str, steps: int, extra: list[str], be) -> list:
    """Sample 0's systems of the recording ``path`` (when None: record ``steps`` outer
    steps of ``preset``, tracking off), with reference hypergradients."""
    with tempfile.TemporaryDirectory() as out:
        if path is None:
            overrides = [f"experiment={preset}", "task=record", "tracking=disabled",
                         "progress=false", f"outer.steps={steps}", *extra]
            with initialize_config_module(config_module="conf", version_base="1.3"):
                cfg = compose(config_name="config", overrides=overrides)
            path = run(cfg, output_dir=out).sequence_path
        recording = load_sequence(path)
        problem = problem_from_recording(recording, 0, be)
        return recording.systems(problem, be, sample=0, references=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="recorded steps per preset")
    parser.add_argument("--side", type=int, default=32, help="synthetic grid side")
    parser.add_argument("--k", type=int, default=10, help="recycle dimension")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--mnist", type=Path, help="a recorded sequence.npz to reuse")
    parser.add_argument("--bsds", type=Path, help="a recorded sequence.npz to reuse")
    parser.add_argument("--safety", type=float, nargs="+", default=[1.0, 2.0],
                        help="safety factors of hypergradient_change to run")
    parser.add_argument("--window", type=int, nargs="+", default=[StopConfig.window],
                        help="rate windows of hypergradient_change to run")
    parser.add_argument("--sweep", action="store_true",
                        help="safety 1, 1.5, 2, 3, 4 and the trade-off table")
    parser.add_argument("--only", nargs="+", default=["synthetic", "mnist", "bsds"])
    args = parser.parse_args()
    if args.sweep:
        args.safety = SWEEP
    be = get_backend("numpy")
    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"BLAS threads (threadpoolctl): {pool_threads()}; load average: {os.getloadavg()}")
    print(f"inputs: RGen-L(R) k = {args.k}, warm starts; synthetic n = {args.side}², "
          f"{args.steps} systems; MNIST / BSDS: sample 0 of {args.steps} recorded steps of "
          "paper_mnist_inpainting_small / paper_bsds_deblur_small")
    cases = {}
    t0 = time.perf_counter()
    if "synthetic" in args.only:
        cases["synthetic"] = drifting_sequence(side=args.side, count=args.steps).systems(
            with_jacobian=True, with_reference=True)
    if "mnist" in args.only:
        cases["mnist"] = recorded_systems(args.mnist, "paper_mnist_inpainting_small",
                                          args.steps, [], be)
    if "bsds" in args.only:
        if (args.data / "images" / "train").is_dir():
            cases["bsds"] = recorded_systems(args.bsds, "paper_bsds_deblur_small", args.steps,
                                             [f"problem.data_path={args.data}"], be)
        else:
            print(f"bsds: skipped (no BSDS300 at {args.data})")
    print(f"recorded and referenced in {time.perf_counter() - t0:.0f} s")
    print(f"\n| sequence | τ | rule | ≤ τ | max err/τ | iterations | HVP | Jᵀ | applications "
          f"| NSC saving kept |\n|{' --- |' * 10}")
    table = {}
    for name, systems in cases.items():
        for tol in TOLERANCES:
            rows = table[name, tol] = {}
            stops = {"residual": StopConfig("residual", rtol=tol),
                     "hypergradient": StopConfig("hypergradient", rtol=tol)}
            for window in args.window:
                for safety in args.safety:
                    stops[f"hypergradient_change, safety {safety:g}, window {window}"] = (
                        StopConfig("hypergradient_change", rtol=tol, safety=safety,
                                   window=window))
            stops["oracle (knows w*)"] = OracleStop(
                rtol=tol, references=iter([s.reference[None, :] for s in systems]))
            for rule, stop in stops.items():
                res = solve_sequence(systems, recycle=RecycleConfig("rgen_right", args.k),
                                     stop=stop)
                err = np.array([r.hg_error for r in res.records]) / tol
                rows[rule] = (np.mean(err <= 1), err.max(), res.iterations,
                              int(res.total("hvp")), int(res.total("jac_t")), res.applications)
            saving = rows["residual"][2] - rows["hypergradient"][2]
            for rule, (frac, worst, its, hvp, jt, apps) in rows.items():
                rows[rule] += ((rows["residual"][2] - its) / saving if saving > 0 else math.nan,)
                print(f"| {name} | {tol:g} | {rule} | {100 * frac:.0f} % | {worst:.2f} | {its} "
                      f"| {hvp} | {jt} | {apps} | {100 * rows[rule][-1]:.0f} % |", flush=True)
    if args.sweep:
        print_trade_off(table)
    print(f"total {time.perf_counter() - t0:.0f} s")


def print_trade_off(table: dict) -> None:
    """One row per rule, one column per (sequence, τ): share ≤ τ · max error/τ · iterations
    (NSC saving kept; the residual and NSC rows are the ends of the scale, 0 % and 100 %;
    — where NSC saves none)."""
    cells = list(table)
    print(f"\n| rule | {' | '.join(f'{name} {tol:g}' for name, tol in cells)} |\n"
          f"|{' --- |' * (len(cells) + 1)}")
    for rule in table[cells[0]]:
        entries = []
        for cell in cells:
            frac, worst, its, *_, kept = table[cell][rule]
            entries.append(f"{100 * frac:.0f} % · {worst:.2f} · {its} ("
                           + ("—" if math.isnan(kept) else f"{100 * kept:.0f} %") + ")")
        print(f"| {rule} | {' | '.join(entries)} |")


if __name__ == "__main__":
    main()
