"""How much a per-image regularisation strength could add to a learned θ, and how much of
it rules that do not see the truth recover (issue 15, item 3).

Every log10 weight of θ (TV's and each FoE filter's exponents) is moved by the same s, on
a grid, for each held-out image of the preset's task; per image and s it records the PSNR,
the residual ‖Ax_s − y‖² and the predictive risk estimate (``framework.bilevel.risk``,
Hutchinson probes shared by all s).  It then compares, in mean PSNR and gain over
Huber-TV at a fixed weight:
* s = 0 (θ as learned) and the best single s (chosen on these images: an upper bound);
* the oracle: each image's best s (needs the truth);
* the discrepancy principle: each image's s with ‖Ax_s − y‖² nearest mσ²;
* UPRE: each image's s of least estimated predictive risk ‖A(x_s − x_true)‖²; with
  ``--factors``, also with its divergence term 2σ² tr(A H⁻¹ Aᵀ) scaled by each factor c
  (c > 1 regularises more; choose c on training images, then apply it to held-out ones);
  with ``--contrast-below``, UPRE only on the images whose data have a contrast
  std(y)/RMS(y) below each threshold, s = 0 on the others.
σ² = δ²/(1 + δ²)·‖y‖²/m, δ = ``problem.noise_level`` (the data are A x_true plus noise of
norm δ‖A x_true‖).  Lower solves from y as in ``task=evaluate``.

Usage (``--set`` takes config overrides of the run that made θ, after the preset;
``--from F.npz`` reports on saved measurements, e.g. with other ``--factors``):
  python benchmarks/strength_choice.py --data ../shared/data/bsds300 \
      --theta outputs/bsds-learn/theta.npz [--offset 20 --num 80] [--probes 6] \
      [--grid -0.3 -0.2 -0.1 0 0.1 0.2 0.3] [--factors 1 1.1 1.2] [--split train]
      [--contrast-below 0.25 0.3]
      [--set problem.gamma=0.04 ...] [--out F.npz]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import dataclasses
import time
from typing import Any

import numpy as np
from hydra import compose, initialize_config_module

from backends import get_backend
from backends.host import to_host
from framework.bilevel.engine import BilevelEngine
from framework.bilevel.strength import strength_risks
from framework.experiment.config import validate
from framework.experiment.engine_setup import engine_config
from framework.experiment.evaluate import best_tv_weight, original, tv_baseline
from framework.experiment.theta_file import read_theta
from problems.base import psnr as psnr_of
from problems.factory import build_problems
from problems.imaging import ImagingProblem
from problems.operators import relative_noise_variance


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """The images a strength rule is scored on, posed as ``task=evaluate`` poses them:
    ``problems`` and their ``batch``, θ and the 0/1 ``shift`` of its log10 weights, the
    Huber-TV PSNRs ``tv``, the noise ``variance`` and data ``contrast`` per image (host)."""

    backend: Any
    problems: list
    batch: ImagingProblem
    theta: np.ndarray
    shift: np.ndarray
    tv: np.ndarray
    variance: np.ndarray
    contrast: np.ndarray
    engine: BilevelEngine
    blur_sigma: float

    def psnrs(self, X: Any) -> np.ndarray:
        """The PSNR of each image's reconstruction (rows of ``X``), on its own scale."""
        host = to_host(X)
        return np.array([psnr_of(original(host[j], p), original(p.x_true, p))
                         for j, p in enumerate(self.problems)])


def held_out(args: argparse.Namespace) -> HeldOut:
    """The images of ``args`` (``--data --theta --split --offset --num --tv-weight --set``)."""
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "experiment=bsds_deblur_learn", f"problem.data_path={args.data}", *args.set])
    c = validate(cfg)
    backend = get_backend(c.backend.name, dtype=c.backend.dtype, device=c.backend.device)
    images = dataclasses.replace(c.problem, split=args.split, start=args.offset,
                                 num_samples=args.num, crops_per_image=1)
    problems = build_problems(images, backend, c.seed).problems
    batch = ImagingProblem.concat(problems)
    theta = read_theta("--theta", args.theta).reshape(-1)
    shift = np.asarray(batch.regularizer.log_weight_mask_host(), dtype=float)
    config = engine_config(c)
    tv = best_tv_weight(build_problems(dataclasses.replace(images, **tv_baseline(c)),
                                       backend, c.seed).problems, [args.tv_weight],
                        config).psnrs[0]
    variance = to_host(relative_noise_variance(batch.Y, c.problem.noise_level))
    host_y = to_host(batch.Y)
    contrast = host_y.std(axis=1) / np.sqrt(np.mean(host_y**2, axis=1))
    return HeldOut(backend, problems, batch, theta, shift, tv, variance, contrast,
                   BilevelEngine(problems, config), c.problem.blur_sigma)


