"""Fields of Experts: convolutions against SciPy, experts, filter banks, TV pieces."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal
from array_api_compat import device as device_of

from problems.experts import EXPERT_NAMES, Expert
from problems.foe import FieldsOfExperts, dct_filters, gaussian_filters, initial_theta
from problems.tv import TotalVariation

SHAPE = (16, 14)
N = SHAPE[0] * SHAPE[1]


def numpy_phi(name: str, z: np.ndarray, gamma: float) -> np.ndarray:
    if name == "l2":
        return z**2 / 2
    if name == "huber":
        return np.where(np.abs(z) <= gamma, z**2 / (2 * gamma), np.abs(z) - gamma / 2)
    if name == "smooth_l1":
        return np.sqrt(gamma**2 + z**2)
    if name == "student_t":
        return np.log(1 + (z / gamma) ** 2)
    return np.log(1 + z**2)


BOUNDARIES = ["zero", "symmetric"]
SCIPY_BOUNDARY = {"zero": "fill", "symmetric": "symm"}


@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("k", [3, 5, 7])
def test_convolution_matches_scipy(backend, k: int, boundary: str) -> None:
    rng = np.random.default_rng(k)
    img = rng.standard_normal(SHAPE)
    filters = rng.standard_normal((3, k, k))
    foe = FieldsOfExperts(SHAPE, k, 3, boundary=boundary)
    xp = backend.xp
    x = backend.asarray(img.reshape(1, N))
    sx, z = foe.responses(xp, x, backend.asarray(filters.reshape(3, k * k)))
    assert device_of(z) == backend.device
    ref = np.stack([
        scipy.signal.convolve2d(img, f, mode="same", boundary=SCIPY_BOUNDARY[boundary]).ravel()
        for f in filters])
    np.testing.assert_allclose(backend.to_numpy(z), ref, rtol=0, atol=1e-13)
    samples = foe.stack_samples(xp, xp.reshape(x, (1, N, 1)))  # Jᵀ's layout: the same copies
    np.testing.assert_array_equal(backend.to_numpy(samples).reshape(k * k, N),
                                  backend.to_numpy(sx))


@pytest.mark.parametrize("k", [3, 5, 7])
def test_symmetric_boundary_changes_only_the_border_ring(backend, k: int) -> None:
    """Responses within r = K // 2 of the border differ from the zero boundary's (each of
    them, for random data); farther in, both read the image only and agree."""
    rng = np.random.default_rng(10 + k)
    xp, r = backend.xp, k // 2
    x = backend.asarray(rng.standard_normal((1, N)))
    filters = backend.asarray(rng.standard_normal((3, k * k)))
    zero = backend.to_numpy(FieldsOfExperts(SHAPE, k, 3).responses(xp, x, filters)[1])
    symm = FieldsOfExperts(SHAPE, k, 3, boundary="symmetric").responses(xp, x, filters)[1]
    diff = np.abs(backend.to_numpy(symm) - zero).reshape(3, *SHAPE)
    ring = np.ones(SHAPE, dtype=bool)
    ring[r:-r, r:-r] = False
    assert diff[:, ring].min() > 1e-6
    assert diff[:, ~ring].max() <= 1e-13


def test_symmetric_boundary_does_not_penalise_a_constant_image(backend) -> None:
    """Zero-mean filters see nothing in a constant image when the border reflects it:
    R = Σ φ(0) = 0 (Lorentzian), ∇R = 0; the zero boundary penalises the border pixels."""
    theta = backend.asarray(initial_theta(dct_filters(3), 0.0))
    x = backend.asarray(np.full((1, N), 0.7))
    xp = backend.xp
    symm = FieldsOfExperts(SHAPE, 3, 8, boundary="symmetric")
    value, grad = symm.rows_value_and_grad(xp, x, theta)
    assert float(value[0]) == pytest.approx(0.0, abs=1e-20)
    assert np.abs(backend.to_numpy(grad)).max() <= 1e-14
    value, grad = FieldsOfExperts(SHAPE, 3, 8).rows_value_and_grad(xp, x, theta)
    assert float(value[0]) > 1.0
    g = np.abs(backend.to_numpy(grad)).reshape(SHAPE)
    assert g[0].min() > 1e-3 and g[2:-2, 2:-2].max() <= 1e-14


@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize(("bsz", "b"), [(1, 1), (2, 3)])  # (1, 1): NumPy's strided adjoint
def test_convolution_block_and_adjoint(backend, boundary: str, bsz: int, b: int) -> None:
    rng = np.random.default_rng(0)
    xp = backend.xp
    foe = FieldsOfExperts(SHAPE, 5, 4, boundary=boundary)
    filters = backend.asarray(rng.standard_normal((4, 25)))
    vh = rng.standard_normal((bsz, N, b))  # bsz samples, a block of b each
    uh = rng.standard_normal((4, N, bsz, b))  # pixel-major, as the stack's columns
    zb = backend.to_numpy(xp.matmul(filters, foe.stack(xp, backend.asarray(vh))))
    zb = zb.reshape(4, N, bsz, b)
    for i in range(bsz):
        for j in range(b):
            _, zj = foe.responses(xp, backend.asarray(vh[i, :, j].reshape(1, N)), filters)
            np.testing.assert_allclose(zb[:, :, i, j], backend.to_numpy(zj), atol=1e-14)
    adj = foe.adjoint(xp, filters, backend.asarray(uh.reshape(4, -1)), bsz, b)
    assert device_of(adj) == backend.device and adj.shape == (bsz, N, b)
    # ⟨K v, u⟩ = ⟨v, Kᵀ u⟩: each side a sum of ~4·N·B·b products, so its round-off is a
    # few ulps of ‖K v‖‖u‖ (Cauchy–Schwarz); a missing or misplaced fold is O(1) of that
    lhs = float(np.sum(zb * uh))
    rhs = float(np.sum(vh * backend.to_numpy(adj)))
    assert abs(lhs - rhs) <= 1e-13 * np.linalg.norm(zb) * np.linalg.norm(uh)


@pytest.mark.parametrize("name", EXPERT_NAMES)
def test_expert_derivatives(name: str) -> None:
    gamma = 0.3
    expert = Expert(name, gamma)
    z = np.linspace(-2.0, 2.0, 41) + 0.0123  # avoid the Huber kinks at ±γ
    phi, d1, d2 = expert.value(z), expert.d1(z), expert.d2(z)
    np.testing.assert_allclose(phi, numpy_phi(name, z, gamma), rtol=1e-12)
    h = 1e-6
    fd1 = (numpy_phi(name, z + h, gamma) - numpy_phi(name, z - h, gamma)) / (2 * h)
    fd2 = (expert.d1(z + h) - expert.d1(z - h)) / (2 * h)
    np.testing.assert_allclose(d1, fd1, rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(d2, fd2, rtol=1e-6, atol=1e-7)


def test_huber_is_continuous_at_gamma() -> None:
    e = Expert("huber", 0.5)
    below, above = np.array([0.5 - 1e-12]), np.array([0.5 + 1e-12])
    assert e.value(below)[0] == pytest.approx(e.value(above)[0], abs=1e-11)
    assert e.d1(below)[0] == pytest.approx(e.d1(above)[0], abs=1e-11)


def test_unknown_expert_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="cauchy.*l2.*huber.*smooth_l1.*lorentzian"):
        FieldsOfExperts(SHAPE, 3, 2, expert="cauchy")


def test_boundary_is_checked_and_named_in_the_repr() -> None:
    with pytest.raises(ValueError, match="boundary.*'zero', 'symmetric'.*'reflect'"):
        FieldsOfExperts(SHAPE, 3, 2, boundary="reflect")
    with pytest.raises(ValueError, match="symmetric.*3 pixels"):
        FieldsOfExperts((2, 9), 7, 2, boundary="symmetric")
    assert "boundary='zero'" in repr(FieldsOfExperts(SHAPE, 3, 2))
    assert "boundary='symmetric'" in repr(FieldsOfExperts(SHAPE, 3, 2, boundary="symmetric"))


@pytest.mark.parametrize("k", [3, 5])
def test_dct_filters_orthonormal_without_constant(k: int) -> None:
    f = dct_filters(k)
    assert f.shape == (k * k - 1, k, k)
    flat = f.reshape(k * k - 1, -1)
    np.testing.assert_allclose(flat @ flat.T, np.eye(k * k - 1), atol=1e-14)
    np.testing.assert_allclose(flat.sum(axis=1), 0.0, atol=1e-14)
    # independent reference: rows of SciPy's orthonormal DCT-II matrix
    import scipy.fft

    c = scipy.fft.dct(np.eye(k), norm="ortho", axis=0)  # c[u, i]
    np.testing.assert_allclose(f[0], np.outer(c[0], c[1]), atol=1e-14)


def test_gaussian_filters_seeded() -> None:
    a = gaussian_filters(5, 8, seed=1)
    np.testing.assert_array_equal(a, gaussian_filters(5, 8, seed=1))
    assert not np.array_equal(a, gaussian_filters(5, 8, seed=2))
    np.testing.assert_allclose(a.sum(axis=(1, 2)), 0.0, atol=1e-14)
    np.testing.assert_allclose(np.linalg.norm(a.reshape(8, -1), axis=1), 1.0)


@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("name", EXPERT_NAMES)
def test_foe_value_matches_reference(backend, name: str, boundary: str) -> None:
    rng = np.random.default_rng(5)
    img = rng.random(SHAPE)
    foe = FieldsOfExperts(SHAPE, 3, 4, expert=name, gamma=0.1, boundary=boundary)
    theta = initial_theta(gaussian_filters(3, 4, seed=2), rng.uniform(-1, 1, 4))
    value = foe.value(backend.asarray(img.ravel()), backend.asarray(theta))
    assert device_of(value) == backend.device
    responses = [scipy.signal.convolve2d(img, theta[f, :9].reshape(3, 3), "same",
                                         boundary=SCIPY_BOUNDARY[boundary]) for f in range(4)]
    ref = sum(10 ** theta[f, -1] * numpy_phi(name, responses[f], 0.1).sum() for f in range(4))
    assert float(value) == pytest.approx(ref, rel=1e-13)


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_zero_mean_filters_are_theta_rows_centred(backend, boundary: str) -> None:
    """With ``zero_mean`` filter f is θ's row minus its mean: the value is SciPy's with the
    centred filters, and shifting a row by a constant changes nothing."""
    rng = np.random.default_rng(11)
    img = rng.random(SHAPE)
    foe = FieldsOfExperts(SHAPE, 3, 4, expert="student_t", gamma=0.1, boundary=boundary,
                          zero_mean=True)
    theta = initial_theta(rng.standard_normal((4, 3, 3)), rng.uniform(-1, 1, 4))
    centred = theta[:, :9] - theta[:, :9].mean(axis=1, keepdims=True)
    responses = [scipy.signal.convolve2d(img, centred[f].reshape(3, 3), "same",
                                         boundary=SCIPY_BOUNDARY[boundary]) for f in range(4)]
    ref = sum(10 ** theta[f, -1] * numpy_phi("student_t", responses[f], 0.1).sum()
              for f in range(4))
    x = backend.asarray(img.ravel())
    assert float(foe.value(x, backend.asarray(theta))) == pytest.approx(ref, rel=1e-13)
    shifted = theta.copy()
    shifted[:, :9] += rng.standard_normal((4, 1))
    assert float(foe.value(x, backend.asarray(shifted))) == pytest.approx(ref, rel=1e-13)
    assert "zero_mean=True" in repr(foe)


@pytest.mark.parametrize("zero_mean", [False, True])
def test_foe_jacobian_matches_finite_differences(backend, zero_mean: bool) -> None:
    """Jᵀw = ∂θ⟨∇R(x), w⟩ against central differences along a random direction (one with
    each filter's mean in it: ``zero_mean`` must then see none of that part).  Student-t
    with γ = 0.5 on responses of size ≈ 1 is smooth at scale 1, so with h = 1e-4 the
    truncation is ≈ h² times a third derivative of size ≈ ‖Jᵀw‖: 1e-6 relative holds."""
    rng = np.random.default_rng(12)
    xp = backend.xp
    foe = FieldsOfExperts(SHAPE, 3, 4, expert="student_t", gamma=0.5, boundary="symmetric",
                          zero_mean=zero_mean)
    theta = initial_theta(rng.standard_normal((4, 3, 3)), rng.uniform(-1, 0, 4))
    X = backend.asarray(rng.random((2, N)))
    W = rng.standard_normal((2, N))

    def pairing(t: np.ndarray) -> float:
        grad = backend.to_numpy(foe.rows_value_and_grad(xp, X, backend.asarray(t),
                                                        value=False)[1])
        return float(np.sum(grad * W))

    jt = backend.to_numpy(foe.linearize(xp, X, backend.asarray(theta)).jac_t(
        backend.asarray(W[:, :, None])))[:, :, 0].sum(axis=0).reshape(4, 10)
    direction = rng.standard_normal(theta.shape)
    h = 1e-4
    fd = (pairing(theta + h * direction) - pairing(theta - h * direction)) / (2 * h)
    assert float(np.sum(jt * direction)) == pytest.approx(fd, rel=1e-6)
    filter_sums = jt[:, :9].sum(axis=1)
    if zero_mean:  # no component along a filter's mean: the projection's chain rule
        np.testing.assert_allclose(filter_sums, 0.0, atol=1e-12 * np.abs(jt).max())
    else:  # a free filter does feel its mean (the check above would pass vacuously if not)
        assert np.abs(filter_sums).max() > 1e-3 * np.abs(jt).max()


@pytest.mark.parametrize(
    ("learn", "filters_on", "exps_on"),
    [("both", 1, 1), ("filters", 1, 0), ("exponents", 0, 1)],
)
def test_learn_mask(learn: str, filters_on: int, exps_on: int) -> None:
    mask = FieldsOfExperts(SHAPE, 3, 2, learn=learn).mask_host().reshape(2, 10)
    assert (mask[:, :9] == filters_on).all() and (mask[:, 9] == exps_on).all()
    with pytest.raises(ValueError, match="learn"):
        FieldsOfExperts(SHAPE, 3, 2, learn="weights")


def test_tv_differences_adjoint_and_value(backend) -> None:
    rng = np.random.default_rng(6)
    tv = TotalVariation(SHAPE, gamma=0.05)
    xp = backend.xp
    xh, ph, qh = rng.standard_normal((3, N))
    dx, dy = tv.diff(xp, backend.asarray(xh[None, :, None]))
    img = xh.reshape(SHAPE)
    ref_dx = np.zeros(SHAPE)
    ref_dx[:, :-1] = np.diff(img, axis=1)
    ref_dy = np.zeros(SHAPE)
    ref_dy[:-1] = np.diff(img, axis=0)
    np.testing.assert_allclose(backend.to_numpy(dx)[0, ..., 0], ref_dx, atol=1e-15)
    np.testing.assert_allclose(backend.to_numpy(dy)[0, ..., 0], ref_dy, atol=1e-15)
    p = backend.asarray(ph.reshape(1, *SHAPE, 1))
    q = backend.asarray(qh.reshape(1, *SHAPE, 1))
    adj = backend.to_numpy(tv.diff_adjoint(xp, p, q))[0, :, 0]
    lhs = np.sum(ref_dx.ravel() * ph) + np.sum(ref_dy.ravel() * qh)
    assert abs(lhs - xh @ adj) <= 1e-12 * abs(lhs)
    t = np.sqrt(ref_dx**2 + ref_dy**2)
    huber = np.where(t <= 0.05, t**2 / 0.1, t - 0.025).sum()
    value = tv.value(backend.asarray(xh), backend.asarray([0.5]))
    assert float(value) == pytest.approx(10**0.5 * huber, rel=1e-13)


@pytest.mark.parametrize("name", EXPERT_NAMES)
def test_fused_value_and_first_derivative_match_the_separate_ones(name: str) -> None:
    expert = Expert(name, 0.03)
    z = np.concatenate([np.linspace(-2.0, 2.0, 41) + 0.0123, [1e-9, -3e-12]])
    value, d1 = expert.value_and_d1(z)
    np.testing.assert_allclose(value, expert.value(z), rtol=1e-14, atol=0)
    np.testing.assert_allclose(d1, expert.d1(z), rtol=1e-14, atol=0)
