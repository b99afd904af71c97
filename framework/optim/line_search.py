"""The strong-Wolfe line search, one coroutine per sample, advanced together for a batch.

Nocedal & Wright, Algorithms 3.5 and 3.6 (bracketing, then a safeguarded quadratic-
interpolation zoom), with

    sufficient decrease  f(x + αp) ≤ f(x) + c1 α ∇f(x)ᵀp   (∇f(x)ᵀp < 0),
    curvature            |∇f(x + αp)ᵀp| ≤ c2 |∇f(x)ᵀp|.

A trial without sufficient decrease is never accepted, so f never increases.  When the
zoom runs out of trials after a step with sufficient decrease but not curvature, that step
is taken if it strictly lowers f.  A trial whose computed f equals f(x) (round-off) counts
as sufficient decrease only with curvature, so solves reach tight gradient tolerances
where f no longer changes in floating point.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from typing import Any, Literal

import numpy as np

from framework.optim.rows import RowEvaluator

Point = tuple[float, float, float]  # (α, f(x + αp), ∇f(x + αp)ᵀp)
Outcome = Literal["last", "kept"] | None
WolfeSearch = Generator[tuple[bool, float], tuple[float, float], Outcome]


def _interpolate(lo: Point, hi: Point) -> float:
    """Minimiser of the quadratic through (lo.f, lo.slope, hi.f), kept inside the middle 80 %."""
    delta = hi[0] - lo[0]
    left, right = sorted((lo[0] + 0.1 * delta, lo[0] + 0.9 * delta))
    if math.isfinite(hi[1]):
        curvature = (hi[1] - lo[1] - lo[2] * delta) / (delta * delta)
        if curvature > 0:
            alpha = lo[0] - lo[2] / (2.0 * curvature)
            if left <= alpha <= right:
                return alpha
    return lo[0] + 0.5 * delta


def strong_wolfe_search(f0: float, slope0: float, alpha: float, c1: float, c2: float,
                        max_trials: int) -> WolfeSearch:
    """The strong-Wolfe line search of one sample as a coroutine: yields (keep the trial
    just evaluated?, next α) and receives (f, slope) at that α; returns "last", "kept" or
    None: accept the last trial, the most recently kept one, or none."""

    def armijo(t: Point) -> bool:
        return math.isfinite(t[1]) and t[1] <= f0 + c1 * t[0] * slope0

    def curvature(t: Point) -> bool:
        return abs(t[2]) <= -c2 * slope0

    def zoom(lo: Point, hi: Point, budget: int, lo_is_last: bool) -> WolfeSearch:
        for _ in range(budget):
            a = _interpolate(lo, hi)
            f, s = yield lo_is_last, a  # keep lo when it is the trial just evaluated
            t, lo_is_last = (a, f, s), False
            if not armijo(t) or t[1] > lo[1]:
                hi = t
                continue
            if curvature(t):
                return "last"
            if t[2] * (hi[0] - lo[0]) >= 0:
                hi = lo
            lo, lo_is_last = t, True
            if abs(hi[0] - lo[0]) <= 1e-16 * max(1.0, lo[0]):
                break
        if lo[0] > 0 and lo[1] < f0:
            return "last" if lo_is_last else "kept"
        return None

    prev = (0.0, f0, slope0)
    for i in range(max_trials):
        f, s = yield i > 0, alpha  # keep the previous trial: it is prev
        t = (alpha, f, s)
        if not armijo(t) or (i > 0 and t[1] > prev[1]):
            return (yield from zoom(prev, t, max_trials - i - 1, False))
        if curvature(t):
            return "last"
        if t[2] >= 0:
            return (yield from zoom(t, prev, max_trials - i - 1, True))
        prev = t
        alpha *= 2.0
    return "last" if prev[0] > 0 and prev[1] < f0 else None


def search_rows(
    ev: RowEvaluator, X: Any, G: Any, F: np.ndarray, P: Any, slope: np.ndarray,
    alpha0: np.ndarray, searching: np.ndarray,
    line_search: Callable[[float, float, float], WolfeSearch],
) -> tuple[np.ndarray, Any, Any, np.ndarray]:
    """Run the line searches ``line_search(f, slope, α₀)`` (``strong_wolfe_search`` with
    its constants bound) of the samples ``searching`` together along the rows of P from X
    (gradients G, values F, slopes ∇fᵀp, first steps α₀): each round evaluates the rows at
    X + diag(α) P (α_i = 0 for the others) and sends each search its (f, slope).  Returns
    (accepted mask, X_new, G_new, F_new); rows not accepted keep X, G, F.
    """
    bsz = len(F)
    searches: dict[int, WolfeSearch] = {}
    alpha = [0.0] * bsz
    for i in searching.nonzero()[0].tolist():
        searches[i] = line_search(float(F[i]), float(slope[i]), float(alpha0[i]))
        _, alpha[i] = next(searches[i])
    accepted = np.zeros(bsz, dtype=bool)
    taken, kept = (X, G, F.copy()), (X, G, F.copy())  # (X, G, F) of accepted / kept trials

    def put(mask: np.ndarray, source: tuple, target: tuple) -> tuple:
        """``target`` with the rows ``mask`` of ``source`` (X, G, F)."""
        target[2][mask] = source[2][mask]
        return ev.select(mask, source[0], target[0]), ev.select(mask, source[1], target[1]), \
            target[2]

    while searches:
        pending = np.zeros(bsz, dtype=bool)
        pending[list(searches)] = True
        Xt = ev.step(X, [a if pending[i] else 0.0 for i, a in enumerate(alpha)], P)
        Ft, Gt, st = ev.evaluate(Xt, pending, P)
        keep = np.zeros(bsz, dtype=bool)
        take = {o: np.zeros(bsz, dtype=bool) for o in ("last", "kept", None)}
        for i in list(searches):
            fi = float(Ft[i])
            si = float(st[i]) if math.isfinite(fi) else math.nan
            try:
                keep[i], alpha[i] = searches[i].send((fi, si))
            except StopIteration as stop:
                del searches[i]
                take[stop.value][i] = True
        taken = put(take["last"], (Xt, Gt, Ft), put(take["kept"], kept, taken))
        kept = put(keep, (Xt, Gt, Ft), kept)
        accepted |= take["last"] | take["kept"]
    return accepted, *taken
