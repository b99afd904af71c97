"""Recording the Lanczos process of a (recycled) MINRES solve.

During RMINRES the solver runs Lanczos on (I − CCᵀ)A restricted to range(C)^⊥:

    (I − CCᵀ) A V_m = V_{m+1} T̄_m,      B_m = Cᵀ A V_m,      Vᵀ C = 0.

A *harvester* receives the tridiagonal entries, the columns of B and the basis vectors as
they are produced; the recycling strategies (``framework.krylov.recycle``) build the next
recycle space from what it keeps.  The solver itself needs none of it (short recurrences).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from array_api_compat import array_namespace


@dataclass(frozen=True)
class LanczosHarvest:
    """Lanczos data of one solve.

    ``V`` holds the stored basis vectors v_1..v_s as columns (s ≤ cap, possibly s = m+1),
    ``alphas`` = (α_1..α_m), ``betas`` = (β_2..β_{m+1}) (the sub-diagonal of T̄_m),
    ``B`` = CᵀAV_m (k × m) when a recycle space was used, ``U``/``C`` that space.
    ``beta1`` = ‖r_0‖ after projection.
    """

    U: Any
    C: Any
    V: Any
    alphas: tuple[float, ...]
    betas: tuple[float, ...]
    B: Any
    beta1: float

    @property
    def steps(self) -> int:
        """Number of Lanczos steps m (columns of T̄_m)."""
        return len(self.alphas)

    @property
    def stored(self) -> int:
        """Number of stored basis vectors."""
        return 0 if self.V is None else int(self.V.shape[1])

    def tridiagonal(self, xp: Any, m: int | None = None, *, device: Any = None) -> Any:
        """T̄_m as an (m+1) × m array (``m`` defaults to all steps)."""
        m = self.steps if m is None else m
        rows = []
        for i in range(m + 1):
            row = [0.0] * m
            if i < m:
                row[i] = self.alphas[i]
            if 0 < i <= m:
                row[i - 1] = self.betas[i - 1]
            if i + 1 < m:
                row[i + 1] = self.betas[i]
            rows.append(row)
        dtype = None if self.V is None else self.V.dtype
        return xp.asarray(rows, dtype=dtype, device=device)


class Harvester(Protocol):
    """Receives the Lanczos process of one solve; ``finish`` returns what it kept."""

    def begin(self, U: Any, C: Any, v1: Any, beta1: float) -> None: ...

    def step(self, alpha: float, beta_next: float, b_col: Any, v_next: Any) -> None: ...

    def finish(self) -> Any: ...


class LanczosRecorder:
    """Keep the first ``max_vectors`` Lanczos vectors (all when ``None``) and every scalar.

    Memory grows as O(n · max_vectors); ``framework.krylov.recycle`` also offers a
    bounded harvester that compresses as it goes.
    """

    def __init__(self, max_vectors: int | None = None) -> None:
        if max_vectors is not None and max_vectors < 0:
            raise ValueError(f"max_vectors must be >= 0 or None, got {max_vectors}")
        self.max_vectors = max_vectors
        self._vectors: list[Any] = []
        self._alphas: list[float] = []
        self._betas: list[float] = []
        self._bcols: list[Any] = []
        self._U = self._C = None
        self._beta1 = 0.0

    def _keep(self, v: Any) -> None:
        if self.max_vectors is None or len(self._vectors) < self.max_vectors:
            self._vectors.append(v)

    def begin(self, U: Any, C: Any, v1: Any, beta1: float) -> None:
        self._U, self._C, self._beta1 = U, C, beta1
        self._keep(v1)

    def step(self, alpha: float, beta_next: float, b_col: Any, v_next: Any) -> None:
        self._alphas.append(alpha)
        self._betas.append(beta_next)
        if b_col is not None:
            self._bcols.append(b_col)
        if beta_next > 0.0:
            self._keep(v_next)

    def finish(self) -> LanczosHarvest:
        V = None
        if self._vectors:
            xp = array_namespace(self._vectors[0])
            V = xp.stack(self._vectors, axis=1)
        B = None
        if self._bcols:
            xp = array_namespace(self._bcols[0])
            B = xp.stack(self._bcols, axis=1)
        return LanczosHarvest(
            U=self._U,
            C=self._C,
            V=V,
            alphas=tuple(self._alphas),
            betas=tuple(self._betas),
            B=B,
            beta1=self._beta1,
        )
