"""The paper-style report of re-solve runs (``hyperkrylov-compare --paper``), read from the
tracking store only.  Savings: 100 · (1 − mine / none), against the ``none`` run of the
same recording."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from framework.experiment import names, plots
from framework.experiment.config import Task
from framework.experiment.console import fmt, markdown_table
from framework.experiment.tracking import RunRecord, percent_saved
from framework.krylov.selection import Strategy

PANELS = (  # (title, metric key, y scale) of the strategy figure's 2×2 panels
    ("Krylov iterations per system", names.ITERATIONS, "linear"),
    ("cumulative Krylov iterations", names.cumulative(names.ITERATIONS), "linear"),
    ("log₁₀ relative hypergradient error", names.HG_ERROR, "log10"),
    ("upper-level cost ℓ(x_t)", names.UPPER_LOSS, "linear"),
)
HISTORY_KEYS = tuple(key for _, key, _ in PANELS)
# The re-solve totals ``names.total(key)`` that are ``PaperRow`` fields of the same name.
TOTALS = (names.ITERATIONS, names.HVP, names.JAC_T, names.APPLICATIONS, names.PASSES,
          names.SOLVE_TIME)


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
    iteration_savings: float
    application_savings: float
    pass_savings: float


def _label(r: RunRecord) -> str:
    return r.tags.get(names.LABEL_TAG, "?")


def _dim(r: RunRecord) -> int:
    return int(r.tags.get(names.DIM_TAG, 0))


def _is_none(r: RunRecord) -> bool:
    return r.tags.get(names.STRATEGY_TAG) == Strategy.none


def resolve_runs(records: Sequence[RunRecord]) -> list[RunRecord]:
    """Finished re-solve runs, the latest per (recording, label, dim)."""
    latest: dict[tuple[str, str, str], RunRecord] = {}
    for r in sorted(records, key=lambda r: r.start_time or 0.0):
        if r.tags.get(names.TASK_TAG) == Task.resolve and r.status == "FINISHED":
            latest[r.tags.get(names.SEQUENCE_TAG, ""), _label(r), r.tags.get(names.DIM_TAG)] = r
    return sorted(latest.values(), key=lambda r: r.start_time or 0.0)


def paper_rows(records: Sequence[RunRecord]) -> list[PaperRow]:
    """One ``PaperRow`` per re-solve run (``resolve_runs``), with savings vs ``none``."""
    runs = resolve_runs(records)
    base = {r.tags.get(names.SEQUENCE_TAG, ""): r for r in runs if _is_none(r)}

    def saved(r: RunRecord, key: str) -> float:
        ref = base.get(r.tags.get(names.SEQUENCE_TAG, ""))
        total = names.total(key)
        return math.nan if ref is None else percent_saved(r.metric(total), ref.metric(total))

    rows = [
        PaperRow(
            run_id=r.run_id,
            label=_label(r),
            strategy=r.tags.get(names.STRATEGY_TAG, "?"),
            dim=_dim(r),
            stop=r.tags.get(names.STOP_TAG, "?"),
            sequence=r.tags.get(names.SEQUENCE_TAG, ""),
            **{key: r.metric(names.total(key)) for key in TOTALS},
            mean_hg_error=r.metric(names.MEAN_HG_ERROR),
            max_hg_error=r.metric(names.MAX_HG_ERROR),
            iteration_savings=saved(r, names.ITERATIONS),
            application_savings=saved(r, names.APPLICATIONS),
            pass_savings=saved(r, names.PASSES),
        )
        for r in runs
    ]
    return sorted(rows, key=lambda r: (r.sequence, r.strategy != Strategy.none, r.label, r.dim))


def format_paper_table(rows: Sequence[PaperRow]) -> str:
    """Markdown table: strategy, dim, totals, wall (solve) time, errors, savings vs none."""
    header = ("strategy", "dim", "stop", "iterations", "HVP", "Jᵀ", "applications (HVP+Jᵀ)",
              "passes", "solve s", "mean HG err", "max HG err", "its saved %",
              "apps saved %", "passes saved %")
    return markdown_table(header, [
        (r.label, str(r.dim), r.stop, fmt(r.iterations, ".0f"), fmt(r.hvp, ".0f"),
         fmt(r.jac_t, ".0f"), fmt(r.applications, ".0f"), fmt(r.passes, ".0f"),
         fmt(r.solve_time, ".2f"), fmt(r.mean_hg_error, ".2e"), fmt(r.max_hg_error, ".2e"),
         fmt(r.iteration_savings, ".1f"), fmt(r.application_savings, ".1f"),
         fmt(r.pass_savings, ".1f"))
        for r in rows
    ])


def paper_figures(records: Sequence[RunRecord], folder: str | Path) -> list[Path]:
    """Write the strategy figure (the largest dimension of each label, plus ``none``) and,
    when some label was run at ≥ 2 dimensions, the dimension-sweep figure; returns paths."""
    runs = resolve_runs(records)
    if not runs:
        return []
    widest: dict[str, RunRecord] = {}
    for r in sorted(runs, key=_dim, reverse=True):  # stable: the first run of the largest dim
        widest.setdefault(_label(r), r)
    ordered = sorted(widest.values(), key=lambda r: (not _is_none(r), r.start_time or 0.0))
    series = [(_label(r) if _dim(r) == 0 else f"{_label(r)} k={_dim(r)}", r.history)
              for r in ordered]
    # the upper-level cost is the recording's, the same for every run: drawn once
    figure = plots.panels(series, PANELS, "system t (outer step)", columns=6,
                          once=(names.UPPER_LOSS,))
    paths = [plots.save(figure, Path(folder) / "paper_strategies.png")]
    total = names.total(names.ITERATIONS)
    none_total = next((r.metric(total) for r in reversed(runs) if _is_none(r)), math.nan)
    curves: dict[str, list[tuple[int, float]]] = {}
    for r in runs:
        if not _is_none(r):
            curves.setdefault(_label(r), []).append((_dim(r), r.metric(total)))
    curves = {k: v for k, v in curves.items() if len(v) >= 2}
    if curves:
        paths.append(plots.save(plots.dimension_sweep(curves, none_total),
                                Path(folder) / "paper_dimensions.png"))
    return paths
