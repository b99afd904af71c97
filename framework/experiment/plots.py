"""Figures of one run and of a comparison of runs (matplotlib, Agg; no display needed), from
plain host data; every function returns a Figure for ``save``, which closes it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

History = Mapping[str, Sequence[tuple[int, float]]]


def save(fig: Any, path: str | Path) -> Path:
    """Save ``fig`` as PNG to ``path`` (folders created) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _label_axes(ax: Any, xlabel: str, ylabel: str) -> None:
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _series(history: History, key: str) -> np.ndarray | None:
    """The (steps, values) rows of metric ``key``, or None when it has no points."""
    points = history.get(key)
    return np.asarray(points, dtype=float).T if points else None


def iterations_per_system(rows: Sequence[Sequence[float]], solver: str = "recycled") -> Any:
    """Krylov iterations of every system: rows (step, sample index, iterations, shadow
    iterations or NaN), one line per sample and solver (the run's labelled ``solver``)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    table = np.asarray(rows, dtype=float).reshape(-1, 4)
    for col, style, label in ((2, "o-", solver), (3, "x--", "MINRES (shadow)")):
        data = table[np.isfinite(table[:, col])]
        for k, sample in enumerate(np.unique(data[:, 1])):
            sel = data[data[:, 1] == sample]
            ax.plot(sel[:, 0], sel[:, col], style, ms=3, lw=0.8, color=f"C{int(sample) % 10}",
                    label=label if k == 0 else None)
    _label_axes(ax, "outer step", "Krylov iterations per system")
    return fig


def line(rows: Sequence[Mapping[str, float]], keys: Sequence[str], ylabel: str) -> Any:
    """A line per metric key against the step, from rows ``{"step": k, key: value, ...}``."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in keys:
        points = [(row["step"], row[key]) for row in rows if key in row]
        if points:
            ax.plot(*zip(*points, strict=True), ".-", label=key)
    _label_axes(ax, "outer step", ylabel)
    return fig


def filters(theta: np.ndarray, kernel_size: int, note: str = "") -> Any:
    """Learned FoE filters (rows of θ: K² filter entries, then the log10 weight of each
    expert width), each scaled to its own range, tiled 8 to a row in one image (one Axes:
    cheap to draw), labelled with the log10 of its total weight; ``note`` is added to the
    title."""
    theta, k = np.asarray(theta), kernel_size
    cols = min(theta.shape[0], 8)
    tiles = np.full((math.ceil(theta.shape[0] / cols) * (k + 1), cols * (k + 1)), np.nan)
    fig, ax = plt.subplots(figsize=(1.3 * cols, 1.4 * tiles.shape[0] / (k + 1)))
    for i, row in enumerate(theta):
        top, left = divmod(i, cols)
        top, left, f = top * (k + 1) + 1, left * (k + 1), row[: k * k].reshape(k, k)
        tiles[top : top + k, left : left + k] = (f - f.min()) / (np.ptp(f) or 1.0)
        weight = np.log10(np.sum(10.0 ** row[k * k :]))
        ax.text(left + (k - 1) / 2, top - 0.7, f"10^{weight:.2f}", ha="center", fontsize=7)
    ax.imshow(tiles, cmap="gray")
    ax.axis("off")
    fig.suptitle("learned filters (weight 10^p)" + (f"; {note}" if note else ""), fontsize=9)
    return fig


def parameters(theta: np.ndarray) -> Any:
    """θ as a bar chart (problems without image filters)."""
    fig, ax = plt.subplots(figsize=(5, 3))
    flat = np.asarray(theta).reshape(-1)
    ax.bar(np.arange(flat.size), flat)
    ax.set(xlabel="parameter", ylabel="θ")
    return fig


def reconstruction(
    shape: tuple[int, ...], x_true: np.ndarray, estimates: Sequence[tuple[str, np.ndarray, float]]
) -> Any:
    """The ground truth beside each (label, image, PSNR in dB; NaN: none shown) of
    ``estimates`` (the data, lower-level solutions): images side by side, signals as lines."""
    panels = [("ground truth", x_true), *((label if math.isnan(db) else f"{label} ({db:.1f} dB)",
                                           img) for label, img, db in estimates)]
    if len(shape) == 2:
        fig, axes = plt.subplots(1, len(panels), figsize=(2.5 * len(panels), 2.8))
        for ax, (title, img) in zip(axes, panels, strict=True):
            ax.imshow(np.asarray(img).reshape(shape), cmap="gray", vmin=0, vmax=1)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        return fig
    fig, ax = plt.subplots(figsize=(6, 3))
    for label, sig in panels:
        ax.plot(np.asarray(sig), label=label)
    ax.legend(fontsize=8)
    return fig


def panels(
    runs: Sequence[tuple[str, History]],
    spec: Sequence[tuple[str, str, str]],
    xlabel: str,
    columns: int,
    once: Sequence[str] = (),
) -> Any:
    """Paper-style 2×2 panels, one line per run for each (title, metric key, scale) of
    ``spec``; scale "log" draws a log axis when every value is positive, "log10" draws
    log₁₀ of the values.  Keys in ``once`` (the same for every run) are drawn once,
    unlabelled.  One legend under the panels, from the first with labelled lines."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    for ax, (title, key, scale) in zip(axes.flat, spec, strict=False):
        drawn = [(label, xy) for label, h in runs if (xy := _series(h, key)) is not None]
        if key in once:
            drawn = [(None, xy) for _, xy in drawn[:1]]
        for label, (steps, values) in drawn:
            if scale == "log10":
                with np.errstate(divide="ignore", invalid="ignore"):
                    values = np.log10(values)
            ax.plot(steps, values, ".-", ms=3, label=label)
        if scale == "log" and drawn and all(values.min() > 0 for _, (_, values) in drawn):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    for ax in axes.flat:
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), columns),
                       fontsize=8)
            break
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def dimension_sweep(curves: Mapping[str, Sequence[tuple[int, float]]], baseline: float) -> Any:
    """Total Krylov iterations against the recycle dimension k, one line per strategy, and
    the no-recycling total (NaN: none) as a horizontal line."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, points in curves.items():
        ax.plot(*zip(*sorted(points), strict=True), "o-", label=label)
    if math.isfinite(baseline):
        ax.axhline(baseline, color="k", ls="--", lw=1, label="none (no recycling)")
    _label_axes(ax, "recycle dimension k", "total Krylov iterations")
    fig.tight_layout()
    return fig
