"""The unbiased predictive risk estimate (UPRE) of a lower-level solution, per sample: a
way to judge a regularisation strength without the truth.

For f_i(x) = ½‖A_i x − y_i‖² + R_θ(x) (+ ε‖x‖²/2) and noise y_i − A_i x_true ~ N(0, σ_i² I)
in m_i = n data, the minimiser x*(y) has ∂x*/∂y = H⁻¹Aᵀ (H = ∇²ₓₓf at x*, by the implicit
function theorem), and Stein's lemma gives

    E‖A(x* − x_true)‖² = E[‖Ax* − y‖² + 2σ² tr(A H⁻¹ Aᵀ) − mσ²].

The trace is estimated by Hutchinson's zᵀ A H⁻¹ Aᵀ z over the caller's probes z (e.g.
Rademacher rows; reuse them across strengths so that the estimates' differences are less
noisy than the estimates), one batched MINRES solve H w = Aᵀz per probe.  The predictive
risk weighs errors by A, so for a blur it hardly sees what the blur removes; the README
(issue 15, "Where the missing 0.09 dB is") measures how far it picks each image's best
strength.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import array_api_compat

from framework.krylov.minres import rminres


@dataclass(frozen=True)
class PredictiveRisk:
    """Per sample (arrays (B,)): ``risk`` the UPRE of ‖A(x − x_true)‖², ``residual``
    ‖Ax − y‖², ``trace`` the probes' mean of zᵀ A H⁻¹ Aᵀ z and ``trace_error`` its standard
    error (0 for one probe); ``iterations`` each probe's MINRES iterations per sample;
    ``converged`` whether every solve met ``rtol``."""

    risk: Any
    residual: Any
    trace: Any
    trace_error: Any
    iterations: tuple[tuple[int, ...], ...]
    converged: bool


def predictive_risk(problem: Any, X: Any, theta: Any, noise_variance: Any, probes: Any, *,
                    rtol: float = 1e-4, maxiter: int | None = None) -> PredictiveRisk:
    """The UPRE of each of ``problem``'s samples (an imaging problem of B samples, with
    ``operator``, ``Y`` and ``linearize``) at its lower-level solutions ``X`` (B, n) for
    ``theta``, with noise variances ``noise_variance`` (a number or (B,)) and Hutchinson
    ``probes`` (k, B, n); the Hessian solves to ``rtol``."""
    xp = array_api_compat.array_namespace(X, probes)
    if probes.ndim != 3 or tuple(probes.shape[1:]) != tuple(X.shape):
        raise ValueError(f"probes must have shape (k, {X.shape[0]}, {X.shape[1]}); "
                         f"got {tuple(probes.shape)}")
    operator, n = problem.operator, X.shape[1]
    residual = xp.sum((operator.apply(X) - problem.Y) ** 2, axis=1)
    hessian = problem.linearize(X, theta).hvp
    quads, iterations, converged = [], [], True
    for k in range(probes.shape[0]):
        Z = probes[k, ...]
        solved = rminres(hessian, operator.adjoint(Z), rtol=rtol, maxiter=maxiter)
        converged = converged and all(solved.converged)
        iterations.append(tuple(int(i) for i in solved.iterations))
        quads.append(xp.sum(Z * operator.apply(solved.x), axis=1))
    Q = xp.stack(quads)  # (k, B)
    trace = xp.mean(Q, axis=0)
    count = Q.shape[0]
    spread = xp.sum((Q - trace) ** 2, axis=0) / max(count - 1, 1)
    trace_error = xp.sqrt(spread / count)
    risk = residual + 2.0 * noise_variance * trace - n * noise_variance
    return PredictiveRisk(risk, residual, trace, trace_error, tuple(iterations), converged)
