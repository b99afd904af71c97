"""The paper-style report of re-solve runs (``hyperkrylov-compare --paper``).

Reads only the tracking store: runs tagged ``hyperkrylov.task=resolve`` (optionally of one
sweep), their totals (``total_*``, ``mean_hg_error``, ``max_hg_error``) and per-system
histories.  One row per (label, recycle dimension) — when a configuration was re-solved
twice on the same recording the latest run is kept.  Savings are against the ``none``
run of the same recording: 100 · (1 − mine / none).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from framework.experiment import names, plots
from framework.experiment.config import Task
from framework.experiment.tracking import RunRecord, percent_saved
from framework.krylov.selection import Strategy

HISTORY_KEYS = (names.ITERATIONS, names.cumulative(names.ITERATIONS), names.HG_ERROR,
                names.UPPER_LOSS)
STRATEGIES_FIGURE = "paper_strategies.png"
DIMENSIONS_FIGURE = "paper_dimensions.png"


@dataclass(frozen=True)
class PaperRow:
    """Totals of one re-solve run and its savings against ``none`` (NaN when missing)."""

    run_id: str
    label: str
    strategy: str
    dim: int
    stop: str
    sequence: str
    iterations: float
    hvp: float
    jac_t: float
    applications: float
    passes: float
    solve_time: float
    mean_hg_error: float
    max_hg_error: float
    iteration_savings: float = math.nan
    application_savings: float = math.nan
    pass_savings: float = math.nan


def resolve_runs(records: Sequence[RunRecord]) -> list[RunRecord]:
    """Finished re-solve runs, the latest per (recording, label, dim)."""
    latest: dict[tuple[str, str, str], RunRecord] = {}
    for r in records:
        if r.tags.get(names.TASK_TAG) != Task.resolve or r.status != "FINISHED":
            continue
        key = (r.tags.get(names.SEQUENCE_TAG, ""), r.tags.get(names.LABEL_TAG, "?"),
               r.tags.get(names.DIM_TAG, "?"))
        if key not in latest or (r.start_time or 0) >= (latest[key].start_time or 0):
            latest[key] = r
    return sorted(latest.values(), key=lambda r: r.start_time or 0.0)


def paper_rows(records: Sequence[RunRecord]) -> list[PaperRow]:
    """One ``PaperRow`` per re-solve run (``resolve_runs``), with savings vs ``none``."""
    runs = resolve_runs(records)
    rows = [
        PaperRow(
            run_id=r.run_id,
            label=r.tags.get(names.LABEL_TAG, "?"),
            strategy=r.tags.get(names.STRATEGY_TAG, "?"),
            dim=int(r.tags.get(names.DIM_TAG, "0")),
            stop=r.tags.get(names.STOP_TAG, "?"),
            sequence=r.tags.get(names.SEQUENCE_TAG, ""),
            iterations=r.metric(names.total(names.ITERATIONS)),
            hvp=r.metric(names.total(names.HVP)),
            jac_t=r.metric(names.total(names.JAC_T)),
            applications=r.metric(names.total(names.APPLICATIONS)),
            passes=r.metric(names.total(names.PASSES)),
            solve_time=r.metric(names.total(names.SOLVE_TIME)),
            mean_hg_error=r.metric(names.MEAN_HG_ERROR),
            max_hg_error=r.metric(names.MAX_HG_ERROR),
        )
        for r in runs
    ]
    base = {row.sequence: row for row in rows if row.strategy == Strategy.none}
    out = []
    for row in rows:
        ref = base.get(row.sequence)
        if ref is not None:
            row = PaperRow(
                **{
                    **row.__dict__,
                    "iteration_savings": percent_saved(row.iterations, ref.iterations),
                    "application_savings": percent_saved(row.applications, ref.applications),
                    "pass_savings": percent_saved(row.passes, ref.passes),
                }
            )
        out.append(row)
    return sorted(out, key=lambda r: (r.sequence, r.strategy != Strategy.none, r.label, r.dim))


def _f(value: float, spec: str) -> str:
    return "-" if not math.isfinite(value) else format(value, spec)


def format_paper_table(rows: Sequence[PaperRow]) -> str:
    """Markdown table: strategy, dim, totals, wall (solve) time, errors, savings vs none."""
    header = ("strategy", "dim", "stop", "iterations", "HVP", "Jᵀ", "applications (HVP+Jᵀ)",
              "passes", "solve s", "mean HG err", "max HG err", "its saved %",
              "apps saved %", "passes saved %")
    body = [
        (r.label, str(r.dim), r.stop, _f(r.iterations, ".0f"), _f(r.hvp, ".0f"),
         _f(r.jac_t, ".0f"), _f(r.applications, ".0f"), _f(r.passes, ".0f"),
         _f(r.solve_time, ".2f"), _f(r.mean_hg_error, ".2e"), _f(r.max_hg_error, ".2e"),
         _f(r.iteration_savings, ".1f"), _f(r.application_savings, ".1f"),
         _f(r.pass_savings, ".1f"))
        for r in rows
    ]
    widths = [max(len(c) for c in col) for col in zip(header, *body, strict=True)]
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(b) for b in body)])


def paper_figures(records: Sequence[RunRecord], folder: str | Path) -> list[Path]:
    """Write the strategy figure (the largest dimension of each label, plus ``none``) and,
    when some label was run at ≥ 2 dimensions, the dimension-sweep figure; returns paths."""
    folder = Path(folder)
    runs = resolve_runs(records)
    if not runs:
        return []
    widest: dict[str, RunRecord] = {}
    for r in runs:
        label = r.tags.get(names.LABEL_TAG, "?")
        if label not in widest or int(r.tags.get(names.DIM_TAG, 0)) > int(
            widest[label].tags.get(names.DIM_TAG, 0)
        ):
            widest[label] = r
    ordered = sorted(widest.values(), key=lambda r: (
        r.tags.get(names.STRATEGY_TAG) != Strategy.none, r.start_time or 0.0))
    series = []
    for r in ordered:
        label = r.tags.get(names.LABEL_TAG, "?")
        dim = int(r.tags.get(names.DIM_TAG, 0))
        series.append((label if dim == 0 else f"{label} k={dim}", r.history))
    paths = [plots.save(plots.paper_strategies(series), folder / STRATEGIES_FIGURE)]
    curves: dict[str, list[tuple[int, float]]] = {}
    none_total = math.nan
    for r in runs:
        label = r.tags.get(names.LABEL_TAG, "?")
        if r.tags.get(names.STRATEGY_TAG) == Strategy.none:
            none_total = r.metric(names.total(names.ITERATIONS))
            continue
        point = (int(r.tags.get(names.DIM_TAG, 0)), r.metric(names.total(names.ITERATIONS)))
        curves.setdefault(label, []).append(point)
    curves = {k: v for k, v in curves.items() if len(v) >= 2}
    if curves:
        fig = plots.dimension_sweep(curves, none_total)
        paths.append(plots.save(fig, folder / DIMENSIONS_FIGURE))
    return paths
