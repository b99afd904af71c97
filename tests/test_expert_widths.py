"""Fields of Experts with a learned mixture of expert widths per filter
(``FieldsOfExperts(widths=...)``, ``problem.expert_widths``): the value against SciPy's
convolutions, ∇ₓ, the HVP and Jᵀ against central differences, the mask, θ's layout, the
config checks (a run with widths: tests/test_composite.py)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal
from array_api_compat import device as device_of
from test_imaging_problem import OPERATORS, check_derivatives, image
from test_imaging_problem import SHAPE as IMAGE_SHAPE

from backends import get_backend
from problems.foe import FieldsOfExperts, dct_filters, gaussian_filters, initial_theta
from problems.imaging import ImagingProblem

SHAPE = (16, 14)
N = SHAPE[0] * SHAPE[1]
WIDTHS = (0.25, 1.0, 4.0)


def student_t(z: np.ndarray, gamma: float) -> np.ndarray:
    return np.log1p((z / gamma) ** 2)


def mixture(boundary: str = "symmetric", zero_mean: bool = False, widths=WIDTHS,
            gamma: float = 0.2) -> FieldsOfExperts:
    return FieldsOfExperts(SHAPE, 3, 4, expert="student_t", gamma=gamma, boundary=boundary,
                           zero_mean=zero_mean, widths=widths)


def random_theta(rng: np.random.Generator, widths=WIDTHS) -> np.ndarray:
    return initial_theta(gaussian_filters(3, 4, seed=2), rng.uniform(-1.5, 0.0, (4, len(widths))),
                         len(widths))


@pytest.mark.parametrize("boundary", ["zero", "symmetric"])
def test_value_is_the_weighted_sum_over_filters_and_widths(backend, boundary: str) -> None:
    """R(x) = Σ_f Σ_m 10^{p_fm} Σ_j log(1 + (k_f ∗ x)_j² / (γ c_m)²), with SciPy's
    convolutions: every width reads its own exponent (a swapped column would miss)."""
    rng = np.random.default_rng(1)
    img = rng.random(SHAPE)
    foe = mixture(boundary)
    theta = random_theta(rng)
    assert foe.theta_shape == theta.shape == (4, 9 + 3)
    value = foe.value(backend.asarray(img.ravel()), backend.asarray(theta))
    assert device_of(value) == backend.device
    mode = {"zero": "fill", "symmetric": "symm"}[boundary]
    ref = 0.0
    for f in range(4):
        z = scipy.signal.convolve2d(img, theta[f, :9].reshape(3, 3), "same", boundary=mode)
        ref += sum(10 ** theta[f, 9 + m] * student_t(z, 0.2 * c).sum()
                   for m, c in enumerate(WIDTHS))
    assert float(value) == pytest.approx(ref, rel=1e-13)


def test_a_mixture_equals_the_sum_of_single_width_banks(backend) -> None:
    """Two widths with exponents (p, q) give the gradient and HVP of two one-width banks of
    the same filters, one at width γc_1 with exponents p, one at γc_2 with q."""
    rng = np.random.default_rng(2)
    xp = backend.xp
    foe = mixture(widths=(0.5, 2.0))
    theta = random_theta(rng, (0.5, 2.0))
    X = backend.asarray(rng.random((3, N)))
    V = backend.asarray(rng.standard_normal((3, N, 2)))
    lin = foe.linearize(xp, X, backend.asarray(theta))
    grad, hvp = lin.value_and_grad(value=False)[1], lin.hvp(V)
    ref_grad, ref_hvp = 0.0, 0.0
    for m, c in enumerate((0.5, 2.0)):
        single = FieldsOfExperts(SHAPE, 3, 4, expert="student_t", gamma=0.2 * c,
                                 boundary="symmetric")
        part = initial_theta(theta[:, :9].reshape(4, 3, 3), theta[:, 9 + m])
        one = single.linearize(xp, X, backend.asarray(part))
        ref_grad += backend.to_numpy(one.value_and_grad(value=False)[1])
        ref_hvp += backend.to_numpy(one.hvp(V))
    scale = np.abs(ref_grad).max()
    np.testing.assert_allclose(backend.to_numpy(grad), ref_grad, rtol=0, atol=1e-13 * scale)
    scale = np.abs(ref_hvp).max()
    np.testing.assert_allclose(backend.to_numpy(hvp), ref_hvp, rtol=0, atol=1e-13 * scale)


@pytest.mark.parametrize("b", [1, 9])  # Jᵀ's two product orders (b < 8, b ≥ 8)
@pytest.mark.parametrize("zero_mean", [False, True])
def test_jacobian_matches_finite_differences(backend, zero_mean: bool, b: int) -> None:
    """Jᵀw = ∂θ⟨∇R(x), w⟩, every entry of θ (filters and each width's exponent) against a
    central difference.  Student-t at widths ≥ 0.05 on responses of size ≈ 1 and
    exponents ≤ 0 keep third derivatives ≲ 1e4·‖Jᵀw‖-sized at h = 1e-5: truncation
    h²·1e4 ≈ 1e-6 relative at worst, round-off ε‖∇R‖‖w‖/h ≈ 1e-10; tolerance 1e-5."""
    rng = np.random.default_rng(3)
    xp = backend.xp
    foe = mixture(zero_mean=zero_mean)
    theta = random_theta(rng)
    X = backend.asarray(rng.random((2, N)))
    W = rng.standard_normal((2, N, b))

    def pairing(t: np.ndarray, col: int) -> float:
        grad = backend.to_numpy(foe.rows_value_and_grad(xp, X, backend.asarray(t),
                                                        value=False)[1])
        return float(np.sum(grad * W[:, :, col]))

    jt = backend.to_numpy(foe.linearize(xp, X, backend.asarray(theta)).jac_t(
        backend.asarray(W)))
    assert jt.shape == (2, theta.size, b)
    h = 1e-5
    for col in sorted({0, b - 1}):
        fd = np.empty(theta.size)
        for i in range(theta.size):
            e = np.zeros(theta.size)
            e[i] = h
            fd[i] = (pairing(theta + e.reshape(theta.shape), col)
                     - pairing(theta - e.reshape(theta.shape), col)) / (2 * h)
        got = jt[:, :, col].sum(axis=0)
        assert np.linalg.norm(got - fd) <= 1e-5 * np.linalg.norm(fd)
        exps = got.reshape(theta.shape)[:, 9:]
        assert np.all(np.abs(exps) > 1e-6 * np.abs(got).max())  # every width is felt


@pytest.mark.parametrize("operator", ["blur", "inpainting"])
def test_imaging_problem_derivatives_with_widths(backend, operator: str) -> None:
    """The imaging problem's ∇ₓf, HVP and Jᵀ against central differences, by the checks of
    tests/test_imaging_problem.py (their tolerances; widths ≥ γ/4 = 0.05 there)."""
    reg = FieldsOfExperts(IMAGE_SHAPE, 3, 4, expert="student_t", gamma=0.2, widths=WIDTHS,
                          boundary="symmetric")
    problem = ImagingProblem.from_image(image(), backend, OPERATORS[operator](), reg, seed=2)
    check_derivatives(backend, problem, random_theta(np.random.default_rng(4)))


@pytest.mark.parametrize(("learn", "filters_on", "exps_on"),
                         [("both", 1, 1), ("filters", 1, 0), ("exponents", 0, 1)])
def test_mask_covers_every_width(learn: str, filters_on: int, exps_on: int) -> None:
    mask = FieldsOfExperts(SHAPE, 3, 2, expert="student_t", widths=WIDTHS,
                           learn=learn).mask_host().reshape(2, 12)
    assert (mask[:, :9] == filters_on).all() and (mask[:, 9:] == exps_on).all()


def test_initial_theta_packs_exponents_per_width() -> None:
    filters = dct_filters(3)[:4]
    theta = initial_theta(filters, -2.0, 3)
    assert theta.shape == (4, 12) and np.all(theta[:, 9:] == -2.0)
    per_filter = initial_theta(filters, np.arange(4.0), 2)
    np.testing.assert_array_equal(per_filter[:, 9:], np.repeat(np.arange(4.0)[:, None], 2, 1))
    full = np.arange(12.0).reshape(4, 3)
    np.testing.assert_array_equal(initial_theta(filters, full, 3)[:, 9:], full)
    np.testing.assert_array_equal(initial_theta(filters, -1.0)[:, :9], filters.reshape(4, 9))


@pytest.mark.parametrize("widths", [(), (1.0, 1.0), (0.0, 1.0), (-1.0,)])
def test_bad_widths_are_refused(widths) -> None:
    with pytest.raises(ValueError, match="widths must be distinct positive multipliers"):
        mixture(widths=widths)
    assert "widths=[0.25, 1.0, 4.0]" in repr(mixture())
    with pytest.raises(ValueError, match="'lorentzian' has no width"):
        FieldsOfExperts(SHAPE, 3, 4, expert="lorentzian", widths=(0.5, 2.0))


def test_config_checks_and_factory() -> None:
    from framework.experiment.config import ConfigError, ProblemConfig, validate
    from problems.factory import build_problems

    cfg = ProblemConfig(num_samples=2, regularizer="tv_foe", kernel_size=3, num_filters=8,
                        expert="student_t", init_exponent=-4.0, expert_widths=[0.5, 1.0, 2.0])
    built = build_problems(cfg, get_backend("numpy"), 0)
    assert built.theta0.shape == (1 + 8 * 12,) and np.all(built.mask == 1)
    foe_theta = built.theta0[1:].reshape(8, 12)
    np.testing.assert_array_equal(foe_theta[:, :9], dct_filters(3).reshape(8, 9))
    assert np.all(foe_theta[:, 9:] == -4.0)
    assert built.problems[0].regularizer.parts[1].widths == (0.5, 1.0, 2.0)
    for bad, match in [([], "distinct positive"), ([1.0, 1.0], "distinct positive"),
                       ([0.5, -1.0], "distinct positive")]:
        with pytest.raises(ConfigError, match=f"^problem.expert_widths: must be {match}"):
            validate({"problem": {"expert_widths": bad}})
    with pytest.raises(ConfigError, match="^problem.expert_widths: mixes"):
        validate({"problem": {"regularizer": "tv", "expert_widths": [0.5, 2.0]}})
    with pytest.raises(ConfigError, match="^problem.expert_widths: expert lorentzian has no"):
        validate({"problem": {"expert": "lorentzian", "expert_widths": [0.5, 2.0]}})
    one = build_problems(ProblemConfig(num_samples=1, kernel_size=3, num_filters=8),
                         get_backend("numpy"), 0)  # the default: one exponent per filter
    assert one.theta0.shape == (8, 10) and one.problems[0].regularizer.widths == (1.0,)

