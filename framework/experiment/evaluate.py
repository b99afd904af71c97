"""``task=evaluate``: PSNR of a learned θ on held-out images, against Huber-TV and the data
(README, "Results").  Held-out images: ``evaluate.num_samples`` from the first image
training did not use (``problem.start + problem.num_samples``, in images when
``problem.crops_per_image`` > 1) plus ``evaluate.offset`` on, or, with
``evaluate.split=test`` (BSDS300), the test folder's from ``evaluate.offset`` on; one crop
of each; same operator and noise model, each image's draws from the child of ``seed`` for
its index (never a training image's).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from backends import get_backend
from backends.host import to_host
from framework.bilevel.engine import BilevelEngine, EngineConfig, Preconditioner
from framework.bilevel.strength import StrengthRisks, factor_by_psnr, strength_risks
from framework.experiment import plots
from framework.experiment.config import Config, ConfigError, ProblemConfig
from framework.experiment.console import fmt, markdown_table, say
from framework.experiment.engine_setup import engine_config
from framework.experiment.theta_file import read_theta, write_theta
from problems.base import psnr
from problems.datasets import images_spanned
from problems.factory import build_problems
from problems.imaging import ImagingProblem
from problems.operators import relative_noise_variance

PSNR_FIELDS = ("psnr_measurement", "psnr_learned", "psnr_tv", "psnr_tv_oracle")
STRENGTH_FIELDS = ("strength", "psnr_learned_as_trained")  # with evaluate.strength_grid


@dataclass(frozen=True)
class EvaluationRow:
    image: int
    psnr_measurement: float
    psnr_learned: float
    psnr_tv: float
    psnr_tv_oracle: float
    strength: float = 0.0  # s added to θ's log10 weights (evaluate.strength_grid)
    psnr_learned_as_trained: float = math.nan  # at s = 0, when a strength was picked


@dataclass(frozen=True)
class EvaluationSummary:
    run_id: str | None
    rows: tuple[EvaluationRow, ...]
    tv_log10_weight: float

    def mean(self, field: str) -> float:
        return float(np.mean([getattr(r, field) for r in self.rows]))

    @property
    def final_loss(self) -> float:
        return -self.mean("psnr_learned")


EVALUATED_THETA_FILE = "evaluated_theta.npz"


def prepare_evaluation(c: Config) -> tuple[np.ndarray, ProblemConfig]:
    """θ and the held-out images' config, checked (``ConfigError`` naming the key) before
    any run."""
    p = c.problem
    if p.name == "quadratic":
        raise ConfigError("problem.name: task=evaluate needs an imaging problem, not quadratic")
    theta = read_theta("evaluate.theta_path", c.evaluate.theta_path or "")
    split = c.evaluate.split or p.split  # another folder: its images from offset on
    used = images_spanned(p.start + p.num_samples, p.crops_per_image)  # training's images
    start = c.evaluate.offset + (used if split == p.split else 0)
    held_out = dataclasses.replace(p, split=split, start=start, crops_per_image=1,
                                   num_samples=c.evaluate.num_samples)  # one crop an image
    if p.dataset == "embedded_mnist" and start + c.evaluate.num_samples > 16:
        raise ConfigError(
            f"evaluate.num_samples: the embedded MNIST sample holds 16 digits; held-out images "
            f"{start}..{start + c.evaluate.num_samples - 1} do not exist (lower "
            "problem.num_samples or evaluate.num_samples)"
        )
    return theta, held_out


def reconstructions(engine: BilevelEngine, theta: Any) -> tuple[np.ndarray, np.ndarray]:
    """x*(θ) of each of the engine's images (all solved as one batch) as host rows (B, n),
    and their PSNRs (B,), both on the images' own scale (a normalised sample's x times its
    scale)."""
    return on_own_scale(engine.problems, to_host(engine.lower_solutions(theta)))


def on_own_scale(problems: Sequence[Any], X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Host rows ``X`` (B, n) of ``problems``' solutions on the images' own scale, and their
    PSNRs (B,)."""
    images = np.stack([original(X[j], p) for j, p in enumerate(problems)])
    psnrs = np.array([psnr(images[j], original(p.x_true, p)) for j, p in enumerate(problems)])
    return images, psnrs


