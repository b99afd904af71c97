"""A per-image regularisation strength chosen by the predictive risk
(``framework.bilevel.strength``): the log10-weight masks against the scaling they promise,
the noise variance known from the data, and the risks and picks against dense closed forms
of a linear estimator."""

from __future__ import annotations

import numpy as np
import pytest

from framework.bilevel.engine import BilevelEngine, EngineConfig
from framework.bilevel.strength import StrengthRisks, factor_by_psnr, strength_risks
from problems.composite import SumRegularizer
from problems.foe import FieldsOfExperts, gaussian_filters, initial_theta
from problems.imaging import ImagingProblem
from problems.operators import GaussianBlur, add_relative_noise, relative_noise_variance
from problems.tv import TotalVariation

SHAPE = (4, 4)
N = 16


def dense(apply, n: int = N) -> np.ndarray:
    return np.stack([apply(e) for e in np.eye(n)], axis=1)


def regularizers():
    foe = FieldsOfExperts(SHAPE, 3, 3, expert="student_t", gamma=0.3)
    two = FieldsOfExperts(SHAPE, 3, 2, expert="student_t", gamma=0.3, widths=(0.5, 2.0))
    return {"tv": TotalVariation(SHAPE, gamma=0.1), "foe": foe, "foe_two_widths": two,
            "tv_foe": SumRegularizer([TotalVariation(SHAPE, gamma=0.1), foe])}


@pytest.mark.parametrize("name", ["tv", "foe", "foe_two_widths", "tv_foe"])
def test_log_weight_mask_scales_the_regulariser(backend, name):
    """θ + s·mask is 10^s R_θ: value and gradient, at random θ and x (s = ±0.7)."""
    reg = regularizers()[name]
    rng = np.random.default_rng(3)
    theta = rng.standard_normal(reg.theta_shape).reshape(-1) * 0.5
    mask = reg.log_weight_mask_host()
    assert mask.shape == theta.shape
    assert set(np.unique(mask)) == ({1.0} if name == "tv" else {0.0, 1.0})
    X = backend.asarray(rng.standard_normal((2, N)))
    shaped = tuple(reg.theta_shape)
    at = {s: reg.rows_value_and_grad(backend.xp, X,
                                     backend.asarray((theta + s * mask).reshape(shaped)))
          for s in (0.0, -0.7, 0.7)}
    for s in (-0.7, 0.7):
        for k in range(2):  # value, gradient
            np.testing.assert_allclose(backend.to_numpy(at[s][k]),
                                       10**s * backend.to_numpy(at[0.0][k]), rtol=1e-12)


def test_relative_noise_variance_against_the_noise_drawn(backend):
    """σ² = δ²/(1 + δ²)·‖y‖²/m against the true δ²‖Ax‖²/m of each row: ‖y‖² = (1 + δ²)‖Ax‖²
    + 2eᵀAx, and eᵀAx/(‖e‖‖Ax‖) is of order 1/√m, so with m = 4096 they agree to 2δ·4/√m."""
    rng = np.random.default_rng(5)
    clean = (1.0 + rng.random((3, 4096))) * np.array([[1.0], [0.1], [3.0]])
    delta, m = 0.2, 4096
    Y = np.concatenate([backend.to_numpy(add_relative_noise(backend.asarray(clean[i:i + 1]),
                                                            delta, 11 + i)) for i in range(3)])
    truth = delta**2 * np.sum(clean**2, axis=1) / m
    got = backend.to_numpy(relative_noise_variance(backend.asarray(Y), delta))
    assert got.shape == (3,)
    np.testing.assert_allclose(got, truth, rtol=2 * delta * 4 / np.sqrt(m))


def quadratic_setup(backend, samples: int = 2, sigma: float = 0.05):
    rng = np.random.default_rng(2)
    reg = FieldsOfExperts(SHAPE, 3, 3, expert="l2", gamma=0.3)
    blur = GaussianBlur(SHAPE, 0.8)
    x_true = 0.5 + 0.3 * np.sin(np.arange(N) + np.arange(samples)[:, None])
    A = dense(lambda v: backend.to_numpy(blur.apply(backend.asarray(v))))
    Y = x_true @ A.T + sigma * rng.standard_normal((samples, N))
    problems = [ImagingProblem(backend.asarray(x_true[i]), backend.asarray(Y[i]), blur, reg)
                for i in range(samples)]
    theta = initial_theta(gaussian_filters(3, 3, seed=2), np.array([-0.5, 0.0, -1.0]))
    return problems, theta, A, Y


