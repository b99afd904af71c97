"""The recycle space carried from one linear system to the next, and the row kernels
that apply it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

from backends.host import to_host
from framework.krylov.dense import orthonormal_coordinates


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
    on the non-zero columns; zero columns are padding (samples with fewer vectors).  A space
    for a preconditioned solve (M ≈ A⁻¹, ``from_basis(..., M=M)``) is M-orthonormal,
    CᵀMC = I, and carries ``MC`` = M C (the projector I − C(MC)ᵀ) and ``MinvU`` = M⁻¹U (U's
    residual-space form, for the harvest); both are None without a preconditioner."""

    U: Any
    C: Any
    MC: Any = None
    MinvU: Any = None

    @property
    def preconditioned(self) -> bool:
        return self.MC is not None

    @property
    def basis(self) -> Any:
        """The space as ``from_basis`` takes it (and a carry holds it): U, or with a
        preconditioner its residual form M⁻¹U."""
        return self.U if self.MC is None else self.MinvU

    @property
    def dims(self) -> tuple[int, ...]:
        """Each sample's dimension (its non-zero columns); a host read."""
        return tuple(widths(self.promoted().C))

    @property
    def k(self) -> int:
        """The dimension of a single-system space (the largest one of a batch)."""
        return max(self.dims)

    def _map(self, f: Callable[[Any], Any]) -> RecycleSpace:
        return RecycleSpace(**{a.name: None if getattr(self, a.name) is None
                               else f(getattr(self, a.name)) for a in fields(self)})

    def validate(self, A: Callable[[Any], Any] | None = None) -> None:
        """``ValueError`` naming the defect: non-finite U or C, CᵢᵀCᵢ (CᵢᵀMCᵢ for a
        preconditioned space) not the identity on the non-zero columns (to √ε), or —
        given the batch operator A — C not A U on a probe combination (relative 1e-6: a
        space kept from another matrix)."""
        xp = array_namespace(self.C)
        space = self.promoted()
        U, C = space.U, space.C
        for name, X in (("U", U), ("C", C), ("MC", space.MC)):
            if X is not None and not bool(xp.all(xp.isfinite(X))):
                raise ValueError(f"recycle space {name} contains NaN or inf")
        live = xp.astype(xp.linalg.vector_norm(C, axis=1) > 0, C.dtype)
        gram = xp.matrix_transpose(C) @ (C if space.MC is None else space.MC)
        eye = xp.eye(C.shape[-1], dtype=C.dtype, device=device_of(C)) * live[:, None, :]
        error = float(xp.max(xp.abs(gram - eye))) if C.shape[-1] else 0.0
        if error > float(xp.finfo(C.dtype).eps) ** 0.5:
            inner = "CᵀC" if space.MC is None else "CᵀMC"
            raise ValueError(f"recycle space C is not orthonormal (max |{inner} − I| = "
                             f"{error:.1e}); build the space with RecycleSpace.from_basis")
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
        return self if self.U.ndim == 3 else self._map(lambda X: X[None, ...])

    def sample(self, i: int) -> RecycleSpace:
        return self._map(lambda X: X[i, ...])

    @classmethod
    def from_basis(cls, operator: Callable[[Any], Any], Y: Any, *, rank_tol: float = 1e-10,
                   M: Callable[[Any], Any] | None = None) -> RecycleSpace | None:
        """Build (U, C) from a basis ``Y`` ((B, n, k), or (n, k) with a 1-D operator) with one
        block application AY: a thin QR AY = QR and an SVD R = P Σ Qᵀ give C = Q P and
        U = Y Q Σ⁻¹ (A U = C in exact arithmetic); directions with σ_i ≤ rank_tol · σ_max
        become zero columns (a near-dependent Y gives a smaller space).  ``None`` when k = 0.
        With a preconditioner ``M``, ``Y`` is in residual form (as the harvest carries it):
        the space is spanned by MY, so M⁻¹U is known, and made M-orthonormal
        (``from_products``); k applications of A, 2k of M."""
        xp = array_namespace(Y)
        if Y.ndim not in (2, 3):
            raise ValueError(f"recycle basis must be (n, k) or (B, n, k), got {tuple(Y.shape)}")
        if Y.shape[-1] == 0:
            return None
        if not bool(xp.all(xp.isfinite(Y))):
            raise ValueError("recycle basis contains non-finite values (NaN or inf)")
        if M is None:
            return cls.from_products(Y, operator(Y), rank_tol=rank_tol)
        MY = M(Y)
        AMY = operator(MY)
        return cls.from_products(MY, AMY, rank_tol=rank_tol, MAY=M(AMY), MinvY=Y)

    @classmethod
    def from_products(cls, Y: Any, AY: Any, *, rank_tol: float = 1e-10, MAY: Any = None,
                      MinvY: Any = None) -> RecycleSpace:
        """As ``from_basis`` when A·Y is already known (no operator application).  Given
        MAY = M·AY and MinvY = M⁻¹Y the space is M-orthonormal: two passes of
        orthonormal coordinates T of the small Gram (AY)ᵀM(AY) (the second removes the
        first's rounding), C = AY·T, MC = MAY·T, U = Y·T, M⁻¹U = MinvY·T; directions with
        σ_i ≤ max(rank_tol, 1e-7) · σ_max (σ² the Gram's eigenvalues) become zero columns."""
        xp = array_namespace(Y, AY)
        if Y.shape != AY.shape:
            raise ValueError(f"Y {tuple(Y.shape)} and AY {tuple(AY.shape)} must have one shape")
        if MAY is not None:
            T = xp.flip(orthonormal_coordinates(xp.matrix_transpose(AY) @ MAY,
                                                max(rank_tol, 1e-7) ** 2)[0], axis=-1)
            S = orthonormal_coordinates(xp.matrix_transpose(AY @ T) @ (MAY @ T), 0.5)[0]
            T = T @ xp.flip(S, axis=-1)  # the kept directions first, zero columns last
            return cls(U=Y @ T, C=AY @ T, MC=MAY @ T, MinvU=MinvY @ T)
        Q, R = xp.linalg.qr(AY)
        P, sigma, Wt = xp.linalg.svd(R)
        smax = xp.max(sigma, axis=-1, keepdims=True)
        keep = (sigma > rank_tol * smax) & (smax > 0)
        scale = xp.where(keep, 1.0 / xp.where(keep, sigma, xp.ones_like(sigma)), 0.0)
        C = (Q @ P) * xp.astype(keep, Q.dtype)[..., None, :]
        rank = sigma.shape[-1]  # min(n, k): k > n leaves k − n directions out
        U = (Y @ xp.matrix_transpose(Wt[..., :rank, :])) * scale[..., None, :]
        return cls(U=U, C=C)
