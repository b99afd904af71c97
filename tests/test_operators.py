"""Forward operators: adjoints, references from SciPy, blocks, seeding and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal
from array_api_compat import device as device_of

from problems.operators import (
    GaussianBlur,
    Identity,
    Inpainting,
    add_relative_noise,
    gaussian_kernel_1d,
)

SHAPE = (16, 12)
N = SHAPE[0] * SHAPE[1]


def make_operators() -> list:
    return [Identity(SHAPE), Inpainting(SHAPE, 0.4, seed=3), GaussianBlur(SHAPE, 1.2)]


@pytest.mark.parametrize("op", make_operators(), ids=repr)
def test_adjoint_dot_test(backend, op) -> None:
    rng = np.random.default_rng(0)
    xh, yh = rng.standard_normal((2, N))
    x, y = backend.asarray(xh), backend.asarray(yh)
    ax, aty = op.apply(x), op.adjoint(y)
    assert device_of(ax) == backend.device and device_of(aty) == backend.device
    lhs = float(backend.xp.linalg.vecdot(ax, y))
    rhs = float(backend.xp.linalg.vecdot(x, aty))
    assert abs(lhs - rhs) <= 1e-12 * abs(lhs)
    normal = backend.to_numpy(op.normal(x))
    np.testing.assert_allclose(normal, backend.to_numpy(op.adjoint(op.apply(x))), atol=1e-14)


@pytest.mark.parametrize("op", make_operators(), ids=repr)
def test_block_equals_columns(backend, op) -> None:
    vh = np.random.default_rng(1).standard_normal((1, N, 4))  # one sample, a block of 4
    block = backend.to_numpy(op.apply(backend.asarray(vh)))
    assert block.shape == (1, N, 4)
    for j in range(4):
        col = backend.to_numpy(op.apply(backend.asarray(vh[0, :, j])))
        np.testing.assert_allclose(block[0, :, j], col, rtol=0, atol=1e-15)


def test_blur_matches_scipy_convolve2d(backend) -> None:
    op = GaussianBlur(SHAPE, 1.2)
    img = np.random.default_rng(2).random(SHAPE)
    g = gaussian_kernel_1d(1.2)
    ref = scipy.signal.convolve2d(img, np.outer(g, g), mode="same", boundary="fill")
    out = backend.to_numpy(op.apply(backend.asarray(img.ravel()))).reshape(SHAPE)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-14)


@pytest.mark.parametrize(("sigma", "radius"), [(0.5, 2), (1.0, 4), (1.5, 6), (0.1, 1)])
def test_blur_kernel_radius_and_normalisation(sigma: float, radius: int) -> None:
    g = gaussian_kernel_1d(sigma)
    assert g.size == 2 * radius + 1
    assert g.sum() == pytest.approx(1.0, abs=1e-15)
    np.testing.assert_allclose(g, g[::-1])
    assert np.argmax(g) == radius


def test_inpainting_mask_fraction_and_seed() -> None:
    op = Inpainting((10, 10), 0.3, seed=5)
    assert op.mask.shape == (100,)
    assert set(np.unique(op.mask)) <= {0.0, 1.0}
    assert int((op.mask == 0).sum()) == 30
    np.testing.assert_array_equal(op.mask, Inpainting((10, 10), 0.3, seed=5).mask)
    assert not np.array_equal(op.mask, Inpainting((10, 10), 0.3, seed=6).mask)
    x = np.arange(100.0)
    np.testing.assert_array_equal(op.apply(x), x * op.mask)
    assert Inpainting((10, 10), 0.0).mask.all()


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5, float("nan")])
def test_inpainting_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        Inpainting((8, 8), fraction)


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan")])
def test_blur_rejects_bad_sigma(sigma: float) -> None:
    with pytest.raises(ValueError, match="sigma"):
        GaussianBlur((8, 8), sigma)


def test_operator_rejects_wrong_length() -> None:
    with pytest.raises(ValueError, match="shape"):
        GaussianBlur((8, 8), 1.0).apply(np.zeros(10))


def test_relative_noise(backend) -> None:
    clean_h = np.random.default_rng(4).random(N)
    clean = backend.asarray(clean_h)
    y = add_relative_noise(clean, 0.1, seed=7)
    assert device_of(y) == backend.device
    yh = backend.to_numpy(y)
    assert np.linalg.norm(yh - clean_h) == pytest.approx(0.1 * np.linalg.norm(clean_h), rel=1e-12)
    np.testing.assert_array_equal(yh, backend.to_numpy(add_relative_noise(clean, 0.1, seed=7)))
    e = np.random.default_rng(7).standard_normal(N)
    expected = clean_h + 0.1 * np.linalg.norm(clean_h) * e / np.linalg.norm(e)
    np.testing.assert_allclose(yh, expected, rtol=1e-14)
    with pytest.raises(ValueError, match="noise_level"):
        add_relative_noise(clean, -0.1, seed=0)