def test_risks_and_picks_against_the_dense_linear_estimator(backend):
    """Quadratic expert: x_s = H_s⁻¹Aᵀy with H_s = AᵀA + εI + 10^s·(H_0 − AᵀA − εI) (the
    mask scales the regulariser's Hessian by 10^s).  Probes √n·e_j make the trace exact, so the
    divergence must be 2σ² tr(A H_s⁻¹ Aᵀ) to the Hessian solves' 10·rtol·κ(H_s); the
    solutions match to the lower level's gtol·‖H_s⁻¹‖; each pick is the dense risk's."""
    problems, theta, A, Y = quadratic_setup(backend)
    batch = ImagingProblem.concat(problems)
    variance = np.array([0.002, 0.004])
    probes = np.sqrt(N) * np.broadcast_to(np.eye(N)[:, None, :], (N, 2, N))
    grid = (-1.0, 0.0, 1.0)
    gtol, rtol = 1e-11, 1e-10
    engine = BilevelEngine(problems, EngineConfig(lower_gtol=gtol, lower_maxiter=2000))
    risks = strength_risks(engine, batch, backend.asarray(theta), grid,
                           backend.asarray(variance), backend.asarray(probes), rtol=rtol)
    assert risks.converged and risks.grid == grid
    assert risks.residual.shape == risks.divergence.shape == (3, 2)
    assert risks.solutions.shape == (3, 2, N)
    H0 = dense(lambda v: backend.to_numpy(
        problems[0].linearize(backend.asarray(np.zeros(N)), backend.asarray(theta)).hvp(
            backend.asarray(v))))
    fixed = A.T @ A + problems[0].epsilon * np.eye(N)
    R0 = H0 - fixed
    dense_risk = np.empty((3, 2))
    for i, s in enumerate(grid):
        H = fixed + 10**s * R0
        kappa, inverse_norm = np.linalg.cond(H), 1 / np.linalg.eigvalsh(H)[0]
        S = A @ np.linalg.solve(H, A.T)
        X = np.linalg.solve(H, A.T @ Y.T).T
        np.testing.assert_allclose(risks.solutions[i], X, atol=10 * gtol * inverse_norm)
        divergence = 2 * variance * np.trace(S)
        np.testing.assert_allclose(risks.divergence[i], divergence, rtol=10 * rtol * kappa)
        quads = N * np.diag(S)  # probe j's zᵀSz; the error is their standard error
        error = 2 * variance * np.std(quads, ddof=1) / np.sqrt(N)
        np.testing.assert_allclose(risks.divergence_error[i], error,
                                   atol=10 * rtol * kappa * 2 * variance.max() * quads.max())
        residual = np.sum((X @ A.T - Y) ** 2, axis=1)
        np.testing.assert_allclose(risks.residual[i], residual, rtol=1e-8)
        dense_risk[i] = residual + divergence
    assert list(risks.pick()) == list(np.argmin(dense_risk, axis=0))
    # a larger factor never picks a weaker strength (the divergence falls as s grows)
    assert np.all(np.diff(risks.divergence, axis=0) < 0)
    assert np.all(risks.pick(3.0) >= risks.pick(1.0))
    chosen = risks.chosen(3.0)
    for j, k in enumerate(risks.pick(3.0)):
        np.testing.assert_array_equal(chosen[j], risks.solutions[k, j])


def test_factor_by_psnr_takes_the_factor_of_the_best_mean():
    """Two images, s ∈ {0, 1}: factor 1 picks s = 0 for both, factor 3 picks s = 1 for the
    second only; the PSNR (here minus the solution's first entry) prefers the latter."""
    residual = np.array([[1.0, 1.0], [1.5, 1.5]])
    divergence = np.array([[0.1, 1.0], [0.0, 0.7]])
    solutions = np.array([[[5.0], [4.0]], [[1.0], [2.0]]])
    risks = StrengthRisks((0.0, 1.0), residual, divergence, 0 * divergence, solutions, True)
    assert list(risks.pick(1.0)) == [0, 0] and list(risks.pick(3.0)) == [0, 1]
    factor, means = factor_by_psnr(risks, [1.0, 3.0], lambda X: -X[:, 0])
    assert factor == 3.0
    np.testing.assert_allclose(means, [-4.5, -3.5])
