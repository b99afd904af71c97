"""Recycling for the batched solver: harvest, per-sample selection, batched C = H U.

The harvest stores the Lanczos vectors of all samples as (B, n) rows; sample i's basis is
W_i = [U_i, V_i[:, :m_i]] (m_i its own iteration count, padding columns of U_i masked),
HW comes from the Lanczos relation (no operator application) and JᵀW (RGen) is one
batched block application.  Selection runs for all samples at once on stacked (B, D, D)
matrices (``framework.krylov.batched_selection``), with no host transfer; the recycle
space for the next systems is then built for all samples together: C = H U by one
batched block application of k vectors and a stacked QR/SVD.  Samples with fewer than k
vectors are padded with zero columns, which the batched solver ignores.  Inner selection;
``max_vectors`` bounds the stored Lanczos vectors by cycles as in the unbatched path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from array_api_compat import array_namespace

from framework.krylov.batched import BatchedRecycleSpace
from framework.krylov.batched_selection import selection_coefficients
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
    """Batched harvester for ``rminres_batched(harvest=...)`` (inner selection).

    With ``max_vectors = s`` it compresses [Z, V_s] to k vectors every s steps for all
    samples at once (HZ and JᵀZ carried as combinations), so memory is O(Bn(k + s)).
    """

    def __init__(self, config: RecycleConfig, jac_t: Operator | None = None) -> None:
        if config.needs_jacobian and jac_t is None:
            raise ValueError(f"strategy {config.strategy!r} needs a jac_t operator")
        if config.selection != "inner":
            raise ValueError("the batched path supports inner selection only")
        self.config = config
        self.jac_t = jac_t if config.needs_jacobian else None
        self.cycles = 0
        self._begun = False

    def begin(self, U: Any, C: Any, v1: Any, beta1: Any, live: Any) -> None:
        xp = array_namespace(v1)
        self._begun = True
        self.C = C
        self.Z, self.HZ, self.JZ = U, C, None
        self.zvalid = None if U is None else xp.linalg.vector_norm(U, axis=1) > 0
        self.vectors = [v1]
        self.v_prev = None
        self.beta_prev = xp.zeros_like(beta1)
        self._reset()

    def _reset(self) -> None:
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
        cap = self.config.max_vectors
        if cap is not None and len(self.alphas) >= cap:
            self._compress(final=False)

    def _lanczos_products(self) -> tuple[Any, Any]:
        """V (B, n, m) of the current block and HV from the Lanczos relation."""
        xp = array_namespace(self.vectors[0])
        m = len(self.alphas)
        Vall = xp.stack(self.vectors[: m + 1], axis=2)  # (B, n, m + 1)
        V = Vall[:, :, :m]
        alphas = xp.stack(self.alphas, axis=1)  # (B, m)
        betas = xp.stack(self.betas, axis=1)  # β_{j+1}
        first = xp.zeros_like(V[:, :, :1]) if self.v_prev is None else self.v_prev[:, :, None]
        down = xp.concat([first, V[:, :, : m - 1]], axis=2) if m > 1 else first
        lower = xp.concat([self.beta_prev[:, None], betas[:, : m - 1]], axis=1)
        HV = V * alphas[:, None, :] + down * lower[:, None, :] + Vall[:, :, 1:] * betas[:, None, :]
        if self.bcols:
            HV = HV + self.C @ xp.stack(self.bcols, axis=2)
        return V, HV

    def _compress(self, *, final: bool) -> None:
        xp = array_namespace(self.vectors[0])
        cfg = self.config
        V, HV = self._lanczos_products()
        vvalid = xp.stack(self.updates, axis=1)  # each sample's own iterations
        blocks = [b for b in (self.Z, V) if b is not None]
        W, HW = xp.concat(blocks, axis=2), xp.concat([b for b in (self.HZ, HV) if b is not None],
                                                      axis=2)
        valid = vvalid if self.Z is None else xp.concat([self.zvalid, vvalid], axis=1)
        JW = None
        if self.jac_t is not None:
            if self.Z is not None and self.JZ is None:
                self.JZ = self.jac_t(self.Z)
            JV = self.jac_t(V * xp.astype(vvalid, V.dtype)[:, None, :])
            JW = JV if self.JZ is None else xp.concat([self.JZ, JV], axis=2)
        coef = selection_coefficients(W, HW, JW, valid, cfg.strategy, cfg.k, cfg.which)
        Wm = W * xp.astype(valid, W.dtype)[:, None, :]
        self.Z = Wm @ coef
        self.zvalid = xp.linalg.vector_norm(self.Z, axis=1) > 0
        if not final:
            self.HZ = (HW * xp.astype(valid, W.dtype)[:, None, :]) @ coef
            self.JZ = None if JW is None else JW @ coef
            m = len(self.alphas)
            self.v_prev = self.vectors[m - 1]
            self.beta_prev = self.betas[m - 1]
            self.vectors = self.vectors[m:]
            self._reset()
        self.cycles += 1

    def finish(self) -> BatchedCarry | None:
        if not self._begun:
            return None
        if self.alphas:
            self._compress(final=True)
        return None if self.Z is None else BatchedCarry(self.Z)


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
