"""L-BFGS: convergence on FoE problems, monotone line search, honest failure statuses."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.optimize
from array_api_compat import device as device_of

from backends import get_backend
from framework.lowerlevel import LowerLevelStatus, lbfgs
from problems.datasets import load_embedded_mnist
from problems.foe import FieldsOfExperts, dct_filters, initial_theta
from problems.imaging import ImagingProblem
from problems.operators import Inpainting
from problems.quadratic import QuadraticProblem


def foe_inpainting(backend, size: int = 16) -> tuple[ImagingProblem, object]:
    digit = load_embedded_mnist().images[0]
    start = (28 - size) // 2
    img = digit[start : start + size, start : start + size]
    reg = FieldsOfExperts((size, size), 5, 24, expert="lorentzian")
    problem = ImagingProblem.from_image(
        img, backend, Inpainting((size, size), 0.4, seed=0), reg, noise_level=0.05
    )
    theta = backend.asarray(initial_theta(dct_filters(5), -1.0))
    return problem, theta


def test_converges_on_foe_inpainting(backend) -> None:
    problem, theta = foe_inpainting(backend)
    result = lbfgs(
        lambda x: problem.lower_objective(x, theta),
        lambda x: problem.lower_grad(x, theta),
        problem.y,
        gtol=1e-8,
        maxiter=2000,
    )
    assert result.converged and result.status is LowerLevelStatus.CONVERGED, result.message
    assert device_of(result.x) == backend.device
    true_norm = np.linalg.norm(backend.to_numpy(problem.lower_grad(result.x, theta)))
    assert true_norm <= 1e-8 and result.grad_norm == pytest.approx(true_norm, rel=1e-12)
    counts = problem.counter.snapshot()
    assert counts.f_evals == result.f_evals and counts.grad_evals == result.grad_evals + 1
    history = np.array(result.f_history)
    assert len(history) == result.iterations + 1 and np.all(np.diff(history) <= 0.0)


def test_warm_start_needs_fewer_iterations() -> None:
    backend = get_backend("numpy")
    problem, theta = foe_inpainting(backend, 28)
    fun = lambda x: problem.lower_objective(x, theta)  # noqa: E731
    grad = lambda x: problem.lower_grad(x, theta)  # noqa: E731
    cold = lbfgs(fun, grad, problem.y, gtol=1e-8)
    theta2 = theta + 0.01
    warm = lbfgs(
        lambda x: problem.lower_objective(x, theta2),
        lambda x: problem.lower_grad(x, theta2),
        cold.x,
        gtol=1e-8,
    )
    assert cold.converged and warm.converged
    assert warm.iterations < cold.iterations


def rosenbrock(xp):
    def fun(x):
        return xp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)

    def grad(x):
        g = xp.zeros_like(x)
        d = x[1:] - x[:-1] ** 2
        g[:-1] = -400.0 * x[:-1] * d - 2.0 * (1.0 - x[:-1])
        g[1:] = g[1:] + 200.0 * d
        return g

    return fun, grad


@pytest.mark.parametrize("start", [[-1.2, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
def test_line_search_never_accepts_an_increase_on_rosenbrock(backend, start) -> None:
    fun, grad = rosenbrock(backend.xp)
    x0 = backend.asarray(np.array(start))
    seen = []
    result = lbfgs(
        fun, grad, x0, gtol=1e-10, maxiter=500, memory=5,
        callback=lambda k, x, f, gnorm: seen.append(f),
    )
    assert result.converged, result.message
    np.testing.assert_allclose(backend.to_numpy(result.x), np.ones(len(start)), atol=1e-8)
    history = np.array(result.f_history)
    assert np.all(np.diff(history) <= 0.0)
    np.testing.assert_array_equal(history[1:], seen)
    ref = scipy.optimize.minimize(
        lambda z: float(fun(backend.asarray(z))), np.array(start), method="L-BFGS-B"
    )
    assert result.f <= ref.fun + 1e-12


def test_armijo_condition_holds_on_every_accepted_step() -> None:
    xp = get_backend("numpy").xp
    fun, grad = rosenbrock(xp)
    iterates = []
    lbfgs(fun, grad, np.array([-1.2, 1.0, 0.3]), gtol=1e-9,
          callback=lambda k, x, f, gnorm: iterates.append(x.copy()))
    points = [np.array([-1.2, 1.0, 0.3]), *iterates]
    for a, b in itertools.pairwise(points):
        step = b - a
        assert fun(b) <= fun(a) + 1e-4 * (grad(a) @ step)  # sufficient decrease, α folded in


def test_quadratic_solution_matches_dense_solve(backend) -> None:
    problem = QuadraticProblem(n=30, num_terms=3, seed=4, backend=backend)
    theta_host = [0.0, -1.0, -3.0]
    theta = backend.asarray(theta_host)
    exact = problem.exact_solution(theta_host)
    # A line search sees f only to eps·|f*|; as f − f* ≥ ‖∇f‖²/(2λmax), progress in f is
    # visible only while ‖∇f‖ ≳ sqrt(2λmax·eps·|f*|).  Ask for 10× that floor; then
    # ‖x − x*‖ ≤ ‖∇f‖/λmin.
    eig = np.linalg.eigvalsh(problem._hessian_host(theta_host)[0])
    f_star = float(problem.lower_objective(backend.asarray(exact), theta))
    gtol = 10 * np.sqrt(2 * eig[-1] * np.finfo(np.float64).eps * abs(f_star))
    result = lbfgs(
        lambda x: problem.lower_objective(x, theta), lambda x: problem.lower_grad(x, theta),
        backend.zeros(30), gtol=gtol,
    )
    assert result.converged, result.message
    error = np.linalg.norm(backend.to_numpy(result.x) - exact)
    assert error <= gtol / eig[0]


def test_maxiter_status_is_reported() -> None:
    problem, theta = foe_inpainting(get_backend("numpy"))
    result = lbfgs(
        lambda x: problem.lower_objective(x, theta),
        lambda x: problem.lower_grad(x, theta),
        problem.y,
        maxiter=2,
    )
    assert not result.converged
    assert result.status is LowerLevelStatus.MAXITER and result.iterations == 2
    assert "maxiter=2" in result.message


def test_wrong_gradient_gives_linesearch_failure() -> None:
    result = lbfgs(lambda x: np.sum(x * x), lambda x: -2.0 * x, np.ones(4))
    assert result.status is LowerLevelStatus.LINESEARCH_FAILED and not result.converged
    assert "line search" in result.message
    np.testing.assert_array_equal(result.x, np.ones(4))  # no increase was accepted
    assert result.f_history == (4.0,)


def test_non_finite_start_and_bad_arguments() -> None:
    result = lbfgs(lambda x: np.inf + np.sum(x), lambda x: np.ones_like(x), np.array([1.0, -1.0]))
    assert result.status is LowerLevelStatus.NONFINITE
    with pytest.raises(ValueError, match="memory"):
        lbfgs(lambda x: np.sum(x * x), lambda x: 2 * x, np.ones(2), memory=0)
    with pytest.raises(ValueError, match="c1"):
        lbfgs(lambda x: np.sum(x * x), lambda x: 2 * x, np.ones(2), c1=0.95)


def test_relative_tolerance() -> None:
    result = lbfgs(lambda x: np.sum(x**4), lambda x: 4 * x**3, np.ones(3), gtol=0.0, rtol=1e-3)
    assert result.converged and result.grad_norm <= 1e-3 * np.linalg.norm(4 * np.ones(3))
