"""``hyperkrylov-compare``: a table and a figure of the runs of an experiment.

Runs are read from the tracking store, optionally of one sweep (``--sweep``: the id or name
of a multirun's parent run, to which the figures are logged; a ``tracking.sweep_id``; or
``latest``).  Savings are against the run's shadow baseline (``baseline=shadow``) when
logged, else against a ``recycle=none`` run of the same sweep.  ``--paper`` reports the
``task=resolve`` runs instead (``framework.experiment.paper``)::

    hyperkrylov-compare --paper --sweep mnist-small --outdir report
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from framework.experiment import names, paper, plots
from framework.experiment.console import fmt, markdown_table
from framework.experiment.paper import PaperRow, format_paper_table
from framework.experiment.tracking import (
    RunRecord,
    TrackingError,
    log_to_sweep,
    percent_saved,
    read_runs,
)

ITERATIONS = names.cumulative(names.KRYLOV_ITERATIONS)
APPLICATIONS = names.cumulative(names.OPERATOR_APPLICATIONS)
FIGURE_PANELS = (  # (title, metric key, y scale) of the comparison figure's 2×2 panels
    ("Krylov iterations per outer step", names.KRYLOV_ITERATIONS, "linear"),
    ("cumulative Krylov iterations", ITERATIONS, "linear"),
    ("hypergradient error estimate", names.HG_ERROR_ESTIMATE, "log"),
    ("upper loss", names.UPPER_LOSS, "log"),
)
HISTORY_KEYS = (*(key for _, key, _ in FIGURE_PANELS), names.WORKER_IMBALANCE)


@dataclass(frozen=True)
class ComparisonRow:
    """One run in the comparison table (NaN where a figure was not logged)."""

    run_id: str
    name: str
    strategy: str
    dim: str
    steps: int
    krylov_iterations: float
    applications: float
    savings_percent: float
    savings_reference: str
    application_savings_percent: float
    mean_hg_error: float
    solve_time: float
    wall_time: float
    imbalance: float = math.nan  # Dask runs: mean over steps of slowest/mean worker seconds


def rows_from_records(records: Sequence[RunRecord]) -> list[ComparisonRow]:
    """Comparison rows of ``records`` (savings against shadow or a strategy=none run)."""
    baselines: dict[str, float] = {}
    for r in records:
        if r.params.get("recycle.strategy") == "none":
            baselines.setdefault(r.tags.get(names.SWEEP_TAG, ""), r.metric(ITERATIONS))
    rows = []
    for r in records:
        its = r.metric(ITERATIONS)
        shadow = r.metric(names.cumulative(names.BASELINE_KRYLOV_ITERATIONS))
        baseline = baselines.get(r.tags.get(names.SWEEP_TAG, ""))
        savings, ref = math.nan, "-"
        if math.isfinite(shadow):
            savings, ref = percent_saved(its, shadow), "shadow"
        elif baseline is not None:
            savings, ref = percent_saved(its, baseline), "recycle=none run"
        errors = [v for _, v in r.history.get(names.HG_ERROR_ESTIMATE, ()) if math.isfinite(v)]
        imbalance = [v for _, v in r.history.get(names.WORKER_IMBALANCE, ())]
        steps = len(r.history.get(names.UPPER_LOSS, ()))
        hvp, jac_t, batch, shadow_hvp = (r.metric(names.cumulative(key)) for key in (
            names.HVP, names.JAC_T, names.BATCH_SIZE, names.BASELINE_HVP))
        # applications against the shadow: recycling's HVPs (solve and C = HU) plus the Jᵀ
        # products beyond the one −Jᵀw per system both need
        rows.append(ComparisonRow(
            run_id=r.run_id, name=r.name, strategy=r.params.get("recycle.strategy", "?"),
            dim=r.params.get("recycle.dim", "?"),
            steps=steps or int(r.metrics.get(names.BATCH_SIZE, 0) > 0),
            krylov_iterations=its, applications=r.metric(APPLICATIONS),
            savings_percent=savings, savings_reference=ref,
            application_savings_percent=percent_saved(hvp + (jac_t - batch), shadow_hvp),
            mean_hg_error=sum(errors) / len(errors) if errors else math.nan,
            solve_time=r.metric(names.cumulative(names.STEP_TIME)),
            wall_time=r.end_time - r.start_time if r.start_time and r.end_time else math.nan,
            imbalance=sum(imbalance) / len(imbalance) if imbalance else math.nan,
        ))
    return rows


def format_table(rows: Sequence[ComparisonRow]) -> str:
    """A Markdown table of ``rows``."""
    header = (
        "run", "strategy", "dim", "steps", "Krylov its", "op. applications", "its saved %",
        "apps saved %", "vs", "mean HG err", "solve s", "wall s", "imbalance",
    )
    return markdown_table(header, [
        (
            r.name, r.strategy, r.dim, str(r.steps), fmt(r.krylov_iterations, ".0f"),
            fmt(r.applications, ".0f"), fmt(r.savings_percent, ".1f"),
            fmt(r.application_savings_percent, ".1f"), r.savings_reference,
            fmt(r.mean_hg_error, ".3g"), fmt(r.solve_time, ".1f"), fmt(r.wall_time, ".1f"),
            fmt(r.imbalance, ".2f"),
        )
        for r in rows
    ])


def _sweep_tags(uri: str | None, experiment: str) -> list[str]:
    """The sweep id of each run of ``experiment`` in a sweep, oldest run first."""
    runs = read_runs(uri, experiment, history_keys=())
    return [r.tags[names.SWEEP_TAG] for r in runs if r.tags.get(names.SWEEP_TAG)]


def _read(
    experiment: str, sweep: str | None, uri: str | None, history_keys: Sequence[str]
) -> list[RunRecord]:
    """The runs of ``experiment``: all, those of one sweep, or (``"latest"``) the newest."""
    if sweep == "latest":
        if not (tagged := _sweep_tags(uri, experiment)):
            raise TrackingError(f"experiment {experiment!r} has no sweep runs")
        sweep = tagged[-1]
    return read_runs(uri, experiment, sweep_id=sweep, history_keys=history_keys)


def compare(experiment: str, *, sweep: str | None = None, uri: str | None = None,
            figure: str | Path | None = None) -> list[ComparisonRow]:
    """Rows of the runs of ``experiment`` (one sweep when ``sweep`` is given; ``"latest"``
    picks the newest) and, when ``figure`` is a path, the comparison figure as PNG there."""
    records = _read(experiment, sweep, uri, HISTORY_KEYS)
    if figure is not None:
        runs = [(r.name, r.history) for r in records]
        plots.save(plots.panels(runs, FIGURE_PANELS, "outer step", columns=4), figure)
    return rows_from_records(records)


def compare_paper(experiment: str, *, sweep: str | None = None, uri: str | None = None,
                  folder: str | Path | None = ".") -> tuple[list[PaperRow], list[Path]]:
    """The paper report of the re-solve runs of ``experiment`` (one sweep when given):
    ``(rows, figure paths)``; figures are written to ``folder`` (None: none written)."""
    records = _read(experiment, sweep, uri, paper.HISTORY_KEYS)
    figures = [] if folder is None else paper.paper_figures(records, folder)
    return paper.paper_rows(records), figures


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``hyperkrylov-compare``."""
    parser = argparse.ArgumentParser(
        prog="hyperkrylov-compare",
        description="Compare the runs of an MLflow experiment: a table and a figure.",
    )
    parser.add_argument("--experiment", default="hyperkrylov", help="MLflow experiment name")
    parser.add_argument("--sweep", help="only the runs of one sweep: its parent run's id "
                        "or name, a tracking.sweep_id, or 'latest'")
    parser.add_argument("--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI, else "
                        "sqlite:///<cwd>/mlflow/mlflow.db)")
    parser.add_argument("--figure", default="comparison.png",
                        help="PNG to write ('' for no figure)")
    parser.add_argument("--paper", action="store_true",
                        help="report the task=resolve runs (re-solves of one recorded "
                        "sequence) as in the paper: a table and the figures "
                        "paper_strategies.png / paper_dimensions.png")
    parser.add_argument("--outdir", default=".",
                        help="folder for the --paper figures ('' for none)")
    args = parser.parse_args(argv)
    where = {"experiment": args.experiment, "sweep": args.sweep, "uri": args.uri}
    try:
        if args.paper:
            rows, figures = compare_paper(**where, folder=args.outdir or None)
            table = format_paper_table(rows)
        else:
            rows = compare(**where, figure=args.figure or None)
            table = format_table(rows)
            figures = [Path(args.figure)] if args.figure else []
    except TrackingError as exc:
        print(f"hyperkrylov-compare: {exc}", file=sys.stderr)
        return 1
    if not rows:
        runs = "finished task=resolve runs" if args.paper else "runs"
        hint = ""
        if args.sweep:
            ids = list(dict.fromkeys(_sweep_tags(args.uri, args.experiment)))
            hint = (f" sweep {args.sweep!r}; its sweeps: {', '.join(ids)}" if ids
                    else f" sweep {args.sweep!r}; none of its runs is in a sweep")
        print(f"hyperkrylov-compare: no {runs} in experiment {args.experiment!r}{hint}",
              file=sys.stderr)
        return 1
    print(table)
    for path in figures:
        print(f"figure: {path.resolve()}")
    if args.sweep and figures and (parent := log_to_sweep(args.uri, args.experiment,
                                                           args.sweep, figures)):
        print(f"figures logged to the sweep's parent run {parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
