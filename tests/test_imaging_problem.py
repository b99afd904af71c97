"""ImagingProblem: ∇ₓf, HVP and Jᵀ against central finite differences, blocks, counts."""

from __future__ import annotations

import numpy as np
import pytest
from array_api_compat import device as device_of

from problems.base import Problem
from problems.experts import EXPERT_NAMES
from problems.foe import COLUMN_WISE, FieldsOfExperts, gaussian_filters, initial_theta
from problems.imaging import ImagingProblem
from problems.operators import GaussianBlur, Identity, Inpainting
from problems.tv import TotalVariation

SHAPE = (16, 16)
N = 256
OPERATORS = {
    "identity": lambda: Identity(SHAPE),
    "inpainting": lambda: Inpainting(SHAPE, 0.5, seed=1),
    "blur": lambda: GaussianBlur(SHAPE, 1.0),
}


def image() -> np.ndarray:
    t = np.linspace(0, 1, 16)
    return 0.5 + 0.3 * np.sin(6 * t)[:, None] * np.cos(4 * t)[None, :] + 0.2 * (t[None, :] > 0.5)


BOUNDARIES = ["zero", "symmetric"]


def foe_setup(backend, expert: str, operator: str, learn: str = "both", boundary: str = "zero"):
    reg = FieldsOfExperts(SHAPE, 3, 4, expert=expert, gamma=0.1, learn=learn, boundary=boundary)
    problem = ImagingProblem.from_image(image(), backend, OPERATORS[operator](), reg, seed=2)
    rng = np.random.default_rng(3)
    theta = initial_theta(gaussian_filters(3, 4, seed=4), rng.uniform(-1.0, 0.5, 4))
    return problem, theta


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check_derivatives(backend, problem, theta_h: np.ndarray, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    xh = image().ravel() + 0.1 * rng.standard_normal(N)
    vh, wh = rng.standard_normal((2, N))
    x, theta = backend.asarray(xh), backend.asarray(theta_h)
    # central differences: truncation O(h²) ≈ 1e-10 and round-off ≈ ε‖f‖/h ≈ 1e-11 relative
    # for h = 1e-5 (smooth experts, O(1) derivatives), far inside the 1e-6 tolerances; a
    # wrong boundary term misses by percents (a dropped fold of the symmetric adjoint: 3 %,
    # Jᵀ's stack zero-padded: 37 %)
    h = 1e-5

    def f(z: np.ndarray, th: np.ndarray = theta_h) -> float:
        return float(problem.lower_objective(backend.asarray(z), backend.asarray(th)))

    def grad(z: np.ndarray, th: np.ndarray = theta_h) -> np.ndarray:
        return backend.to_numpy(problem.lower_grad(backend.asarray(z), backend.asarray(th)))

    g = problem.lower_grad(x, theta)
    assert device_of(g) == backend.device and g.shape == (N,)
    gh = backend.to_numpy(g)
    fd = (f(xh + h * vh) - f(xh - h * vh)) / (2 * h)
    assert abs(fd - gh @ vh) <= 1e-6 * abs(gh @ vh)

    hv = problem.hvp(x, theta, backend.asarray(vh))
    assert device_of(hv) == backend.device and hv.shape == (N,)
    fd_hv = (grad(xh + h * vh) - grad(xh - h * vh)) / (2 * h)
    assert rel_err(backend.to_numpy(hv), fd_hv) <= 1e-6

    jt = problem.jac_t(x, theta, backend.asarray(wh))
    p = theta_h.size
    assert device_of(jt) == backend.device and jt.shape == (p,)
    flat = theta_h.ravel()
    fd_j = np.empty(p)
    for i in range(p):
        e = np.zeros(p)
        e[i] = h
        plus = grad(xh, (flat + e).reshape(theta_h.shape)) @ wh
        minus = grad(xh, (flat - e).reshape(theta_h.shape)) @ wh
        fd_j[i] = (plus - minus) / (2 * h)
    mask = backend.to_numpy(problem.theta_mask)
    assert rel_err(backend.to_numpy(jt), mask * fd_j) <= 1e-6


@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("operator", list(OPERATORS))
@pytest.mark.parametrize("expert", EXPERT_NAMES)
def test_foe_derivatives(backend, expert: str, operator: str, boundary: str) -> None:
    problem, theta = foe_setup(backend, expert, operator, boundary=boundary)
    check_derivatives(backend, problem, theta)


@pytest.mark.parametrize("operator", list(OPERATORS))
def test_tv_derivatives(backend, operator: str) -> None:
    problem = ImagingProblem.from_image(
        image(), backend, OPERATORS[operator](), TotalVariation(SHAPE, gamma=0.05), seed=2
    )
    check_derivatives(backend, problem, np.array([-0.7]))


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_foe_5x5_dct_derivatives(boundary: str) -> None:
    from backends import get_backend
    from problems.foe import dct_filters

    backend = get_backend("numpy")
    reg = FieldsOfExperts(SHAPE, 5, 24, expert="lorentzian", boundary=boundary)
    problem = ImagingProblem.from_image(image(), backend, Inpainting(SHAPE, 0.3), reg)
    check_derivatives(backend, problem, initial_theta(dct_filters(5), -1.0))


def test_protocol_and_attributes(backend) -> None:
    problem, _ = foe_setup(backend, "lorentzian", "inpainting")
    assert isinstance(problem, Problem)
    assert problem.n == N and problem.image_shape == SHAPE and problem.theta_shape == (4, 10)
    for a in (problem.x_true, problem.y, problem.theta_mask):
        assert device_of(a) == backend.device
    x = backend.asarray(np.random.default_rng(0).random(N))
    assert float(problem.upper_loss(x)) == pytest.approx(
        0.5 * np.sum((backend.to_numpy(x) - image().ravel()) ** 2), rel=1e-14
    )
    np.testing.assert_allclose(
        backend.to_numpy(problem.upper_grad(x)), backend.to_numpy(x) - image().ravel()
    )


def test_normalised_samples_keep_their_scales_through_batches(backend) -> None:
    reg = TotalVariation(SHAPE)
    images = [image(), 0.3 * image(), image()[::-1]]
    plain = [ImagingProblem.from_image(im, backend, GaussianBlur(SHAPE, 1.0), reg, seed=j)
             for j, im in enumerate(images)]
    normal = [ImagingProblem.from_image(im, backend, GaussianBlur(SHAPE, 1.0), reg, seed=j,
                                        normalize=True) for j, im in enumerate(images)]
    scales = [float(np.sqrt(np.mean(backend.to_numpy(p.y) ** 2))) for p in plain]
    assert [p.scale for p in plain] == [1.0] * 3
    assert [p.scale for p in normal] == pytest.approx(scales, rel=1e-14)
    batch = ImagingProblem.concat(normal)
    assert batch.scales == tuple(p.scale for p in normal)
    assert batch.subset([2, 0]).scales == (normal[2].scale, normal[0].scale)
    assert batch.subset([1]).scale == normal[1].scale
    np.testing.assert_allclose(backend.to_numpy(batch.Y[1, ...]) * scales[1],
                               backend.to_numpy(plain[1].y), rtol=1e-14)
    with pytest.raises(ValueError, match="ambiguous"):
        _ = batch.scale  # one number for three samples
    with pytest.raises(ValueError, match="scales must be 3 positive numbers"):
        ImagingProblem(batch.X_true, batch.Y, batch.operator, reg, scales=[1.0, 2.0])


@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("expert", ["lorentzian", "huber"])
def test_blocks_equal_columns_and_counts(backend, expert: str, boundary: str) -> None:
    problem, theta_h = foe_setup(backend, expert, "blur", boundary=boundary)
    rng = np.random.default_rng(8)
    x, theta = backend.asarray(image().ravel()), backend.asarray(theta_h)
    vh = rng.standard_normal((N, 5))
    before = problem.counter.snapshot()
    hv = problem.hvp(x, theta, backend.asarray(vh))
    jt = problem.jac_t(x, theta, backend.asarray(vh))
    work = problem.counter.snapshot() - before
    assert (work.hvp, work.hvp_passes, work.jac_t, work.jac_t_passes) == (5, 1, 5, 1)
    assert hv.shape == (N, 5) and jt.shape == (40, 5)
    assert device_of(hv) == backend.device and device_of(jt) == backend.device
    for j in range(5):
        col = backend.asarray(vh[:, j])
        np.testing.assert_allclose(
            backend.to_numpy(hv)[:, j], backend.to_numpy(problem.hvp(x, theta, col)), atol=1e-12
        )
        np.testing.assert_allclose(
            backend.to_numpy(jt)[:, j], backend.to_numpy(problem.jac_t(x, theta, col)), atol=1e-12
        )
    work = problem.counter.snapshot() - before
    assert (work.hvp, work.hvp_passes, work.applications, work.passes) == (10, 6, 20, 12)


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_block_of_a_large_batch_equals_each_sample_alone(backend, boundary: str) -> None:
    """From ``COLUMN_WISE`` samples on, NumPy applies a block column by column: the
    numbers are those of each sample's block alone (applied as one block), bit for bit."""
    reg = FieldsOfExperts(SHAPE, 3, 4, gamma=0.1, boundary=boundary)
    rng = np.random.default_rng(9)
    images = [image() + 0.1 * rng.standard_normal(SHAPE) for _ in range(COLUMN_WISE)]
    samples = [ImagingProblem.from_image(img, backend, Inpainting(SHAPE, 0.5, seed=i), reg,
                                         seed=i) for i, img in enumerate(images)]
    batch = ImagingProblem.concat(samples)
    theta = backend.asarray(initial_theta(gaussian_filters(3, 4, seed=4), -0.5))
    vh = rng.standard_normal((COLUMN_WISE, N, 3))
    before = batch.counter.snapshot()
    hv = backend.to_numpy(batch.hvp(batch.Y, theta, backend.asarray(vh)))
    work = batch.counter.snapshot() - before
    assert (work.hvp, work.hvp_passes) == (3 * COLUMN_WISE, 1)
    for i, sample in enumerate(samples):
        alone = sample.hvp(sample.y, theta, backend.asarray(vh[i]))
        np.testing.assert_array_equal(hv[i], backend.to_numpy(alone))


@pytest.mark.parametrize("expert", ["lorentzian", "huber"])
def test_linearization_evaluates_f_and_grad_as_the_problem(backend, expert: str) -> None:
    """An FoE linearization's (f, ∇f) at its point, from its own filter responses, are the
    problem's, bit for bit, and counted the same; TV linearizations share nothing."""
    problem, theta_h = foe_setup(backend, expert, "inpainting")
    x, theta = backend.asarray(image().ravel()), backend.asarray(theta_h)
    before = problem.counter.snapshot()
    f, g = problem.linearize(x, theta).value_and_grad()
    work = problem.counter.snapshot() - before
    assert (work.f_evals, work.grad_evals) == (1, 1)
    f_ref, g_ref = problem.lower_value_and_grad(x, theta)
    assert float(f) == float(f_ref) and f.shape == ()
    np.testing.assert_array_equal(backend.to_numpy(g), backend.to_numpy(g_ref))
    tv = ImagingProblem.from_image(image(), backend, Identity(SHAPE), TotalVariation(SHAPE))
    assert tv.linearize(x, backend.asarray(np.array([-1.0]))).value_and_grad is None


def test_function_counts() -> None:
    from backends import get_backend

    problem, theta_h = foe_setup(get_backend("numpy"), "l2", "identity")
    x = problem.x_true
    problem.lower_objective(x, theta_h)
    problem.lower_grad(x, theta_h)
    problem.lower_grad(x, theta_h)
    counts = problem.counter.snapshot()
    assert (counts.f_evals, counts.grad_evals, counts.hvp) == (1, 2, 0)


def test_theta_mask_zeroes_fixed_parameters(backend) -> None:
    problem, theta_h = foe_setup(backend, "smooth_l1", "identity", learn="exponents")
    w = backend.asarray(np.random.default_rng(1).standard_normal(N))
    jt = backend.to_numpy(problem.jac_t(problem.x_true, backend.asarray(theta_h), w)).reshape(4, 10)
    assert np.all(jt[:, :9] == 0.0) and np.all(jt[:, 9] != 0.0)


def test_flat_theta_accepted(backend) -> None:
    problem, theta_h = foe_setup(backend, "lorentzian", "identity")
    g1 = problem.lower_grad(problem.x_true, backend.asarray(theta_h))
    g2 = problem.lower_grad(problem.x_true, backend.asarray(theta_h.ravel()))
    np.testing.assert_array_equal(backend.to_numpy(g1), backend.to_numpy(g2))


def test_wrong_theta_shape_names_theta_and_expected_shape() -> None:
    from backends import get_backend

    problem, _ = foe_setup(get_backend("numpy"), "lorentzian", "identity")
    with pytest.raises(ValueError, match=r"theta.*\(4, 10\)"):
        problem.lower_grad(problem.x_true, np.zeros((4, 9)))
    with pytest.raises(ValueError, match="theta"):
        problem.jac_t(problem.x_true, np.zeros(7), problem.x_true)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_images_are_named(bad: float) -> None:
    reg = FieldsOfExperts(SHAPE, 3, 2)
    good = image().ravel()
    broken = good.copy()
    broken[7] = bad
    op = Identity(SHAPE)
    with pytest.raises(ValueError, match="x_true"):
        ImagingProblem(broken, good, op, reg)
    with pytest.raises(ValueError, match="y"):
        ImagingProblem(good, broken, op, reg)
    from backends import get_backend

    with pytest.raises(ValueError, match="image"):
        ImagingProblem.from_image(broken.reshape(SHAPE), get_backend("numpy"), op, reg)


def test_float32_keeps_dtype() -> None:
    from backends import get_backend

    backend = get_backend("array_api_strict", dtype="float32", device="device1")
    problem, theta_h = foe_setup(backend, "lorentzian", "blur")
    theta = backend.asarray(theta_h)
    v = backend.asarray(np.ones((N, 2)))
    for out in (
        problem.lower_grad(problem.y, theta),
        problem.hvp(problem.y, theta, v),
        problem.jac_t(problem.y, theta, v),
        problem.lower_objective(problem.y, theta),
    ):
        assert out.dtype == backend.xp.float32 and device_of(out) == backend.device


def test_psnr() -> None:
    from problems.base import psnr

    a = np.zeros(100)
    b = np.full(100, 0.1)
    assert psnr(b, a) == pytest.approx(20.0)
    assert psnr(a, a) == float("inf")


def _two_samples(backend, upper: str, mse_floor: float = 0.0) -> ImagingProblem:
    rng = np.random.default_rng(5)
    shape = (8, 9)
    reg = FieldsOfExperts(shape, 3, 2)
    return ImagingProblem.concat([
        ImagingProblem.from_image(rng.random(shape), backend, Identity(shape), reg,
                                  noise_level=0.1, seed=s, upper=upper, mse_floor=mse_floor)
        for s in (1, 2)])


def test_neg_psnr_upper_loss_is_minus_the_psnr_and_its_gradient_matches_differences(
        backend) -> None:
    from problems.base import psnr

    problem = _two_samples(backend, "neg_psnr")
    squared = _two_samples(backend, "squared_error")
    rng = np.random.default_rng(0)
    x = backend.asarray(backend.to_numpy(problem.X_true) + 0.05 * rng.standard_normal((2, 72)))
    loss = backend.to_numpy(problem.upper_loss(x))
    for i in range(2):
        assert loss[i] == pytest.approx(-psnr(x[i, ...], problem.X_true[i, ...]), rel=1e-13)
    # ½‖r‖² for the default loss, and the two gradients differ by 20/(ln 10 ‖r‖²) per row
    r = backend.to_numpy(x) - backend.to_numpy(problem.X_true)
    np.testing.assert_allclose(backend.to_numpy(squared.upper_loss(x)), 0.5 * np.sum(r * r, 1),
                               rtol=1e-14)
    grad = backend.to_numpy(problem.upper_grad(x))
    np.testing.assert_allclose(grad, r * (20 / np.log(10) / np.sum(r * r, 1))[:, None],
                               rtol=1e-13)
    # central differences along a random direction: truncation O(h²‖∇³ℓ‖) ≈ 1e-10 relative
    d = rng.standard_normal((2, 72))
    h = 1e-5
    fd = (backend.to_numpy(problem.upper_loss(backend.asarray(backend.to_numpy(x) + h * d)))
          - backend.to_numpy(problem.upper_loss(backend.asarray(backend.to_numpy(x) - h * d))))
    np.testing.assert_allclose(fd / (2 * h), np.sum(grad * d, 1), rtol=1e-7)


def test_floored_neg_psnr_is_the_log_of_mse_plus_the_floor(backend) -> None:
    """ℓ_i = 10 log10(‖r_i‖²/n + δ) against the closed form; its gradient against the closed
    form and central differences; δ = 0 is minus the PSNR (test above)."""
    delta = 2e-3  # of the size of the rows' MSE (≈ 2.5e-3): both terms matter
    problem = _two_samples(backend, "neg_psnr", delta)
    rng = np.random.default_rng(1)
    x = backend.to_numpy(problem.X_true) + 0.05 * rng.standard_normal((2, 72))
    r = x - backend.to_numpy(problem.X_true)
    mse = np.sum(r * r, 1) / 72
    loss = backend.to_numpy(problem.upper_loss(backend.asarray(x)))
    np.testing.assert_allclose(loss, 10 * np.log10(mse + delta), rtol=1e-13)
    grad = backend.to_numpy(problem.upper_grad(backend.asarray(x)))
    np.testing.assert_allclose(grad, r * (20 / np.log(10) / (72 * (mse + delta)))[:, None],
                               rtol=1e-13)
    d = rng.standard_normal((2, 72))
    h = 1e-5  # truncation O(h²‖∇³ℓ‖) ≈ 1e-10 relative, as above
    fd = (backend.to_numpy(problem.upper_loss(backend.asarray(x + h * d)))
          - backend.to_numpy(problem.upper_loss(backend.asarray(x - h * d))))
    np.testing.assert_allclose(fd / (2 * h), np.sum(grad * d, 1), rtol=1e-7)
    assert problem.subset([1]).mse_floor == delta and "mse_floor=0.002" in repr(problem)
    with pytest.raises(ValueError, match="upper loss"):  # one loss per batch
        ImagingProblem.concat([problem, _two_samples(backend, "neg_psnr")])
    with pytest.raises(ValueError, match="mse_floor belongs to upper='neg_psnr'"):
        _two_samples(backend, "squared_error", delta)
    with pytest.raises(ValueError, match="mse_floor must be a finite number"):
        _two_samples(backend, "neg_psnr", -1e-3)


def test_upper_losses_are_checked_and_not_mixed(backend) -> None:
    with pytest.raises(ValueError, match="upper must be one of"):
        _two_samples(backend, "psnr")
    a, b = _two_samples(backend, "neg_psnr"), _two_samples(backend, "squared_error")
    with pytest.raises(ValueError, match="upper loss"):
        ImagingProblem.concat([a, b])
    assert a.subset([1]).upper == "neg_psnr"
