"""The recycle space carried from one linear system to the next, and the row kernels
that apply it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

from backends.host import to_host


def bmv(M: Any, v: Any) -> Any:
    """Per-sample matrix–vector product: M (B, n, k) @ v (B, k) → (B, n)."""
    return (M @ v[..., None])[..., 0]


def bmtv(M: Any, v: Any) -> Any:
    """Per-sample Mᵀv: M (B, n, k), v (B, n) → (B, k)."""
    xp = array_namespace(M, v)
    return (xp.matrix_transpose(M) @ v[..., None])[..., 0]


def widths(basis: Any) -> list[int]:
    """Non-zero columns per sample of a (B, n, D) basis (a host read)."""
    xp = array_namespace(basis)
    alive = xp.sum(xp.astype(xp.linalg.vector_norm(basis, axis=-2) > 0, xp.int64), axis=-1)
    return [int(v) for v in to_host(alive)]


@dataclass(frozen=True)
class RecycleSpace:
    """U and C = A U, each (B, n, k) for a batch or (n, k) for one system, with CᵢᵀCᵢ = I
    on the non-zero columns; zero columns are padding (samples with fewer vectors) and
    contribute nothing to the solver's projections."""

    U: Any
    C: Any

    @property
    def dims(self) -> tuple[int, ...]:
        """Each sample's dimension (its non-zero columns); a host read."""
        return tuple(widths(self.promoted().C))

    @property
    def k(self) -> int:
        """The dimension of a single-system space (the largest one of a batch)."""
        return max(self.dims)

    def validate(self, A: Callable[[Any], Any] | None = None) -> None:
        """``ValueError`` naming the defect: non-finite U or C, CᵢᵀCᵢ not the identity on
        the non-zero columns (to √ε), or — given the batch operator A — C not A U on a
        probe combination (relative 1e-6: a space kept from another matrix)."""
        xp = array_namespace(self.C)
        U, C = self.promoted().U, self.promoted().C
        for name, X in (("U", U), ("C", C)):
            if not bool(xp.all(xp.isfinite(X))):
                raise ValueError(f"recycle space {name} contains NaN or inf")
        live = xp.astype(xp.linalg.vector_norm(C, axis=1) > 0, C.dtype)
        gram = xp.matrix_transpose(C) @ C
        eye = xp.eye(C.shape[-1], dtype=C.dtype, device=device_of(C)) * live[:, None, :]
        error = float(xp.max(xp.abs(gram - eye))) if C.shape[-1] else 0.0
        if error > float(xp.finfo(C.dtype).eps) ** 0.5:
            raise ValueError(f"recycle space C is not orthonormal (max |CᵀC − I| = {error:.1e}); "
                             "build the space with RecycleSpace.from_basis")
        if A is None or C.shape[-1] == 0:
            return
        w = xp.ones(tuple(C.shape[::2]), dtype=C.dtype, device=device_of(C)) * live
        Cw = bmv(C, w)
        gap = xp.linalg.vector_norm(A(bmv(U, w)) - Cw, axis=1)
        if bool(xp.any(gap > 1e-6 * xp.linalg.vector_norm(Cw, axis=1))):
            raise ValueError("recycle space C is not A U for this operator (a space kept from "
                             "another matrix?); rebuild it with RecycleSpace.from_basis")

    def promoted(self) -> RecycleSpace:
        """A single-system space as a batch of one."""
        return self if self.U.ndim == 3 else RecycleSpace(self.U[None, ...], self.C[None, ...])

    def sample(self, i: int) -> RecycleSpace:
        return RecycleSpace(self.U[i, ...], self.C[i, ...])

    @classmethod
    def from_basis(
        cls, operator: Callable[[Any], Any], Y: Any, *, rank_tol: float = 1e-10
    ) -> RecycleSpace | None:
        """Build (U, C) from a basis ``Y`` ((B, n, k), or (n, k) with a 1-D operator):
        one block application gives AY; a thin QR AY = QR and an SVD R = P Σ Qᵀ give
        C = Q P (orthonormal) and U = Y Q Σ⁻¹, so A U = C in exact arithmetic.  Directions
        with σ_i ≤ rank_tol · σ_max become zero columns (a near-dependent Y yields a
        smaller space, not a blow-up).  ``None`` when k = 0."""
        xp = array_namespace(Y)
        if Y.ndim not in (2, 3):
            raise ValueError(f"recycle basis must be (n, k) or (B, n, k), got {tuple(Y.shape)}")
        if Y.shape[-1] == 0:
            return None
        if not bool(xp.all(xp.isfinite(Y))):
            raise ValueError("recycle basis contains non-finite values (NaN or inf)")
        return cls.from_products(Y, operator(Y), rank_tol=rank_tol)

    @classmethod
    def from_products(cls, Y: Any, AY: Any, *, rank_tol: float = 1e-10) -> RecycleSpace | None:
        """As ``from_basis`` when A·Y is already known (no operator application)."""
        xp = array_namespace(Y, AY)
        if Y.shape != AY.shape:
            raise ValueError(f"Y {tuple(Y.shape)} and AY {tuple(AY.shape)} must have one shape")
        if Y.shape[-1] == 0:
            return None
        Q, R = xp.linalg.qr(AY)
        P, sigma, Wt = xp.linalg.svd(R)
        smax = xp.max(sigma, axis=-1, keepdims=True)
        keep = (sigma > rank_tol * smax) & (smax > 0)
        scale = xp.where(keep, 1.0 / xp.where(keep, sigma, xp.ones_like(sigma)), 0.0)
        C = (Q @ P) * xp.astype(keep, Q.dtype)[..., None, :]
        rank = sigma.shape[-1]  # min(n, k): k > n leaves k − n directions out
        U = (Y @ xp.matrix_transpose(Wt[..., :rank, :])) * scale[..., None, :]
        return cls(U=U, C=C)
