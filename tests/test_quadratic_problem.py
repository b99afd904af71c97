"""QuadraticProblem: closed forms against finite differences and dense algebra."""

from __future__ import annotations

import numpy as np
import pytest
from array_api_compat import device as device_of

from problems.base import Problem
from problems.quadratic import QuadraticProblem

THETA = np.array([0.3, -1.0, -2.0])


def test_exact_hypergradient_vs_finite_differences() -> None:
    problem = QuadraticProblem(n=30, num_terms=3, seed=1)

    def loss(theta: np.ndarray) -> float:
        r = problem.exact_solution(theta) - problem._x_true_host
        return 0.5 * float(r @ r)

    h = 1e-6
    fd = np.array(
        [(loss(THETA + h * e) - loss(THETA - h * e)) / (2 * h) for e in np.eye(3)]
    )
    exact = problem.exact_hypergradient(THETA)
    np.testing.assert_allclose(exact, fd, rtol=1e-7, atol=1e-10)


def test_protocol_methods_agree_with_dense_algebra(backend) -> None:
    problem = QuadraticProblem(n=25, num_terms=4, seed=2, backend=backend)
    assert isinstance(problem, Problem)
    theta = backend.asarray([*THETA.tolist(), 0.5])
    x_star_h = problem.exact_solution(backend.to_numpy(theta))
    x_star = backend.asarray(x_star_h)
    g = problem.lower_grad(x_star, theta)
    assert device_of(g) == backend.device
    assert np.linalg.norm(backend.to_numpy(g)) <= 1e-10

    eye = backend.asarray(np.eye(25))
    hess = backend.to_numpy(problem.hvp(x_star, theta, eye))  # one pass, 25 applications
    assert problem.counter.snapshot().hvp_passes == 1 and problem.counter.snapshot().hvp == 25
    dense_h, _ = problem._hessian_host(backend.to_numpy(theta))
    np.testing.assert_allclose(hess, dense_h, rtol=1e-13, atol=1e-13)

    w = np.linalg.solve(dense_h, x_star_h - problem._x_true_host)
    hyper = -backend.to_numpy(problem.jac_t(x_star, theta, backend.asarray(w)))
    np.testing.assert_allclose(
        hyper, problem.exact_hypergradient(backend.to_numpy(theta)), rtol=1e-10, atol=1e-12
    )
    up = problem.upper_grad(x_star)
    assert device_of(up) == backend.device
    assert float(problem.upper_loss(x_star)) == pytest.approx(
        0.5 * np.sum((x_star_h - problem._x_true_host) ** 2), rel=1e-13
    )


def test_gradient_and_jac_t_finite_differences(backend) -> None:
    problem = QuadraticProblem(n=20, num_terms=3, seed=3, backend=backend)
    rng = np.random.default_rng(0)
    xh, vh, wh = rng.standard_normal((3, 20))
    x, theta = backend.asarray(xh), backend.asarray(THETA)
    h = 1e-6

    def f(z: np.ndarray) -> float:
        return float(problem.lower_objective(backend.asarray(z), theta))

    gh = backend.to_numpy(problem.lower_grad(x, theta))
    fd = (f(xh + h * vh) - f(xh - h * vh)) / (2 * h)
    assert fd == pytest.approx(gh @ vh, rel=1e-8)

    def gw(th: np.ndarray) -> float:
        return float(backend.to_numpy(problem.lower_grad(x, backend.asarray(th))) @ wh)

    fd_j = np.array([(gw(THETA + h * e) - gw(THETA - h * e)) / (2 * h) for e in np.eye(3)])
    jt = problem.jac_t(x, theta, backend.asarray(wh))
    assert device_of(jt) == backend.device
    np.testing.assert_allclose(backend.to_numpy(jt), fd_j, rtol=1e-7)

    block = rng.standard_normal((20, 4))
    before = problem.counter.snapshot()
    jb = backend.to_numpy(problem.jac_t(x, theta, backend.asarray(block)))
    hb = backend.to_numpy(problem.hvp(x, theta, backend.asarray(block)))
    work = problem.counter.snapshot() - before
    assert (work.jac_t, work.jac_t_passes, work.hvp, work.hvp_passes) == (4, 1, 4, 1)
    for j in range(4):
        col = backend.asarray(block[:, j])
        np.testing.assert_allclose(jb[:, j], backend.to_numpy(problem.jac_t(x, theta, col)))
        np.testing.assert_allclose(hb[:, j], backend.to_numpy(problem.hvp(x, theta, col)))


def test_bad_theta_and_sizes() -> None:
    problem = QuadraticProblem(n=10, num_terms=2)
    with pytest.raises(ValueError, match=r"theta.*\(2,\)"):
        problem.lower_grad(problem.x_true, np.zeros(3))
    with pytest.raises(ValueError, match="n must"):
        QuadraticProblem(n=2)
