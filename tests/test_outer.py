"""Outer optimisers: Adam against hand-computed steps, gradient descent on a quadratic,
L-BFGS against the dense BFGS inverse update and SciPy's minimiser."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from framework.experiment import checkpoint
from framework.optim import Adam, GradientDescent, make_optimizer
from framework.optim.outer import LBFGS


def test_adam_matches_hand_computed_steps(backend):
    theta = backend.asarray([1.0, -2.0])
    opt = Adam(lr=0.1, betas=(0.9, 0.999), eps=1e-8)
    g1 = np.array([0.5, -1.0])
    step = opt.step(theta, backend.asarray(g1))
    # t = 1: m̂ = g, v̂ = g², so the step is lr · g / (|g| + eps) = lr · sign(g)
    expected1 = np.array([1.0, -2.0]) - 0.1 * g1 / (np.abs(g1) + 1e-8)
    np.testing.assert_allclose(backend.to_numpy(step.theta), expected1, rtol=0, atol=1e-14)
    g2 = np.array([1.0, 3.0])
    step2 = opt.step(step.theta, backend.asarray(g2))
    m = 0.9 * (0.1 * g1) + 0.1 * g2
    v = 0.999 * (0.001 * g1**2) + 0.001 * g2**2
    m_hat, v_hat = m / (1 - 0.9**2), v / (1 - 0.999**2)
    expected2 = expected1 - 0.1 * m_hat / (np.sqrt(v_hat) + 1e-8)
    np.testing.assert_allclose(backend.to_numpy(step2.theta), expected2, rtol=1e-14, atol=1e-14)
    assert opt.t == 2


def test_adam_mask_freezes_entries():
    opt = Adam(lr=0.5, mask=np.array([1.0, 0.0, 1.0]))
    theta = np.array([1.0, 2.0, 3.0])
    for _ in range(3):
        theta = opt.step(theta, np.array([1.0, 1.0, -1.0])).theta
    assert theta[1] == 2.0
    assert theta[0] < 1.0 and theta[2] > 3.0


def test_adam_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(0)
    grads = rng.standard_normal((6, 4))
    a = Adam(lr=0.05)
    theta = np.zeros(4)
    for g in grads[:3]:
        theta = a.step(theta, g).theta
    state = a.state_dict()
    assert isinstance(state["m"], np.ndarray) and state["t"] == 3
    b = Adam(lr=1.0)
    b.load_state_dict(state)
    ta, tb = theta.copy(), theta.copy()
    for g in grads[3:]:
        ta = a.step(ta, g).theta
        tb = b.step(tb, g).theta
    np.testing.assert_array_equal(ta, tb)


def _quadratic():
    a = np.diag([1.0, 10.0])
    target = np.array([1.0, -1.0])

    def loss(theta):
        d = np.asarray(theta) - target
        return 0.5 * float(d @ a @ d)

    def grad(theta):
        return a @ (np.asarray(theta) - target)

    return loss, grad, target


def test_gradient_descent_backtracking_converges_on_quadratic():
    loss, grad, target = _quadratic()
    opt = GradientDescent(lr=1.0, shrink=0.5, c1=1e-4, max_backtracks=20)
    theta = np.zeros(2)
    values = [loss(theta)]
    for _ in range(60):
        step = opt.step(theta, grad(theta), loss=loss(theta), loss_fn=loss)
        assert step.accepted
        theta = step.theta
        values.append(loss(theta))
    assert all(b <= a for a, b in itertools.pairwise(values))
    np.testing.assert_allclose(theta, target, atol=1e-6)


def test_gradient_descent_first_step_by_hand():
    loss, grad, _ = _quadratic()
    opt = GradientDescent(lr=1.0, shrink=0.5, c1=1e-4, max_backtracks=10)
    theta = np.zeros(2)
    g = grad(theta)  # (-1, 10)
    step = opt.step(theta, g, loss=loss(theta), loss_fn=loss)
    # loss(−αg) = ½((α − 1)² + 10(1 − 10α)²): 405, 80.1, 11.5 for α = 1, ½, ¼ (all above
    # loss(0) = 5.5), then 0.695 for α = ⅛, which satisfies Armijo: three backtracks
    for alpha in (1.0, 0.5, 0.25):
        assert loss(theta - alpha * g) > loss(theta) - 1e-4 * alpha * (g @ g)
    assert step.step_size == 0.125 and step.backtracks == 3 and step.loss_evals == 4
    np.testing.assert_allclose(step.theta, -0.125 * g)


def test_gradient_descent_refuses_when_armijo_never_holds():
    opt = GradientDescent(lr=1.0, max_backtracks=3)
    theta = np.array([1.0])
    step = opt.step(theta, np.array([1.0]), loss=0.0, loss_fn=lambda t: 1.0)
    assert not step.accepted and step.loss_evals == 4
    np.testing.assert_array_equal(step.theta, theta)


def test_gradient_descent_without_loss_fn_takes_plain_step_and_masks():
    opt = GradientDescent(lr=0.1, mask=np.array([[1.0, 0.0]]))
    step = opt.step(np.array([[1.0, 1.0]]), np.array([[2.0, 2.0]]))
    np.testing.assert_allclose(step.theta, [[0.8, 1.0]])
    state = opt.state_dict()
    other = GradientDescent(lr=5.0)
    other.load_state_dict(state)
    assert other.lr == 0.1 and other.t == 1


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [({"lr": 0.0}, "lr"), ({"lr": 1.0, "betas": (1.0, 0.9)}, "betas"), ({"eps": -1}, "eps")],
)
def test_adam_rejects_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        Adam(**kwargs)


def test_shape_mismatch_and_wrong_state_are_reported():
    with pytest.raises(ValueError, match="shape"):
        Adam().step(np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match="gd"):
        Adam().load_state_dict(GradientDescent().state_dict())


def test_make_optimizer_from_config():
    class Cfg:
        name, lr, lr_decay, betas, eps = "adam", 0.1, 1.0, [0.9, 0.99], 1e-8
        shrink, c1, max_backtracks = 0.5, 1e-4, 5

    assert isinstance(make_optimizer(Cfg()), Adam)
    Cfg.name = "gd"
    assert isinstance(make_optimizer(Cfg()), GradientDescent)
    Cfg.name = "sgd"
    with pytest.raises(ValueError, match="unknown Optimizer .sgd.; valid names are adam, gd"):
        make_optimizer(Cfg())
    assert math.isclose(Adam(0.1, (0.9, 0.99)).betas[1], 0.99)


def test_lr_decay_scales_each_step_by_a_power_of_the_decay(backend):
    # Adam's t-th step is lr · dᵗ⁻¹ · m̂/(√v̂ + eps): with a constant gradient m̂ = g and
    # v̂ = g², so each step is lr · dᵗ⁻¹ · sign(g) (to eps); gradient descent's plain step
    # is lr · dᵗ⁻¹ · g
    g = np.array([0.5, -2.0])
    adam, gd = Adam(lr=0.1, lr_decay=0.5), GradientDescent(lr=0.1, lr_decay=0.5)
    a = b = backend.asarray([1.0, 1.0])
    for t in range(1, 5):
        before_a, before_b = backend.to_numpy(a), backend.to_numpy(b)
        step_a, step_b = adam.step(a, backend.asarray(g)), gd.step(b, backend.asarray(g))
        a, b = step_a.theta, step_b.theta
        assert step_a.step_size == step_b.step_size == 0.1 * 0.5 ** (t - 1)
        np.testing.assert_allclose(before_a - backend.to_numpy(a),
                                   0.1 * 0.5 ** (t - 1) * np.sign(g), rtol=1e-7, atol=0)
        # the step is read back as a difference of O(1) iterates: a few roundings of θ
        np.testing.assert_allclose(before_b - backend.to_numpy(b), 0.1 * 0.5 ** (t - 1) * g,
                                   rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="lr_decay"):
        Adam(lr_decay=0.0)


def _rosenbrock():
    def loss(x):
        x = np.asarray(x)
        return float(100 * (x[1] - x[0] ** 2) ** 2 + (1 - x[0]) ** 2)

    def grad(x):
        x = np.asarray(x)
        return np.array([-400 * x[0] * (x[1] - x[0] ** 2) - 2 * (1 - x[0]),
                         200 * (x[1] - x[0] ** 2)])

    return loss, grad


def _lbfgs_run(opt, loss, grad, theta, steps):
    thetas = [theta]
    for _ in range(steps):
        step = opt.step(theta, grad(theta), loss=loss(theta), loss_fn=loss)
        assert step.accepted
        theta = step.theta
        thetas.append(theta)
    return thetas


def test_lbfgs_direction_is_the_dense_bfgs_inverse_update():
    # after m accepted steps, d = −H g with H from H₀ = (sᵀy/yᵀy) I (the newest pair) and
    # the m BFGS inverse updates H ← (I − ρsyᵀ) H (I − ρysᵀ) + ρssᵀ, ρ = 1/(yᵀs), oldest first
    rng = np.random.default_rng(3)
    q = rng.standard_normal((6, 6))
    a = q @ q.T + 6 * np.eye(6)
    target = rng.standard_normal(6)

    def loss(t):
        return 0.5 * float((t - target) @ a @ (t - target))

    def grad(t):
        return a @ (t - target)

    opt = LBFGS(lr=0.5, memory=3)
    thetas = _lbfgs_run(opt, loss, grad, np.zeros(6), 5)
    # the 5th step formed the pair of steps 3 → 4; memory 3 holds the pairs ending at 2, 3, 4
    s_y = [(t1 - t0, grad(t1) - grad(t0)) for t0, t1 in itertools.pairwise(thetas[:-1])][-3:]
    assert len(opt.pairs) == 3
    s_last, y_last = s_y[-1]
    h = (s_last @ y_last) / (y_last @ y_last) * np.eye(6)
    for s, y in s_y:
        rho = 1.0 / (y @ s)
        v = np.eye(6) - rho * np.outer(y, s)
        h = v.T @ h @ v + rho * np.outer(s, s)
    g = grad(thetas[-1])
    # two products of six 6×6 factors of condition ≲ 10: agreement to ~1e-13 relative
    np.testing.assert_allclose(opt._direction(g), -h @ g, rtol=1e-10,
                               atol=1e-12 * np.linalg.norm(h @ g))


def test_lbfgs_reaches_the_minimiser_scipy_finds_on_rosenbrock():
    scipy_optimize = pytest.importorskip("scipy.optimize")
    loss, grad = _rosenbrock()
    ref = scipy_optimize.minimize(loss, [-1.2, 1.0], jac=grad, method="L-BFGS-B",
                                  options={"gtol": 1e-12, "ftol": 0}).x
    opt = LBFGS(lr=0.1, memory=5, max_backtracks=30)
    theta, values = np.array([-1.2, 1.0]), []
    for _ in range(100):
        values.append(loss(theta))
        if np.linalg.norm(grad(theta)) < 1e-9:
            break
        theta = opt.step(theta, grad(theta), loss=values[-1], loss_fn=loss).theta
    assert all(b <= a for a, b in itertools.pairwise(values))
    # both near the minimiser (1, 1): ‖θ − θ*‖ ≲ ‖g‖/λ_min(∇²f(θ*)) ≈ 1e-9/0.4
    np.testing.assert_allclose(theta, [1.0, 1.0], atol=1e-8)
    np.testing.assert_allclose(theta, ref, atol=1e-5)
    assert len(values) < 60  # superlinear: gradient descent needs thousands here


def test_lbfgs_masks_resumes_identically_and_needs_a_loss(tmp_path):
    tmp = tmp_path
    loss, grad = _rosenbrock()
    mask = np.array([1.0, 0.0])
    a = LBFGS(lr=0.1, memory=4, max_backtracks=30, mask=mask)
    theta = _lbfgs_run(a, loss, grad, np.array([-1.2, 1.0]), 5)[-1]
    assert theta[1] == 1.0 and theta[0] != -1.2
    path = checkpoint.save(tmp / "opt.npz", {"opt": a.state_dict()})
    b = LBFGS(lr=5.0, memory=1, mask=mask)  # the mask is the run's, not the state's
    b.load_state_dict(checkpoint.load(path)["opt"])
    ta = _lbfgs_run(a, loss, grad, theta, 5)
    tb = _lbfgs_run(b, loss, grad, theta, 5)
    np.testing.assert_array_equal(ta[-1], tb[-1])
    with pytest.raises(ValueError, match="loss"):
        LBFGS().step(theta, grad(theta))


def test_lbfgs_falls_back_to_the_gradient_when_its_direction_fails():
    loss, grad = _rosenbrock()
    opt = LBFGS(lr=0.1, memory=4, max_backtracks=3)
    theta = _lbfgs_run(opt, loss, grad, np.array([-1.2, 1.0]), 3)[-1]
    assert opt.pairs
    step = opt.step(theta, grad(theta), loss=loss(theta), loss_fn=lambda t: math.inf)
    # 3 trials along d, then 3 gradient trials; memory cleared, θ kept
    assert not step.accepted and step.loss_evals == 6 and opt.pairs == []
    np.testing.assert_array_equal(step.theta, theta)


def test_lbfgs_on_the_bilevel_quadratic_problem_reaches_scipys_minimiser():
    # the upper loss of two closed-form samples, its gradient from the engine (Krylov
    # solves to rtol 1e-12); reference: SciPy's L-BFGS-B on the dense closed forms
    scipy_optimize = pytest.importorskip("scipy.optimize")
    from framework.bilevel.engine import BilevelEngine, EngineConfig
    from framework.krylov.stopping import StopConfig
    from problems.quadratic import QuadraticProblem

    problems = [QuadraticProblem(n=20, num_terms=2, seed=s) for s in range(2)]
    engine = BilevelEngine(problems, EngineConfig(stop=StopConfig(rtol=1e-12), lower_gtol=1e-12))

    def dense_loss(theta):
        return float(np.mean([0.5 * np.sum((p.exact_solution(theta) - p.x_true) ** 2)
                              for p in problems]))

    def dense_grad(theta):
        return np.mean([p.exact_hypergradient(theta) for p in problems], axis=0)

    ref = scipy_optimize.minimize(dense_loss, np.zeros(2), jac=dense_grad, method="L-BFGS-B",
                                  options={"gtol": 1e-11, "ftol": 0})
    opt, theta = LBFGS(lr=0.1, memory=5, max_backtracks=30), np.zeros(2)
    steps = 0
    while np.linalg.norm((result := engine.evaluate(theta)).grad) >= 1e-7 and steps < 40:
        theta = opt.step(theta, result.grad, loss=result.loss, loss_fn=engine.loss).theta
        steps += 1
    assert steps < 20  # superlinear (11 steps when written)
    # stationary points of a loss whose Hessian (FD of the dense gradient) has λ_min > 0
    # lie within ‖g‖/λ_min of its minimiser
    h = 1e-4
    hess = np.array([(dense_grad(ref.x + h * e) - dense_grad(ref.x - h * e)) / (2 * h)
                     for e in np.eye(2)])
    lam_min = float(np.linalg.eigvalsh((hess + hess.T) / 2)[0])
    assert lam_min > 0
    bound = (np.linalg.norm(dense_grad(theta)) + np.linalg.norm(dense_grad(ref.x))) / lam_min
    assert np.linalg.norm(theta - ref.x) <= 2 * bound
