"""Recycle-space selection strategies on projected bases, for every sample at once.

Sample i's basis W_i (stacked to (B, n, D)) has valid columns (non-padding recycle vectors,
Lanczos vectors of its own iterations) and zero ones.  A strategy needs only the projected
matrices (``Projection``) and returns coefficients Y (B, D, k) of U = W Y: min(k, rank W_i)
vectors per sample, zero columns after them.  Every problem is posed in rank-revealing
orthonormal coordinates S (Sᵀ·gram·S = I), so a nearly dependent W cannot blow up; dropped
or padding directions get values never chosen (a separated eigenvalue, an identity block)
and are recognised by where their vectors live.

Strategies: ``ritz``, G z = θ gram z by |θ| (small = closest to 0); ``harmonic_ritz``,
F z = θ G z by the harmonic Ritz values θ (small = closest to 0), solved as
G z = (1/θ) F z with F positive definite; ``rgen_left``, ``rgen_right``, ``rgen_both``,
Ritz generalised singular vectors from the GSVD of (JᵀW̃, W̃ᵀHW̃), W̃ = WS, by σ (large by
default): the left vectors V_H, the right vectors X⁻ᵀ, or their sign-aligned mean.
``which = "mix"`` keeps ⌊k/2⌋ from the small end and k − ⌊k/2⌋ from the large end.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

from backends.choice import Choice
from framework.krylov.dense import diag_embed, gsvd, orthonormal_coordinates, symmetrize

# Recycle strategies (config ``recycle.strategy``): ``none``, the five selections above, and
# the dense oracles ``eig`` (exact eigenvectors, selected like ``ritz``) and ``gsvd`` (exact
# generalised singular vectors, selected like ``rgen_right``).
Strategy = Choice("Strategy", "none ritz harmonic_ritz rgen_left rgen_right rgen_both eig gsvd")
# End of the spectrum a selection keeps (config ``recycle.which``).
Which = Choice("Which", "small large mix")
DEFAULT_WHICH = {Strategy.ritz: Which.small, Strategy.harmonic_ritz: Which.small,
                 Strategy.rgen_left: Which.large, Strategy.rgen_right: Which.large,
                 Strategy.rgen_both: Which.large}


def needs_jacobian(strategy: str) -> bool:
    return strategy in (Strategy.rgen_left, Strategy.rgen_right, Strategy.rgen_both)


@dataclass(frozen=True)
class Projection:
    """gram = WᵀW, G = WᵀHW, F = (HW)ᵀ(HW), P = JᵀW (RGen only) of a basis whose padding
    columns are zero, each (B, D, ·) (or unbatched)."""

    gram: Any
    G: Any
    F: Any
    P: Any = None

    @classmethod
    def from_products(cls, W: Any, HW: Any, JW: Any = None, *, Wres: Any = None,
                      MHW: Any = None) -> Projection:
        """Form the projected matrices from W, HW (and JᵀW): no operator applications.
        With a preconditioner M = LLᵀ, given W's residual form Wres = M⁻¹W and MHW = M·HW,
        they are those of Â = LᵀHL on L⁻¹W: gram = WresᵀW, G = WᵀHW, F = (HW)ᵀ(MHW)."""
        xp = array_namespace(W, HW)
        return cls(gram=symmetrize(xp.matrix_transpose(W if Wres is None else Wres) @ W),
                   G=symmetrize(xp.matrix_transpose(W) @ HW),
                   F=symmetrize(xp.matrix_transpose(HW) @ (HW if MHW is None else MHW)), P=JW)

    def __add__(self, other: Projection) -> Projection:
        """The sum over blocks of rows (P is not summed)."""
        return Projection(self.gram + other.gram, self.G + other.G, self.F + other.F)


def _support(xp: Any, vectors: Any, dead: Any) -> Any:
    """Mask of the columns of ``vectors`` that live mostly on ``dead`` coordinates."""
    mass = xp.sum(vectors * vectors, axis=-2)
    dead_mass = xp.sum(vectors * vectors * xp.astype(dead, vectors.dtype)[..., None], axis=-2)
    return dead_mass > 0.5 * mass


def _separated(xp: Any, A: Any, dead: Any) -> Any:
    """A with a large multiple of the identity on ``dead`` coordinates (A is zero there):
    their eigenpairs separate from the others and are recognised by their support."""
    big = 1.0 + 2.0 * xp.max(xp.abs(A), axis=(-2, -1), keepdims=True)
    return A + big * diag_embed(xp.astype(dead, A.dtype))


def _normalized(xp: Any, Y: Any) -> Any:
    norms = xp.linalg.vector_norm(Y, axis=-2, keepdims=True)
    return Y / xp.where(norms > 0, norms, xp.ones_like(norms))


def _candidates(xp: Any, strategy: str, Gt: Any, Ft: Any, Pt: Any,
                dead: Any) -> tuple[Any, Any, Any]:
    """Candidate vectors in S-coordinates, their sort key (small = first) and the mask
    of candidates that are padding."""
    if strategy == Strategy.ritz:
        theta, Z = xp.linalg.eigh(_separated(xp, Gt, dead))
        return Z, xp.abs(theta), _support(xp, Z, dead)
    if strategy == Strategy.harmonic_ritz:
        # G z = μ F z with F > 0; harmonic Ritz values θ = 1/μ: |θ| small ⇔ |μ| large
        T, keep = orthonormal_coordinates(Ft + diag_embed(xp.astype(dead, Ft.dtype)))
        A = xp.matrix_transpose(T) @ Gt @ T
        mu, Uv = xp.linalg.eigh(symmetrize(_separated(xp, A, ~keep)))
        Z = T @ Uv
        return Z, -xp.abs(mu), _support(xp, Z, dead) | _support(xp, Uv, ~keep)
    dec = gsvd(Pt, Gt + diag_embed(xp.astype(dead, Gt.dtype)))
    left, right = _normalized(xp, dec.left), _normalized(xp, dec.right)
    invalid = _support(xp, right, dead)
    if strategy == Strategy.rgen_left:
        return left, dec.sigma, invalid
    if strategy == Strategy.rgen_right:
        return right, dec.sigma, invalid
    agree = xp.sum(left * right, axis=-2)
    signs = xp.sign(agree) + xp.astype(agree == 0, agree.dtype)  # ±1, never 0
    return (left + right * signs[..., None, :]) / 2, dec.sigma, invalid


def _chosen(xp: Any, key: Any, invalid: Any, k: int, which: str) -> tuple[Any, Any]:
    """Rank of every candidate in ascending key order among the valid ones, and the mask
    of the chosen ones (exactly min(k, #valid) per sample)."""
    inf = xp.asarray(float("inf"), dtype=key.dtype, device=device_of(key))
    keyed = xp.where(invalid, inf, key)
    rank = xp.argsort(xp.argsort(keyed, axis=-1, stable=True), axis=-1, stable=True)
    valid = ~invalid
    count = xp.sum(xp.astype(valid, rank.dtype), axis=-1, keepdims=True)
    from_top = count - 1 - rank
    if which == Which.small:
        chosen = rank < k
    elif which == Which.large:
        chosen = from_top < k
    else:
        chosen = (rank < k // 2) | (from_top < k - k // 2)
    return rank, chosen & valid


def select(proj: Projection, strategy: str, k: int, which: str | None = None) -> Any:
    """Coefficients Y (B, D, k) (or (D, k)) of the chosen vectors in the masked basis; a
    sample with fewer than k valid directions gets zero columns after its own."""
    if Strategy(strategy) not in DEFAULT_WHICH:
        raise ValueError(f"{strategy!r} is not a selection; valid names are "
                         f"{', '.join(DEFAULT_WHICH)}")
    which = DEFAULT_WHICH[strategy] if which is None else Which(which)
    if needs_jacobian(strategy) and proj.P is None:
        raise ValueError(f"strategy {strategy!r} needs Jᵀ products: pass a jac_t operator")
    xp = array_namespace(proj.gram)
    if proj.gram.ndim == 2:
        batch = Projection(*(None if a is None else a[None, ...] for a in
                             (proj.gram, proj.G, proj.F, proj.P)))
        return select(batch, strategy, k, which)[0, ...]
    S, keep = orthonormal_coordinates(proj.gram)
    St = xp.matrix_transpose(S)
    Gt = symmetrize(St @ proj.G @ S)
    Ft = symmetrize(St @ proj.F @ S)
    Pt = None if proj.P is None else proj.P @ S
    Y, key, invalid = _candidates(xp, strategy, Gt, Ft, Pt, ~keep)
    rank, chosen = _chosen(xp, key, invalid, k, which)
    big = xp.asarray(Y.shape[-1] + 1, dtype=rank.dtype, device=device_of(rank))
    slots = xp.argsort(xp.where(chosen, rank, big), axis=-1, stable=True)[:, :k]
    filled = xp.take_along_axis(chosen, slots, axis=-1)
    gather = xp.broadcast_to(slots[:, None, :], (Y.shape[0], Y.shape[-1], slots.shape[-1]))
    Yk = xp.take_along_axis(Y, gather, axis=-1) * xp.astype(filled, Y.dtype)[:, None, :]
    return S @ Yk
