"""The predictive risk estimate (UPRE): its trace term against a dense oracle, and its
expectation against the closed-form risk of a linear (quadratic-regulariser) estimator."""

from __future__ import annotations

import numpy as np
import pytest

from framework.bilevel.risk import predictive_risk
from problems.foe import FieldsOfExperts, gaussian_filters, initial_theta
from problems.imaging import ImagingProblem
from problems.operators import GaussianBlur

SHAPE = (4, 4)
N = 16


def dense(apply, n: int = N) -> np.ndarray:
    """The matrix of a map on (n,) host vectors, column by column."""
    return np.stack([apply(e) for e in np.eye(n)], axis=1)


def setup(backend, expert: str, samples: int, seed: int, sigma: float):
    rng = np.random.default_rng(seed)
    reg = FieldsOfExperts(SHAPE, 3, 3, expert=expert, gamma=0.3)
    blur = GaussianBlur(SHAPE, 0.8)
    x_true = np.tile(0.5 + 0.3 * np.sin(np.arange(N)), (samples, 1))
    A = dense(lambda v: backend.to_numpy(blur.apply(backend.asarray(v))))
    Y = x_true @ A.T + sigma * rng.standard_normal((samples, N))
    problem = ImagingProblem(backend.asarray(x_true), backend.asarray(Y), blur, reg)
    theta = initial_theta(gaussian_filters(3, 3, seed=seed), np.array([-0.5, 0.0, -1.0]))
    return problem, theta, A, Y


def hessian(backend, problem, X: np.ndarray, theta: np.ndarray, row: int) -> np.ndarray:
    one = ImagingProblem(problem.X_true[row, :], problem.Y[row, :], problem.operator,
                         problem.regularizer)
    lin = one.linearize(backend.asarray(X[row]), backend.asarray(theta))
    return dense(lambda v: backend.to_numpy(lin.hvp(backend.asarray(v))))


def test_trace_term_against_dense_solves(backend):
    """Each probe's zᵀ A H⁻¹ Aᵀ z against dense solves (at points off the minimiser, where
    the Student-t Hessian is far from diagonal, κ ≈ 70–95); the standard error, the
    residual ‖Ax − y‖² and the risk."""
    problem, theta, A, Y = setup(backend, "student_t", 3, 1, 0.05)
    rng = np.random.default_rng(7)
    X = Y + 0.05 * rng.standard_normal(Y.shape)
    probes = rng.choice([-1.0, 1.0], size=(4, 3, N))
    rtol = 1e-10
    got = predictive_risk(problem, backend.asarray(X), backend.asarray(theta), 0.01,
                          backend.asarray(probes), rtol=rtol)
    assert got.converged
    assert len(got.iterations) == 4 and all(len(i) == 3 for i in got.iterations)
    for row in range(3):
        H = hessian(backend, problem, X, theta, row)
        kappa = np.linalg.cond(H)
        quads = [z @ A @ np.linalg.solve(H, A.T @ z) for z in probes[:, row]]
        # MINRES to ‖Hw − b‖ ≤ rtol‖b‖ moves zᵀAw by at most rtol·κ(H) relative
        tol = 10 * rtol * kappa
        trace = np.mean(quads)
        assert abs(float(backend.to_numpy(got.trace)[row]) - trace) <= tol * abs(trace)
        error = np.std(quads, ddof=1) / 2
        assert float(backend.to_numpy(got.trace_error)[row]) == pytest.approx(error, rel=1e-6)
        residual = np.sum((A @ X[row] - Y[row]) ** 2)
        assert float(backend.to_numpy(got.residual)[row]) == pytest.approx(residual, rel=1e-12)
        risk = residual + 2 * 0.01 * trace - N * 0.01
        assert float(backend.to_numpy(got.risk)[row]) == pytest.approx(risk, rel=1e-8)


def test_unbiased_for_a_linear_estimator(backend):
    """With the quadratic expert x*(y) = H⁻¹Aᵀy; probes √n·e_j make the trace exact; over
    400 noise draws the mean UPRE matches E‖A(x* − x_true)‖² = ‖(S − I)Ax_true‖² +
    σ² tr(SᵀS), S = A H⁻¹ Aᵀ, within 4 standard errors of the mean — while the bias a
    missing or doubled divergence term would make is over 15 of them."""
    samples, sigma = 400, 0.1
    problem, theta, A, Y = setup(backend, "l2", samples, 2, sigma)
    H = hessian(backend, problem, Y, theta, 0)  # the same H everywhere: f is quadratic
    X = np.linalg.solve(H, A.T @ Y.T).T
    probes = np.sqrt(N) * np.broadcast_to(np.eye(N)[:, None, :], (N, samples, N))
    got = predictive_risk(problem, backend.asarray(X), backend.asarray(theta), sigma**2,
                          backend.asarray(np.ascontiguousarray(probes)), rtol=1e-12)
    S = A @ np.linalg.solve(H, A.T)
    trace = np.trace(S)
    np.testing.assert_allclose(backend.to_numpy(got.trace), trace, rtol=1e-9)
    x_true = backend.to_numpy(problem.X_true)[0]
    bias = (S - np.eye(N)) @ A @ x_true
    expected = bias @ bias + sigma**2 * np.trace(S.T @ S)
    risk = backend.to_numpy(got.risk)
    standard_error = np.std(risk, ddof=1) / np.sqrt(samples)
    assert abs(risk.mean() - expected) <= 4 * standard_error
    assert 2 * sigma**2 * trace > 15 * standard_error


def test_probes_must_match_the_solutions(backend):
    problem, theta, _, Y = setup(backend, "l2", 2, 3, 0.1)
    with pytest.raises(ValueError, match=r"probes must have shape \(k, 2, 16\)"):
        predictive_risk(problem, backend.asarray(Y), backend.asarray(theta), 0.01,
                        backend.asarray(np.ones((2, N))))
