"""Per-sample L-BFGS memories of a batch and the two-loop recursion on them.

Slot a holds the a-th newest pair (s, y, ρ = 1/sᵀy) of every sample as rows of (B, n)
arrays and a (B,) array; ρ = 0 marks an empty slot, which the recursion passes through
unchanged.  The recursion runs over as many slots as the fullest memory among the
samples still iterating, so a sample's arithmetic is the same alone as in a batch, and a
single sample does exactly the work (and the arithmetic) of a memory kept as a list.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from framework.optim.rows import RowEvaluator, rowdot


class LBFGSMemory:
    """At most ``size`` pairs per sample, newest first; ``count[i]`` pairs of sample i.
    A sample with pairs has ρ ≠ 0 in its newest slot."""

    def __init__(self, ev: RowEvaluator, X: Any, size: int) -> None:
        self.ev, self.xp = ev, ev.xp
        zeros = self.xp.zeros_like(X)
        self.S = [zeros] * size
        self.Y = [zeros] * size
        self.rho = [self.xp.zeros((X.shape[0],), dtype=X.dtype, device=ev.device)] * size
        self.count = np.zeros(X.shape[0], dtype=np.int64)

    def push(self, mask: np.ndarray, s: Any, y: Any, rho: Any, stopped: np.ndarray) -> None:
        """Prepend (s_i, y_i, ρ_i) for the samples in the host mask ``mask``.

        ``stopped`` marks samples whose memory is never read again: when every other
        sample pushes, the slots rotate without copies and the stopped rows get an empty
        memory (newest slot ρ = 0, count 0) instead of keeping theirs.
        """
        xp, select, size = self.xp, self.ev.select, len(self.S)
        if np.count_nonzero(mask | stopped) == len(mask):
            self.S = [s, *self.S[:-1]]
            self.Y = [y, *self.Y[:-1]]
            self.rho = [select(mask, rho, xp.zeros_like(rho)), *self.rho[:-1]]
            self.count = np.where(mask, np.minimum(self.count + 1, size), 0)
            return
        # slots at or beyond a sample's count are empty: shift only the used ones
        used = min(int(self.count[mask].max()) + 1, size)
        for slots, new in ((self.S, s), (self.Y, y), (self.rho, rho)):
            for a in range(used - 1, 0, -1):
                slots[a] = select(mask, slots[a - 1], slots[a])
            slots[0] = select(mask, new, slots[0])
        self.count = np.where(mask, np.minimum(self.count + 1, size), self.count)

    def forget(self, mask: np.ndarray) -> None:
        """Empty the memories of the samples in ``mask``."""
        if not np.count_nonzero(mask):
            return
        used = int(self.count.max())
        zero = self.xp.zeros_like(self.rho[0])
        self.rho[:used] = [self.ev.select(mask, zero, r) for r in self.rho[:used]]
        self.count = np.where(mask, 0, self.count)

    def direction(self, G: Any, iterating: np.ndarray) -> Any:
        """−H g for every row by the two-loop recursion, H₀ = (sᵀy / yᵀy) I from the
        sample's newest pair (the identity without pairs); rows of samples not
        ``iterating`` are not meaningful."""
        xp = self.xp
        used = int(self.count[iterating].max()) if np.count_nonzero(iterating) else 0
        q = G
        alphas = []
        for s, y, rho in zip(self.S[:used], self.Y[:used], self.rho[:used], strict=True):
            a = rho * rowdot(xp, s, q)
            alphas.append(a)
            q = q - a[:, None] * y
        if used:
            rho0, yy = self.rho[0], rowdot(xp, self.Y[0], self.Y[0])
            if np.count_nonzero(self.count) < len(self.count):  # some rows have no pairs
                empty = rho0 == 0
                rho0 = xp.where(empty, xp.ones_like(rho0), rho0)
                yy = xp.where(empty, xp.ones_like(yy), yy)
            q = (1.0 / (rho0 * yy))[:, None] * q
        for s, y, rho, a in zip(reversed(self.S[:used]), reversed(self.Y[:used]),
                                reversed(self.rho[:used]), reversed(alphas), strict=True):
            b = rho * rowdot(xp, y, q)
            q = q + (a - b)[:, None] * s
        return -q
