"""Recording the Lanczos process of a (recycled) MINRES solve, per sample.

RMINRES runs Lanczos on (I − CCᵀ)A: (I − CCᵀ)AV_m = V_{m+1}T̄_m, B_m = CᵀAV_m, VᵀC = 0.
A *harvester* (``rminres(harvest=...)``) gets ``begin(space, v1, u1, beta1)``, then per
iteration ``step(alpha, beta_next, b_col, v_next, u_next, update)`` for the whole batch
(α, β_{k+1} and the update mask (B,), the column of B (B, k), the basis vectors (B, n));
``finish()`` returns what it kept.  With a preconditioner M it also receives each basis
vector's residual form u = M⁻¹v ((I − C(MC)ᵀ)AV_m = U_{m+1}T̄_m, B_m = (MC)ᵀAV_m); without
one u is None.  The recorder keeps v.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from array_api_compat import array_namespace

from backends.host import to_host


@dataclass(frozen=True)
class LanczosHarvest:
    """One sample's Lanczos data: stored basis vectors v_1..v_s as columns of ``V`` (s ≤ cap,
    possibly s = m+1), ``alphas`` = (α_1..α_m), ``betas`` = (β_2..β_{m+1}) (T̄_m's
    sub-diagonal), ``B`` = CᵀAV_m (k × m), the space's ``U``/``C``, and the projected
    ``beta1`` = ‖r_0‖."""

    U: Any
    C: Any
    V: Any
    alphas: tuple[float, ...]
    betas: tuple[float, ...]
    B: Any
    beta1: float

    @property
    def steps(self) -> int:
        """Lanczos steps m (columns of T̄_m)."""
        return len(self.alphas)

    @property
    def stored(self) -> int:
        return 0 if self.V is None else int(self.V.shape[1])

    def tridiagonal(self, xp: Any, *, device: Any = None) -> Any:
        """T̄_m as an (m+1) × m array."""
        m = self.steps
        rows = [[0.0] * m for _ in range(m + 1)]
        for j in range(m):
            rows[j][j] = self.alphas[j]
            rows[j + 1][j] = self.betas[j]
            if j + 1 < m:
                rows[j][j + 1] = self.betas[j]
        dtype = None if self.V is None else self.V.dtype
        return xp.asarray(rows, dtype=dtype, device=device)


class LanczosRecorder:
    """Keep each sample's first ``max_vectors`` Lanczos vectors (all when ``None``) and
    every scalar of its own iterations (memory O(Bn · max_vectors)); ``finish`` returns
    the recorder itself, ``sample(i)`` is sample i's ``LanczosHarvest``."""

    def __init__(self, max_vectors: int | None = None) -> None:
        if max_vectors is not None and max_vectors < 0:
            raise ValueError(f"max_vectors must be >= 0 or None, got {max_vectors}")
        self.max_vectors = max_vectors

    def begin(self, space: Any, v1: Any, u1: Any, beta1: Any) -> None:
        self._U, self._C = (None, None) if space is None else (space.U, space.C)
        self._v1, self._beta1 = v1, beta1
        self._steps: list[tuple[Any, ...]] = []

    def step(self, alpha: Any, beta_next: Any, b_col: Any, v_next: Any, u_next: Any,
             update: Any) -> None:
        full = self.max_vectors is not None and len(self._steps) + 1 >= self.max_vectors
        self._steps.append((alpha, beta_next, b_col, None if full else v_next, update))

    def sample(self, i: int) -> LanczosHarvest:
        xp = array_namespace(self._v1)
        vectors, alphas, betas, bcols = [self._v1[i, :]], [], [], []
        for alpha, beta_next, b_col, v_next, update in self._steps:
            if not bool(to_host(update[i])):
                break
            alphas.append(float(to_host(alpha[i])))
            betas.append(float(to_host(beta_next[i])))
            if b_col is not None:
                bcols.append(b_col[i, :])
            if betas[-1] > 0.0 and v_next is not None:
                vectors.append(v_next[i, :])
        vectors = vectors[: self.max_vectors]  # (all for None)
        return LanczosHarvest(
            U=None if self._U is None else self._U[i, ...],
            C=None if self._C is None else self._C[i, ...],
            V=xp.stack(vectors, axis=1) if vectors else None,
            alphas=tuple(alphas), betas=tuple(betas),
            B=xp.stack(bcols, axis=1) if bcols else None,
            beta1=float(to_host(self._beta1[i])),
        )

    def finish(self) -> LanczosRecorder:
        return copy.copy(self)  # a snapshot: the next ``begin`` starts new lists
