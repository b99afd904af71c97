"""Outer optimisers: Adam against hand-computed steps, gradient descent on a quadratic."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from framework.optim import Adam, GradientDescent, make_optimizer


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