def measure(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """PSNR, residual and UPRE of every image at every s of ``args.grid``."""
    h = held_out(args)
    batch, variance = h.batch, h.variance
    xp, (B, n) = batch.xp, batch.X_true.shape
    probes = xp.asarray(np.random.default_rng(0).choice([-1.0, 1.0], (args.probes, B, n)))
    grid = np.array(args.grid)
    clock = [time.perf_counter()]

    def progress(i: int) -> None:
        now = time.perf_counter()
        print(f"s = {grid[i]:+.2f}: {now - clock[0]:.0f} s", flush=True)
        clock[0] = now

    risks = strength_risks(h.engine, batch, h.backend.asarray(h.theta), grid,
                           xp.asarray(variance), probes, callback=progress)
    psnr = np.stack([h.psnrs(X) for X in risks.solutions])
    residual = risks.residual
    risk = residual + risks.divergence - n * variance
    trace_error = risks.divergence_error / (2 * variance)
    print(f"UPRE trace error {np.median(trace_error):.2f} (median), converged "
          f"{risks.converged}", flush=True)
    return {"grid": grid, "psnr": psnr, "residual": residual, "risk": risk, "tv": h.tv,
            "trace_error": trace_error, "variance": variance, "contrast": h.contrast,
            "n": np.array(n),
            "images": np.array([args.offset, args.offset + B - 1]), "split": np.array(args.split)}


def report(m: dict[str, np.ndarray], factors: list[float], contrasts: list[float]) -> None:
    """The Markdown table of the strength rules on measurements ``m``."""
    grid, psnr, residual, risk, tv = (m[k] for k in ("grid", "psnr", "residual", "risk", "tv"))
    variance, n, B = m["variance"], int(m["n"]), psnr.shape[1]
    rows = np.arange(B)
    zero = int(np.argmin(np.abs(grid)))
    single = int(np.argmax(psnr.mean(axis=1)))
    picks = {
        "s = 0 (θ as learned)": np.full(B, zero),
        f"best single s ({grid[single]:+g}, chosen on these)": np.full(B, single),
        "oracle: each image's best s": np.argmax(psnr, axis=0),
        "discrepancy: ‖Ax − y‖² nearest mσ²": np.argmin(np.abs(residual / (n * variance) - 1),
                                                         axis=0),
    }
    divergence = risk - residual + n * variance  # 2σ² tr(A H⁻¹ Aᵀ)
    for factor in factors:
        name = "UPRE: least estimated ‖A(x − x_true)‖²" + (
            "" if factor == 1 else f", divergence × {factor:g}")
        picks[name] = np.argmin(residual + factor * divergence, axis=0)
    for below in contrasts:
        flat = m["contrast"] < below
        picks[f"UPRE where std(y)/RMS(y) < {below:g} ({int(flat.sum())} images), else s = 0"] = (
            np.where(flat, np.argmin(risk, axis=0), zero))
    first, last = (int(v) for v in m["images"])
    print(f"\n{B} images ({m['split']} {first}..{last}), Huber-TV: {tv.mean():.3f} dB; "
          f"grid {[float(g) for g in grid]}")
    print("| strength | mean PSNR | gain over TV | won | corr. with the oracle's s |")
    print("|---|---:|---:|---:|---:|")
    best = grid[picks["oracle: each image's best s"]]
    for name, pick in picks.items():
        got, chosen = psnr[pick, rows], grid[pick]
        corr = np.corrcoef(chosen, best)[0, 1] if np.std(chosen) > 0 else float("nan")
        print(f"| {name} | {got.mean():.3f} | {got.mean() - tv.mean():+.3f} | "
              f"{int(np.sum(got > tv))} | {corr:.2f} |")


def joined(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Measurements of consecutive image ranges (same grid) as one."""
    first = parts[0]
    if any(not np.array_equal(p["grid"], first["grid"]) for p in parts):
        raise SystemExit("--from: the files were measured on different grids")
    out = {k: np.concatenate([p[k] for p in parts], axis=-1)
           for k in ("psnr", "residual", "risk", "tv", "trace_error", "variance", "contrast")}
    images = np.array([first["images"][0], parts[-1]["images"][1]])
    return {**first, **out, "images": images}


def add_image_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose the images, θ, the grid of s and the probes."""
    parser.add_argument("--data")
    parser.add_argument("--theta")
    parser.add_argument("--split", default="test")
    parser.add_argument("--offset", type=int, default=20)
    parser.add_argument("--num", type=int, default=80)
    parser.add_argument("--probes", type=int, default=6)
    parser.add_argument("--grid", type=float, nargs="+",
                        default=[-0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3])
    parser.add_argument("--tv-weight", type=float, default=-1.5)
    parser.add_argument("--set", nargs="*", default=[])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_image_arguments(parser)
    parser.add_argument("--factors", type=float, nargs="+", default=[1.0])
    parser.add_argument("--contrast-below", type=float, nargs="*", default=[])
    parser.add_argument("--out", default=None, help="save the measurements here (.npz)")
    parser.add_argument("--from", dest="saved", nargs="+", default=None,
                        help="report on measurements saved by --out (several: their images "
                        "joined, in order) instead of measuring")
    args = parser.parse_args()
    if args.saved is None and not (args.data and args.theta):
        parser.error("give --data and --theta (or --from a saved .npz)")
    if args.saved:
        m = joined([dict(np.load(path)) for path in args.saved])
    else:
        m = measure(args)
        if args.out:
            np.savez(args.out, **m)
    report(m, args.factors, args.contrast_below)


if __name__ == "__main__":
    main()
