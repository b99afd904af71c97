"""A per-image regularisation strength chosen without the truth.

Every log10 weight of θ (the regulariser's ``log_weight_mask_host``) is moved by the same s
from a grid, which scales R_θ by 10^s; each image's lower-level problem is solved at every
s, and its predictive risk (``framework.bilevel.risk``: ‖Ax − y‖² + 2σ² tr(A H⁻¹ Aᵀ) − mσ²,
the same Hutchinson probes at every s) is recorded.  Each image then takes the s of least

    ‖Ax_s − y‖² + c · 2σ² tr(A H⁻¹ Aᵀ),

c = 1 being UPRE itself; c > 1 leans toward more regularisation, which the image error
(rather than the error after A that UPRE estimates) can prefer.  Choose c on training
images (``factor_by_psnr``), never on the images it is scored on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from backends.host import to_host
from framework.bilevel.risk import predictive_risk


@dataclass(frozen=True)
class StrengthRisks:
    """Per grid point and image (arrays (S, B), host): ``residual`` ‖Ax_s − y‖²,
    ``divergence`` 2σ² tr(A H⁻¹ Aᵀ) (probe estimate) and ``divergence_error`` its standard
    error over the probes; ``solutions`` x_s (S, B, n), host; ``converged`` whether every
    Hessian solve met its tolerance."""

    grid: tuple[float, ...]
    residual: np.ndarray
    divergence: np.ndarray
    divergence_error: np.ndarray
    solutions: np.ndarray
    converged: bool

    def pick(self, factor: float = 1.0) -> np.ndarray:
        """Each image's grid index of least ‖Ax_s − y‖² + factor · divergence (B,)."""
        return np.argmin(self.residual + factor * self.divergence, axis=0)

    def chosen(self, factor: float = 1.0) -> np.ndarray:
        """Each image's solution at its picked s (B, n)."""
        pick = self.pick(factor)
        return self.solutions[pick, np.arange(pick.size)]


def strength_risks(engine: Any, batch: Any, theta: Any, grid: Sequence[float],
                   noise_variance: Any, probes: Any, *, rtol: float = 1e-4,
                   callback: Callable[[int], None] | None = None) -> StrengthRisks:
    """Solve ``engine``'s images (``batch``: the same images as one imaging problem) at θ
    with every log10 weight moved by each s of ``grid``, and estimate each one's predictive
    risk with ``noise_variance`` (B,) and Hutchinson ``probes`` (k, B, n); the Hessian
    solves to ``rtol``; ``callback(i)`` after grid point i."""
    xp = batch.xp
    mask = np.asarray(batch.regularizer.log_weight_mask_host(), dtype=np.float64)
    shift = xp.asarray(mask.reshape(tuple(theta.shape)), dtype=theta.dtype,
                       device=batch.device)
    residual, divergence, error, solutions, converged = [], [], [], [], True
    variance = to_host(noise_variance)
    for i, s in enumerate(grid):
        theta_s = theta + float(s) * shift
        X = engine.lower_solutions(theta_s)
        est = predictive_risk(batch, X, theta_s, noise_variance, probes, rtol=rtol)
        converged = converged and est.converged
        residual.append(to_host(est.residual))
        divergence.append(2 * variance * to_host(est.trace))
        error.append(2 * variance * to_host(est.trace_error))
        solutions.append(to_host(X))
        if callback is not None:
            callback(i)
    return StrengthRisks(tuple(float(s) for s in grid), np.stack(residual),
                         np.stack(divergence), np.stack(error), np.stack(solutions), converged)


def factor_by_psnr(risks: StrengthRisks, factors: Sequence[float],
                   psnr: Callable[[np.ndarray], np.ndarray]) -> tuple[float, np.ndarray]:
    """The factor of ``factors`` whose picks have the best mean ``psnr`` (solutions (B, n)
    → PSNRs (B,)) on these (training) images, and every factor's mean PSNR."""
    means = np.array([float(np.mean(psnr(risks.chosen(f)))) for f in factors])
    return float(factors[int(np.argmax(means))]), means