def per_image_strength(c: Config, problems: Sequence[Any], first_image: int, theta: Any,
                       config: EngineConfig) -> StrengthRisks:
    """``problems`` (images ``first_image`` on) solved at θ with every log10 weight moved by
    each s of ``evaluate.strength_grid``, with their predictive risks
    (``evaluate.strength_probes`` Rademacher probes per image; noise variances from the
    data).  Image i's probes come from ``SeedSequence([seed, 4, i])``, so its pick does not
    depend on the images evaluated with it."""
    batch = ImagingProblem.concat(problems)
    B, n = batch.X_true.shape
    draws = np.stack([np.random.default_rng([c.seed, 4, first_image + j]).choice(
        [-1.0, 1.0], (c.evaluate.strength_probes, n)) for j in range(B)], axis=1)
    probes = batch.xp.asarray(draws, dtype=batch.dtype, device=batch.device)
    grid = [float(v) for v in c.evaluate.strength_grid]
    return strength_risks(
        BilevelEngine(problems, config), batch, theta, grid,
        relative_noise_variance(batch.Y, c.problem.noise_level), probes,
        callback=lambda i: say(f"strength s = {grid[i]:+g} on {B} images: solved, risks "
                               f"estimated ({i + 1} of {len(grid)})"))


def original(v: Any, problem: Any) -> np.ndarray:
    """A single-sample imaging problem's vector ``v`` (x, x_true or y) on the image's own
    scale, on the host."""
    return to_host(v) * problem.scale


@dataclass(frozen=True)
class TVWeightSearch:
    """Result of ``best_tv_weight``: the PSNR and x* of every image at every grid point."""

    grid: tuple[float, ...]
    psnrs: np.ndarray  # (len(grid), images)
    solutions: np.ndarray  # (len(grid), images, n), host

    @property
    def best_theta(self) -> float:
        """The log10 weight with the best mean PSNR over the images."""
        return self.grid[int(np.argmax(self.psnrs.mean(axis=1)))]

    @property
    def best_psnr(self) -> float:
        return float(self.psnrs.mean(axis=1).max())


def best_tv_weight(
    problems: Sequence[Any], grid: Sequence[float], config: EngineConfig | None = None
) -> TVWeightSearch:
    """Grid search over θ = log10(TV weight): the PSNR against ``x_true`` of x*(θ) of each
    of ``problems`` (``ImagingProblem``s with a TV regulariser) at each θ of ``grid``,
    solved with the lower-level settings of ``config`` (no FFT preconditioners: they are
    built for Fields of Experts)."""
    plain = Preconditioner.none
    config = dataclasses.replace(config or EngineConfig(), preconditioner=plain,
                                 lower_preconditioner=plain)
    engine = BilevelEngine(problems, config)
    xp, dtype, device = problems[0].xp, problems[0].dtype, problems[0].device
    solved = [reconstructions(engine, xp.asarray([float(g)], dtype=dtype, device=device))
              for g in grid]
    return TVWeightSearch(tuple(float(g) for g in grid), np.stack([p for _, p in solved]),
                          np.stack([x for x, _ in solved]))


def tv_baseline(c: Config) -> dict[str, Any]:
    """The problem keys that turn ``c.problem``'s images into the Huber-TV baseline's
    (``evaluate.tv_gamma``, ``evaluate.tv_normalize``; whatever expert θ has)."""
    return {"regularizer": "tv", "gamma": c.evaluate.tv_gamma,
            "normalize": c.evaluate.tv_normalize}


def choose_strength_factor(c: Config, train: Sequence[Any], theta: Any,
                           config: EngineConfig) -> float:
    """The factor of ``evaluate.strength_factors`` whose per-image strengths give the best
    mean PSNR on the training images ``train`` (the one factor when only one is given)."""
    factors = [float(f) for f in c.evaluate.strength_factors]
    if len(factors) == 1:
        return factors[0]
    risks = per_image_strength(c, train, c.problem.start, theta, config)
    factor, means = factor_by_psnr(risks, factors, lambda X: on_own_scale(train, X)[1])
    say(f"predictive-risk divergence factor {factor:g}: mean PSNR "
        + ", ".join(f"{f:g}: {m:.3f}" for f, m in zip(factors, means, strict=True))
        + f" dB on {len(train)} training images")
    return factor


