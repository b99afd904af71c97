"""Recycling for the batched solver: harvest, per-sample selection, batched C = H U.

The harvest stores the Lanczos vectors of all samples as (B, n) rows; sample i's basis is
W_i = [U_i, V_i[:, :m_i]] (m_i its own iteration count, padding columns of U_i masked),
HW comes from the Lanczos relation (no operator application) and JᵀW (RGen) is one
batched block application.  Selection runs for all samples at once on stacked (B, D, D)
matrices (``framework.krylov.batched_selection``), with no host transfer; the recycle
space for the next systems is then built for all samples together: C = H U by one
batched block application of k vectors and a stacked QR/SVD.  Samples with fewer than k
vectors are padded with zero columns, which the batched solver ignores.  Inner selection
with unbounded storage only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

from framework.krylov.batched import BatchedRecycleSpace
from framework.krylov.batched_selection import select_batched
from framework.krylov.recycle import ORACLES, RecycleConfig

Operator = Callable[[Any], Any]


@dataclass(frozen=True)
class BatchedCarry:
    """Chosen recycle vectors per sample, (B, n, k) with zero padding columns."""

    basis: Any


def space_from_products(Y: Any, AY: Any, *, rank_tol: float = 1e-10) -> BatchedRecycleSpace:
    """Batched ``RecycleSpace.from_products``: stacked QR of AY, SVD of R; dropped
    (near-dependent or zero) directions become zero columns of U and C."""
    xp = array_namespace(Y, AY)
    Q, R = xp.linalg.qr(AY)
    P, sigma, Wt = xp.linalg.svd(R)
    smax = xp.max(sigma, axis=1, keepdims=True)
    keep = (sigma > rank_tol * smax) & (smax > 0)
    scale = xp.where(keep, 1.0 / xp.where(keep, sigma, xp.ones_like(sigma)), 0.0)
    C = (Q @ P) * xp.astype(keep, Q.dtype)[:, None, :]
    U = (Y @ xp.matrix_transpose(Wt)) * scale[:, None, :]
    return BatchedRecycleSpace(U=U, C=C)


class BatchedRecycleHarvester:
    """Batched harvester for ``rminres_batched(harvest=...)`` (inner selection)."""

    def __init__(self, config: RecycleConfig, jac_t: Operator | None = None) -> None:
        if config.needs_jacobian and jac_t is None:
            raise ValueError(f"strategy {config.strategy!r} needs a jac_t operator")
        if config.selection != "inner" or config.max_vectors is not None:
            raise ValueError("the batched path supports inner selection with unbounded storage")
        self.config = config
        self.jac_t = jac_t if config.needs_jacobian else None
        self._begun = False

    def begin(self, U: Any, C: Any, v1: Any, beta1: Any, live: Any) -> None:
        self._begun = True
        self.U, self.C = U, C
        self.vectors = [v1]
        self.alphas: list[Any] = []
        self.betas: list[Any] = []
        self.bcols: list[Any] = []
        self.updates: list[Any] = []

    def step(self, alpha: Any, beta_next: Any, b_col: Any, v_next: Any, update: Any) -> None:
        self.alphas.append(alpha)
        self.betas.append(beta_next)
        self.vectors.append(v_next)
        self.updates.append(update)
        if b_col is not None:
            self.bcols.append(b_col)

    def _lanczos_products(self) -> tuple[Any, Any]:
        """V (B, n, M) and HV from the Lanczos relation, M = steps taken by the batch."""
        xp = array_namespace(self.vectors[0])
        M = len(self.alphas)
        Vall = xp.stack(self.vectors, axis=2)  # (B, n, M + 1)
        V = Vall[:, :, :M]
        alphas = xp.stack(self.alphas, axis=1)  # (B, M)
        betas = xp.stack(self.betas, axis=1)  # β_{j+1}
        zero = xp.zeros_like(V[:, :, :1])
        down = xp.concat([zero, V[:, :, : M - 1]], axis=2) if M > 1 else zero
        lower = xp.concat([xp.zeros_like(betas[:, :1]), betas[:, : M - 1]], axis=1)
        HV = V * alphas[:, None, :] + down * lower[:, None, :] + Vall[:, :, 1:] * betas[:, None, :]
        if self.bcols:
            HV = HV + self.C @ xp.stack(self.bcols, axis=2)
        return V, HV

    def finish(self) -> BatchedCarry | None:
        if not self._begun:
            return None
        xp = array_namespace(self.vectors[0])
        cfg = self.config
        blocks, hblocks, masks = [], [], []
        if self.U is not None:
            blocks.append(self.U)
            hblocks.append(self.C)
            masks.append(xp.linalg.vector_norm(self.U, axis=1) > 0)  # padding columns
        if self.alphas:
            V, HV = self._lanczos_products()
            steps = xp.sum(xp.astype(xp.stack(self.updates, axis=1), xp.int64), axis=1)
            index = xp.arange(len(self.alphas), device=device_of(V))
            blocks.append(V)
            hblocks.append(HV)
            masks.append(index[None, :] < steps[:, None])  # each sample's own iterations
        if not blocks:
            return None
        W, HW = xp.concat(blocks, axis=2), xp.concat(hblocks, axis=2)
        valid = xp.concat(masks, axis=1)
        JW = self.jac_t(W * xp.astype(valid, W.dtype)[:, None, :]) if self.jac_t else None
        return BatchedCarry(select_batched(W, HW, JW, valid, cfg.strategy, cfg.k, cfg.which))


class BatchedRecycler:
    """Batched counterpart of ``Recycler`` (inner selection)."""

    def __init__(self, config: RecycleConfig) -> None:
        if config.strategy in ORACLES:
            raise ValueError("the dense oracles are not available in the batched path")
        self.config = config

    def harvester(self, jac_t: Operator | None = None) -> BatchedRecycleHarvester | None:
        if not self.config.enabled:
            return None
        return BatchedRecycleHarvester(self.config, jac_t)

    def prepare(self, carry: BatchedCarry | None, H: Operator) -> BatchedRecycleSpace | None:
        """C = H U for all samples by one batched block application (B·k applications)."""
        if not self.config.enabled or carry is None:
            return None
        return space_from_products(carry.basis, H(carry.basis), rank_tol=self.config.rank_tol)
