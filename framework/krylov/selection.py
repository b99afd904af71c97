"""Recycle-space selection strategies on a projected basis.

Given a basis W (n × d) of the last solve (recycle space plus Lanczos vectors), every
strategy needs only small projected matrices (``Projection``):

    gram = WᵀW,   G = WᵀHW,   F = (HW)ᵀ(HW),   P = JᵀW  (RGen only)

and returns coefficients Y (d × k); the new recycle space is U = W Y.  All problems are
first reduced to orthonormal coordinates S (Sᵀ·gram·S = I, rank-revealing), so a nearly
dependent W can never blow up.

Strategies (config names):
* ``ritz``          — Ritz vectors: G z = θ gram z; ``which`` by |θ| (small = closest to 0).
* ``harmonic_ritz`` — harmonic Ritz vectors: F z = θ G z, labelled by the harmonic Ritz
  values θ (small = closest to 0); solved as G z = (1/θ) F z with F positive definite.
* ``rgen_left``, ``rgen_right``, ``rgen_both`` — Ritz generalised singular vectors from
  the GSVD of (JᵀW̃, W̃ᵀHW̃) for the orthonormal basis W̃ = WS of range W (the pair
  (JᵀW, WᵀHW) of the paper when W is orthonormal; this form does not depend on how W is
  scaled); ``which`` by the generalised singular value σ (large by default); left
  vectors V_H, right vectors X⁻ᵀ, or their (sign-aligned) mean.
* ``none`` — no recycling.
``which = "mix"`` keeps ⌊k/2⌋ from the small end and k − ⌊k/2⌋ from the large end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from array_api_compat import array_namespace

from framework.krylov.dense import definite_pencil_eig, gsvd, orthonormal_coordinates, symmetrize

WHICH = ("small", "large", "mix")


@dataclass(frozen=True)
class Projection:
    """Projected matrices of a basis W: gram = WᵀW, G = WᵀHW, F = (HW)ᵀ(HW), P = JᵀW."""

    gram: Any
    G: Any
    F: Any
    P: Any = None

    @property
    def dim(self) -> int:
        return int(self.gram.shape[0])

    @classmethod
    def from_products(cls, W: Any, HW: Any, JW: Any = None) -> Projection:
        """Form the projected matrices from W, HW (and JᵀW): no operator applications."""
        xp = array_namespace(W, HW)
        Wt = xp.matrix_transpose(W)
        return cls(
            gram=symmetrize(Wt @ W),
            G=symmetrize(Wt @ HW),
            F=symmetrize(xp.matrix_transpose(HW) @ HW),
            P=JW,
        )


def pick(values: Any, k: int, which: str) -> Any:
    """Indices of the k entries of ``values`` (ascending order of importance key) for
    ``which`` ∈ small/large/mix; exactly min(k, len) indices."""
    xp = array_namespace(values)
    order = xp.argsort(values)
    size = int(values.shape[0])
    k = min(k, size)
    if which == "small":
        return order[:k]
    if which == "large":
        return order[size - k :]
    n_small = k // 2
    n_large = k - n_small
    return xp.concat([order[:n_small], order[size - n_large :]])


def _ritz(proj: Projection, k: int, which: str, S: Any) -> Any:
    xp = array_namespace(S)
    St = xp.matrix_transpose(S)
    theta, Z = xp.linalg.eigh(symmetrize(St @ proj.G @ S))
    return S @ xp.take(Z, pick(xp.abs(theta), k, which), axis=1)


def _harmonic_ritz(proj: Projection, k: int, which: str, S: Any) -> Any:
    xp = array_namespace(S)
    St = xp.matrix_transpose(S)
    # G z = μ F z with F > 0; harmonic Ritz values θ = 1/μ, so |θ| small ⇔ |μ| large.
    mu, Z = definite_pencil_eig(St @ proj.G @ S, St @ proj.F @ S)
    return S @ xp.take(Z, pick(-xp.abs(mu), k, which), axis=1)


def _normalized(Y: Any) -> Any:
    xp = array_namespace(Y)
    return Y / xp.linalg.vector_norm(Y, axis=0)


def _rgen(side: str) -> Callable[[Projection, int, str, Any], Any]:
    def select(proj: Projection, k: int, which: str, S: Any) -> Any:
        if proj.P is None:
            raise ValueError(f"strategy 'rgen_{side}' needs Jᵀ products: pass a jac_t operator")
        xp = array_namespace(S)
        St = xp.matrix_transpose(S)
        dec = gsvd(proj.P @ S, symmetrize(St @ proj.G @ S))
        idx = pick(dec.sigma, k, which)
        left = _normalized(xp.take(dec.left, idx, axis=1))
        right = _normalized(xp.take(dec.right, idx, axis=1))
        if side == "left":
            Y = left
        elif side == "right":
            Y = right
        else:
            agree = xp.sum(left * right, axis=0)
            signs = xp.sign(agree) + xp.astype(agree == 0, agree.dtype)  # ±1, never 0
            Y = (left + right * signs) / 2
        return S @ Y

    return select


SELECTORS: dict[str, Callable[[Projection, int, str, Any], Any]] = {
    "ritz": _ritz,
    "harmonic_ritz": _harmonic_ritz,
    "rgen_left": _rgen("left"),
    "rgen_right": _rgen("right"),
    "rgen_both": _rgen("both"),
}
DEFAULT_WHICH = {
    "ritz": "small",
    "harmonic_ritz": "small",
    "rgen_left": "large",
    "rgen_right": "large",
    "rgen_both": "large",
}


def needs_jacobian(strategy: str) -> bool:
    return strategy.startswith("rgen")


def check_selection(strategy: str, k: int, which: str | None) -> str:
    """Validate a selection request; returns ``which`` with the strategy's default."""
    if strategy not in SELECTORS:
        raise ValueError(
            f"unknown selection strategy {strategy!r}; valid names are {', '.join(SELECTORS)}"
        )
    which = DEFAULT_WHICH[strategy] if which is None else which
    if which not in WHICH:
        raise ValueError(f"which must be one of {', '.join(WHICH)}, got {which!r}")
    if k < 0:
        raise ValueError(f"recycle dimension k must be >= 0, got {k}")
    return which


def select(
    proj: Projection, strategy: str, k: int, which: str | None = None, *, rank_tol: float = 1e-12
) -> Any:
    """Coefficients Y (d × k') of the chosen vectors, k' = min(k, rank W)."""
    which = check_selection(strategy, k, which)
    S = orthonormal_coordinates(proj.gram, rank_tol)
    return SELECTORS[strategy](proj, k, which, S)