def run_evaluation(c: Config, prepared: tuple[np.ndarray, ProblemConfig], out: Path,
                   tracker: Any) -> EvaluationSummary:
    """Reconstruct the held-out images with the learned θ, with Huber-TV at the grid weight
    best on the training images and at each image's best ("TV oracle"); log their PSNRs."""
    theta, held_out = prepared
    backend = get_backend(c.backend.name, dtype=c.backend.dtype, device=c.backend.device)
    config, grid = engine_config(c), [float(v) for v in c.evaluate.tv_grid]

    def images(p: ProblemConfig, **changes: Any) -> Any:
        return build_problems(dataclasses.replace(p, **changes), backend, c.seed).problems

    count = min(c.problem.num_samples, c.evaluate.num_samples)  # training images for TV
    baseline = tv_baseline(c)
    train_tv = images(c.problem, num_samples=count, **baseline)
    tv_weight = best_tv_weight(train_tv, grid, config).best_theta
    say(f"Huber-TV log10 weight {tv_weight} (best mean PSNR on {len(train_tv)} training images)")
    learned, theta_dev = images(held_out), backend.asarray(theta)
    strengths = bool(c.evaluate.strength_grid)
    if strengths:
        factor = choose_strength_factor(c, images(c.problem, num_samples=count), theta_dev,
                                        config)
        strength = per_image_strength(c, learned, held_out.start, theta_dev, config)
        picks = strength.pick(factor)
        grid_s = strength.grid
        as_trained_x, as_trained_psnrs = (
            on_own_scale(learned, strength.solutions[grid_s.index(0.0)]) if 0.0 in grid_s
            else reconstructions(BilevelEngine(learned, config), theta_dev))
        learned_x, learned_psnrs = on_own_scale(learned, strength.chosen(factor))
        say(f"per-image strength by the predictive risk (divergence × {factor:g}): s from "
            f"{list(grid_s)}; Hessian solves converged: {strength.converged}")
    else:
        learned_x, learned_psnrs = reconstructions(BilevelEngine(learned, config), theta_dev)
    tv_search = best_tv_weight(images(held_out, **baseline), grid, config)
    tv, tv_x = tv_search.psnrs, tv_search.solutions[grid.index(tv_weight)]
    fields = PSNR_FIELDS + (STRENGTH_FIELDS if strengths else ())
    rows = []
    for j, p in enumerate(learned):
        truth, y = original(p.x_true, p), original(p.y, p)
        row = EvaluationRow(
            image=held_out.start + j,
            psnr_measurement=psnr(y, truth) if tuple(p.y.shape) == (p.n,) else math.nan,
            psnr_learned=float(learned_psnrs[j]),
            psnr_tv=float(tv[grid.index(tv_weight), j]),
            psnr_tv_oracle=float(tv[:, j].max()),
            **({"strength": grid_s[picks[j]],
                "psnr_learned_as_trained": float(as_trained_psnrs[j])} if strengths else {}))
        rows.append(row)
        tracker.log_metrics({k: getattr(row, k) for k in fields}, j)
        data = [] if math.isnan(row.psnr_measurement) else [
            ("data", y, row.psnr_measurement)]  # y not an image (inpainting)
        as_trained = [("learned, as trained", as_trained_x[j], row.psnr_learned_as_trained)
                      ] if strengths else []
        fig = plots.reconstruction(tuple(p.image_shape), truth, (
            *data, (f"Huber-TV 10^{tv_weight:g}", tv_x[j], row.psnr_tv), *as_trained,
            (f"learned, s = {row.strength:+g}" if strengths else "learned", learned_x[j],
             row.psnr_learned)))
        path = plots.save(fig, out / "reconstructions" / f"image_{row.image:03d}.png")
        tracker.log_artifact(path, "reconstructions")
    summary = EvaluationSummary(tracker.run_id, tuple(rows), tv_weight)
    means = {k: summary.mean(k) for k in fields}
    tracker.log_metrics({**{f"mean_{k}": v for k, v in means.items()},
                         "tv_log10_weight": tv_weight,
                         **({"strength_factor": factor} if strengths else {})}, len(rows))
    # a Markdown table of the PSNRs (dB): one row per held-out image, then the mean
    body = [(str(r.image), *(fmt(getattr(r, k), ".2f") for k in fields)) for r in rows]
    body.append(("mean", *(fmt(v, ".2f") for v in means.values())))
    table = markdown_table(("image", "measurement", "learned", "Huber-TV", "TV oracle",
                            *(("s", "learned, as trained") if strengths else ())), body)
    (out / "psnr.txt").write_text(table + "\n")
    tracker.log_artifact(out / "psnr.txt")
    # the θ evaluated, kept with its figures (a checkpoint named by evaluate.theta_path moves on)
    write_theta(out / EVALUATED_THETA_FILE, theta)
    tracker.log_artifact(out / EVALUATED_THETA_FILE)
    print(table, flush=True)
    return summary
