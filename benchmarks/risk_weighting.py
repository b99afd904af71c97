"""Does weighing the predictive risk toward the image's own error pick better per-image
strengths (issue 15, item 3)?  And do more Hutchinson probes?

UPRE (``framework.bilevel.risk``) estimates ‖A(x − x_true)‖², which for a blur hardly sees
the frequencies the blur damps, while the PSNR counts them in full.  For any symmetric
positive semi-definite W, Stein's lemma gives the same kind of unbiased estimate of
‖B(x − x_true)‖² with BᵀB = AᵀWA:

    E‖B(x* − x_true)‖² = E[(Ax* − y)ᵀW(Ax* − y) + 2σ² tr(W A H⁻¹ Aᵀ) − σ² tr(W)].

Here W_ε is circulant on the image grid with symbol ε/(|ĝ(ω)|² + ε), ĝ the periodic
symbol of the blur's kernel, so that AᵀW_εA is about the Tikhonov filter |ĝ|²/(|ĝ|² + ε)
(up to the scale ε): it passes the frequencies the blur keeps above ε, and W_ε → I (UPRE)
as ε → ∞.  tr(W_ε) does not depend on x, so it is left out.  The trace term is
Hutchinson's (W z)ᵀ A H⁻¹ Aᵀ z over Rademacher z, one batched MINRES solve per probe, the
same solves for every ε.  The report scores each ε's per-image pick of s (and with the
divergence term scaled by 1.2), plain UPRE with the divergence term scaled by each of
``--factors`` (choose it on training images), then plain UPRE with 1 … k of the k probes
(the mean over all subsets of that size).

Usage (the images' options as in ``strength_choice.py``):
  python benchmarks/risk_weighting.py --data ../shared/data/bsds300 \
      --theta docs/bsds_learn_200_theta.npz --offset 20 --num 40 [--eps 0.01 0.1 1] \
      [--out F.npz]
  python benchmarks/risk_weighting.py --from A.npz B.npz   # report, images joined
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import itertools
import time

import numpy as np
from strength_choice import add_image_arguments, held_out

from backends.host import to_host
from framework.krylov.minres import rminres
from problems.operators import gaussian_kernel_1d

UNWEIGHTED = np.inf


def weight_symbols(sigma: float, shape: tuple[int, int], eps: np.ndarray) -> np.ndarray:
    """ε/(|ĝ|² + ε) on the FFT grid of ``shape`` for each ε (inf: 1), ĝ the periodic symbol
    of the normalised Gaussian of width ``sigma``."""
    taps = gaussian_kernel_1d(sigma)
    r = len(taps) // 2
    symbols = []
    for length in shape:
        kernel = np.zeros(length)
        kernel[: r + 1], kernel[length - r:] = taps[r:], taps[:r]
        symbols.append(np.real(np.fft.fft(kernel)))
    power = (symbols[0][:, None] * symbols[1][None, :]) ** 2
    return np.stack([np.ones_like(power) if np.isinf(e) else e / (power + e) for e in eps])


def measure(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """PSNR, weighted residuals and per-probe weighted quadratic forms at every s."""
    h = held_out(args)
    batch, xp, operator = h.batch, h.batch.xp, h.batch.operator
    B, n = batch.X_true.shape
    shape = tuple(operator.image_shape)
    eps = np.array([*args.eps, UNWEIGHTED])
    symbols = weight_symbols(h.blur_sigma, shape, eps)

    def weighted(V: np.ndarray, e: int) -> np.ndarray:
        images = np.fft.fft2(V.reshape(-1, *shape)) * symbols[e]
        return np.real(np.fft.ifft2(images)).reshape(-1, n)

    probes = np.random.default_rng(0).choice([-1.0, 1.0], (args.probes, B, n))
    grid = np.array(args.grid)
    psnr = np.empty((grid.size, B))
    residual = np.empty((grid.size, eps.size, B))
    quad = np.empty((grid.size, eps.size, args.probes, B))
    for i, s in enumerate(grid):
        start = time.perf_counter()
        theta_s = h.backend.asarray(h.theta + s * h.shift)
        X = h.engine.lower_solutions(theta_s)
        psnr[i] = h.psnrs(X)
        R = to_host(operator.apply(X) - batch.Y)
        residual[i] = [np.sum(R * weighted(R, e), axis=1) for e in range(eps.size)]
        hessian = batch.linearize(X, theta_s).hvp
        for k in range(args.probes):
            solved = rminres(hessian, operator.adjoint(xp.asarray(probes[k])), rtol=1e-4)
            AW = to_host(operator.apply(solved.x))
            quad[i, :, k] = [np.sum(weighted(probes[k], e) * AW, axis=1)
                             for e in range(eps.size)]
        print(f"s = {s:+.2f}: mean PSNR {psnr[i].mean():.3f} dB, "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    return {"grid": grid, "eps": eps, "psnr": psnr, "residual": residual, "quad": quad,
            "tv": h.tv, "variance": h.variance}


def report(m: dict[str, np.ndarray], factors: list[float]) -> None:
    """Markdown tables: each weighting's picks, UPRE's with its divergence term scaled by
    each of ``factors``, then UPRE with fewer probes."""
    grid, psnr, tv, variance = m["grid"], m["psnr"], m["tv"], m["variance"]
    B, rows = psnr.shape[1], np.arange(psnr.shape[1])
    oracle = grid[np.argmax(psnr, axis=0)]
    zero = int(np.argmin(np.abs(grid)))

    below, above = (int(np.argmin(np.abs(grid - t))) for t in (-0.1, 0.1))

    def row(name: str, pick: np.ndarray, risk: np.ndarray, quad: np.ndarray) -> str:
        got = psnr[pick, rows]
        corr = np.corrcoef(grid[pick], oracle)[0, 1] if np.std(grid[pick]) > 0 else np.nan
        # the probes' standard error of the risk's change from s = -0.1 to +0.1, relative
        change = quad[above] - quad[below]  # (probes, B)
        noise = 2 * variance * np.std(change, axis=0, ddof=1) / np.sqrt(change.shape[0])
        relative = np.median(noise / np.abs(risk[above] - risk[below]))
        return (f"| {name} | {got.mean() - tv.mean():+.3f} | {int(np.sum(got > tv))} | "
                f"{int(np.sum(pick == 0))} | {corr:.2f} | {relative:.2f} |")

    print(f"\n{B} images, Huber-TV {tv.mean():.3f} dB; s = 0: {psnr[zero].mean() - tv.mean():+.3f}"
          f" ({int(np.sum(psnr[zero] > tv))} won), oracle "
          f"{psnr.max(axis=0).mean() - tv.mean():+.3f}")
    print("| rule | gain over TV | won | picks of the lowest s | corr. with the oracle's s "
          "| probe noise / change of the risk, s = −0.1 → +0.1 (median) |")
    print("|---|---:|---:|---:|---:|---:|")
    for e, eps in enumerate(m["eps"]):
        for factor in (1.0, 1.2):
            quad = factor * m["quad"][:, e]
            risk = m["residual"][:, e] + 2 * variance * quad.mean(axis=1)
            name = "UPRE (W = I)" if np.isinf(eps) else f"W_ε, ε = {eps:g}"
            print(row(name + ("" if factor == 1 else f", divergence × {factor:g}"),
                      np.argmin(risk, axis=0), risk, quad))
    unweighted, count = m["eps"].size - 1, m["quad"].shape[2]
    print("\n| UPRE, divergence × c | gain over TV | won |\n|---:|---:|---:|")
    for factor in factors:
        risk = m["residual"][:, unweighted] + factor * 2 * variance * m["quad"][
            :, unweighted].mean(axis=1)
        got = psnr[np.argmin(risk, axis=0), rows]
        print(f"| {factor:g} | {got.mean() - tv.mean():+.3f} | {int(np.sum(got > tv))} |")
    print("\n| UPRE probes | gain over TV (mean over subsets) | won |\n|---:|---:|---:|")
    for size in range(1, count + 1):
        scores = []
        for subset in itertools.combinations(range(count), size):
            trace = m["quad"][:, unweighted][:, list(subset)].mean(axis=1)
            got = psnr[np.argmin(m["residual"][:, unweighted] + 2 * variance * trace, 0), rows]
            scores.append((got.mean() - tv.mean(), np.sum(got > tv)))
        gain, won = np.mean(scores, axis=0)
        print(f"| {size} | {gain:+.3f} | {won:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_image_arguments(parser)
    parser.add_argument("--eps", type=float, nargs="+",
                        default=[1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0])
    parser.add_argument("--factors", type=float, nargs="+", default=[1.0, 1.1, 1.2, 1.3, 1.5],
                        help="scales of UPRE's divergence term to report")
    parser.add_argument("--out", default=None, help="save the measurements here (.npz)")
    parser.add_argument("--from", dest="saved", nargs="+", default=None,
                        help="report on measurements saved by --out, images joined in order")
    args = parser.parse_args()
    if args.saved is None and not (args.data and args.theta):
        parser.error("give --data and --theta (or --from a saved .npz)")
    if args.saved:
        parts = [dict(np.load(path)) for path in args.saved]
        m = {**parts[0], **{k: np.concatenate([p[k] for p in parts], axis=-1)
                            for k in ("psnr", "residual", "quad", "tv", "variance")}}
    else:
        m = measure(args)
        if args.out:
            np.savez(args.out, **m)
    report(m, args.factors)


if __name__ == "__main__":
    main()
