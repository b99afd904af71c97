"""``task=evaluate``: PSNR of a learned θ on held-out images, against Huber-TV and the data.

Held-out images are those after the training ones: ``start' = problem.start +
problem.num_samples + evaluate.offset``, ``evaluate.num_samples`` of them, or, with
``evaluate.split=test`` (BSDS300), the test folder's images from ``evaluate.offset`` on;
the same forward operator and noise model; each image's mask and noise come from the child of
``seed`` for its index, so held-out images never reuse a training image's draws.  Three
reconstructions per image:

* the measurement y itself (when it is an image of the same size);
* the learned regulariser: L-BFGS on the lower problem at θ (from ``evaluate.theta_path``);
* Huber-TV with one weight chosen by grid search (``evaluate.tv_grid``, log10 weights) for
  the best mean PSNR on the first training images (``best_tv_weight`` per image), and, as
  an optimistic bound, the best weight per held-out image ("TV oracle").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from backends import get_backend
from framework.experiment.config import Config, ConfigError
from framework.optim import lbfgs
from problems.base import psnr
from problems.factory import build_problems


@dataclass(frozen=True)
class PreparedEvaluation:
    theta: np.ndarray
    held_out: Any  # ProblemConfig of the held-out images
    tv_train: Any  # ProblemConfig of the TV training images (weight selection)
    tv_held_out: Any


@dataclass(frozen=True)
class EvaluationRow:
    image: int
    psnr_measurement: float
    psnr_learned: float
    psnr_tv: float
    psnr_tv_oracle: float


@dataclass(frozen=True)
class EvaluationSummary:
    output_dir: Path
    run_id: str | None
    rows: tuple[EvaluationRow, ...]
    tv_log10_weight: float

    def mean(self, field: str) -> float:
        return float(np.mean([getattr(r, field) for r in self.rows]))

    @property
    def final_loss(self) -> float:
        return -self.mean("psnr_learned")


def prepare_evaluation(c: Config) -> PreparedEvaluation:
    """Check θ and the held-out range (``ConfigError`` naming the key) before any run."""
    p = c.problem
    if p.name == "quadratic":
        raise ConfigError("problem.name: task=evaluate needs an imaging problem, not quadratic")
    path = Path(c.evaluate.theta_path or "").expanduser()
    try:
        with np.load(path) as data:
            theta = np.asarray(data["theta"], dtype=np.float64)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"evaluate.theta_path: cannot read θ from {str(path)!r} ({exc})"
        ) from exc
    split = c.evaluate.split or p.split
    if split != p.split:  # another folder: its images from offset on
        start = c.evaluate.offset
    else:
        start = p.start + p.num_samples + c.evaluate.offset
    held_out = dataclasses.replace(
        p, split=split, start=start, num_samples=c.evaluate.num_samples
    )
    if p.dataset == "embedded_mnist" and start + c.evaluate.num_samples > 16:
        raise ConfigError(
            f"evaluate.num_samples: the embedded MNIST sample holds 16 digits; held-out images "
            f"{start}..{start + c.evaluate.num_samples - 1} do not exist (lower "
            "problem.num_samples or evaluate.num_samples)"
        )
    tv_train = dataclasses.replace(
        p, regularizer="tv", num_samples=min(p.num_samples, c.evaluate.num_samples)
    )
    tv_held_out = dataclasses.replace(held_out, regularizer="tv")
    return PreparedEvaluation(theta, held_out, tv_train, tv_held_out)


def _reconstruct(problem: Any, theta: Any, lower: Any) -> Any:
    x0 = problem.y if tuple(problem.y.shape) == (problem.n,) else problem.xp.zeros_like(
        problem.x_true
    )
    fused = getattr(problem, "lower_value_and_grad", None)
    return lbfgs(
        lambda x: problem.lower_objective(x, theta),
        lambda x: problem.lower_grad(x, theta),
        x0,
        gtol=lower.gtol,
        maxiter=lower.maxiter,
        memory=lower.memory,
        value_and_grad=None if fused is None else (lambda x: fused(x, theta)),
    ).x


@dataclass(frozen=True)
class TVWeightSearch:
    """Result of ``best_tv_weight``: the best log10 weight and the PSNR of each grid point."""

    best_theta: float
    best_psnr: float
    grid: tuple[float, ...]
    psnrs: tuple[float, ...]


def best_tv_weight(
    problem_factory: Callable[[], Any],
    grid: Sequence[float],
    *,
    gtol: float = 1e-6,
    maxiter: int = 500,
) -> TVWeightSearch:
    """Grid search over θ = log10(TV weight): solve the lower level (L-BFGS from the data y,
    or from zeros if y has another shape) for each θ and keep the one with the best PSNR
    against ``x_true``.  ``problem_factory()`` returns an ``ImagingProblem`` with a TV
    regulariser (called once)."""
    if len(grid) == 0:
        raise ValueError("grid must contain at least one log10 weight")
    problem = problem_factory()
    xp, dev, dtype = problem.xp, problem.device, problem.dtype
    x0 = problem.y if tuple(problem.y.shape) == (problem.n,) else xp.zeros(
        (problem.n,), dtype=dtype, device=dev
    )
    psnrs = []
    for value in grid:
        theta = xp.asarray([float(value)], dtype=dtype, device=dev)
        result = lbfgs(
            lambda x, th=theta: problem.lower_objective(x, th),
            lambda x, th=theta: problem.lower_grad(x, th),
            x0,
            gtol=gtol,
            maxiter=maxiter,
        )
        psnrs.append(psnr(result.x, problem.x_true))
    best = int(np.argmax(psnrs))
    return TVWeightSearch(
        float(grid[best]), psnrs[best], tuple(float(g) for g in grid), tuple(psnrs)
    )


def run_evaluation(
    c: Config, prepared: PreparedEvaluation, out: Path, tracker: Any, say: Any
) -> EvaluationSummary:
    """Reconstruct the held-out images three ways and log their PSNRs."""
    backend = get_backend(c.backend.name, dtype=c.backend.dtype, device=c.backend.device)
    lower = c.solver.lower
    grid = [float(v) for v in c.evaluate.tv_grid]
    train_tv = build_problems(prepared.tv_train, backend, c.seed).problems
    curves = [
        best_tv_weight(lambda p=p: p, grid, gtol=lower.gtol, maxiter=lower.maxiter).psnrs
        for p in train_tv
    ]
    tv_weight = grid[int(np.argmax(np.mean(curves, axis=0)))]
    say(f"Huber-TV log10 weight {tv_weight} (best mean PSNR on {len(train_tv)} training images)")
    learned = build_problems(prepared.held_out, backend, c.seed).problems
    tv = build_problems(prepared.tv_held_out, backend, c.seed).problems
    theta = backend.asarray(prepared.theta)
    tv_theta = backend.asarray(np.array([tv_weight]))
    rows = []
    for j, (p, q) in enumerate(zip(learned, tv, strict=True)):
        measured = psnr(p.y, p.x_true) if tuple(p.y.shape) == (p.n,) else math.nan
        oracle = best_tv_weight(lambda q=q: q, grid, gtol=lower.gtol, maxiter=lower.maxiter)
        row = EvaluationRow(
            image=prepared.held_out.start + j,
            psnr_measurement=measured,
            psnr_learned=psnr(_reconstruct(p, theta, lower), p.x_true),
            psnr_tv=psnr(_reconstruct(q, tv_theta, lower), q.x_true),
            psnr_tv_oracle=oracle.best_psnr,
        )
        rows.append(row)
        tracker.log_metrics({k: v for k, v in dataclasses.asdict(row).items() if k != "image"}, j)
    summary = EvaluationSummary(out.resolve(), tracker.run_id, tuple(rows), tv_weight)
    means = {f"mean_{k}": summary.mean(k) for k in
             ("psnr_measurement", "psnr_learned", "psnr_tv", "psnr_tv_oracle")}
    tracker.log_metrics({**means, "tv_log10_weight": tv_weight}, len(rows))
    table = format_evaluation(summary)
    (out / "psnr.txt").write_text(table + "\n")
    tracker.log_artifact(out / "psnr.txt")
    print(table, flush=True)
    return summary


def format_evaluation(summary: EvaluationSummary) -> str:
    """A text table: one row per held-out image plus the mean (PSNR in dB)."""
    head = f"{'image':>6} {'measurement':>12} {'learned':>9} {'Huber-TV':>9} {'TV oracle':>10}"
    lines = [head, "-" * len(head)]
    for r in summary.rows:
        lines.append(f"{r.image:>6} {r.psnr_measurement:>12.2f} {r.psnr_learned:>9.2f} "
                     f"{r.psnr_tv:>9.2f} {r.psnr_tv_oracle:>10.2f}")
    lines.append(f"{'mean':>6} {summary.mean('psnr_measurement'):>12.2f} "
                 f"{summary.mean('psnr_learned'):>9.2f} {summary.mean('psnr_tv'):>9.2f} "
                 f"{summary.mean('psnr_tv_oracle'):>10.2f}")
    return "\n".join(lines)
