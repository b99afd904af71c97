"""The recycle space carried from one linear system to the next."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from array_api_compat import array_namespace


@dataclass(frozen=True)
class RecycleSpace:
    """U (n × k) and C = A U (n × k) with CᵀC = I for the operator A it was built for."""

    U: Any
    C: Any

    @property
    def k(self) -> int:
        return int(self.U.shape[1])

    @classmethod
    def from_basis(
        cls,
        operator: Callable[[Any], Any],
        Y: Any,
        *,
        rank_tol: float = 1e-10,
    ) -> RecycleSpace | None:
        """Build (U, C) from a basis ``Y`` (n × k) for ``operator``.

        One block application gives AY; a thin QR AY = QR and an SVD of the small R
        (R = P Σ Qᵀ) give C = Q P (orthonormal) and U = Y Q Σ⁻¹, so A U = C exactly in
        exact arithmetic.  Directions with σ_i ≤ rank_tol · σ_max are dropped (rank
        revealing), so a near-dependent Y yields a smaller space instead of a blow-up.
        Returns ``None`` when nothing survives or k = 0.
        """
        xp = array_namespace(Y)
        if Y.ndim != 2:
            raise ValueError(f"recycle basis must be 2-D (n × k), got shape {tuple(Y.shape)}")
        if Y.shape[1] == 0:
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
        if Y.shape[1] == 0:
            return None
        Q, R = xp.linalg.qr(AY)
        P, sigma, Wt = xp.linalg.svd(R)
        smax = float(sigma[0])
        if not smax > 0.0:
            return None
        keep = int(xp.sum(xp.astype(sigma > rank_tol * smax, xp.int64)))
        C = Q @ P[:, :keep]
        U = (Y @ xp.matrix_transpose(Wt[:keep, :])) / sigma[:keep]
        return cls(U=U, C=C)
