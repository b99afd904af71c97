"""The Huber-TV baseline of ``task=evaluate``: the weight grid search."""

from __future__ import annotations

import numpy as np
import pytest

from backends import get_backend
from framework.bilevel.engine import BilevelEngine, EngineConfig
from framework.experiment.evaluate import best_tv_weight, reconstructions
from problems.base import psnr
from problems.imaging import ImagingProblem
from problems.operators import Identity
from problems.tv import TotalVariation

SHAPE = (16, 16)


def image() -> np.ndarray:
    t = np.linspace(0, 1, 16)
    return 0.5 + 0.3 * np.sin(6 * t)[:, None] * np.cos(4 * t)[None, :] + 0.2 * (t[None, :] > 0.5)


def test_best_tv_weight_picks_the_best_grid_point() -> None:
    problem = ImagingProblem.from_image(
        image(), get_backend("numpy"), Identity(SHAPE), TotalVariation(SHAPE), noise_level=0.2
    )
    grid = [-4.0, -1.5, 3.0]
    result = best_tv_weight([problem], grid)
    assert result.grid == tuple(grid) and result.psnrs.shape == (3, 1)
    assert result.best_psnr == result.psnrs.max()
    assert result.best_theta == -1.5  # neither almost no smoothing nor a flat image
    # each PSNR is that of the TV lower-level minimiser, here SciPy's L-BFGS-B from y: the
    # problem is strongly convex, so both solutions (gtol 1e-6) agree far below 1e-3 dB
    scipy_optimize = pytest.importorskip("scipy.optimize")
    theta = np.array([-1.5])
    x = scipy_optimize.minimize(
        lambda v: problem.lower_objective(v, theta), problem.y,
        jac=lambda v: problem.lower_grad(v, theta), method="L-BFGS-B",
        options={"gtol": 1e-9, "maxiter": 5000},
    ).x
    assert result.psnrs[1, 0] == pytest.approx(psnr(x, problem.x_true), abs=1e-3)


def test_a_normalised_sample_is_tv_with_its_weight_and_smoothing_scaled() -> None:
    # Posed on its data's scale s, a sample solves ½‖x̃ − y/s‖² + λ TV_γ(x̃) + (ε/2)‖x̃‖².
    # Huber-TV is homogeneous in the sense TV_γ(x/s) = TV_{sγ}(x)/s, so s·x̃* is the
    # minimiser of ½‖x − y‖² + sλ TV_{sγ}(x) + (ε/2)‖x‖²: the plain problem with weight and
    # smoothing scaled.  Both are 1-strongly convex (A = I), so ‖x − x*‖ ≤ ‖∇f(x)‖ ≤ gtol
    # = 1e-10 for each, and s·x̃ and x agree to (1 + s)·1e-10.
    backend, gamma, log_weight = get_backend("numpy"), 0.05, -1.5
    normalised = ImagingProblem.from_image(image(), backend, Identity(SHAPE),
                                           TotalVariation(SHAPE, gamma=gamma), noise_level=0.2,
                                           normalize=True)
    plain_y = ImagingProblem.from_image(image(), backend, Identity(SHAPE), TotalVariation(SHAPE),
                                        noise_level=0.2).y
    s = float(np.sqrt(np.mean(plain_y**2)))
    assert normalised.scale == pytest.approx(s, rel=1e-15) and abs(s - 1) > 0.3
    np.testing.assert_allclose(normalised.y * s, plain_y, rtol=1e-15)
    np.testing.assert_allclose(normalised.x_true * s, image().ravel(), rtol=1e-15)
    scaled = ImagingProblem.from_image(image(), backend, Identity(SHAPE),
                                       TotalVariation(SHAPE, gamma=s * gamma), noise_level=0.2)
    config = EngineConfig(lower_gtol=1e-10, lower_maxiter=5000)
    x_n, psnr_n = reconstructions(BilevelEngine([normalised], config), np.array([log_weight]))
    x_p, psnr_p = reconstructions(BilevelEngine([scaled], config),
                                  np.array([log_weight + np.log10(s)]))
    np.testing.assert_allclose(x_n, x_p, rtol=0, atol=(1 + s) * 1e-10)
    # reconstructions reports the image: s·x̃, and its PSNR against the true image
    assert psnr_n[0] == pytest.approx(psnr(x_n[0], image().ravel()), abs=1e-12)
    assert psnr_n[0] == pytest.approx(psnr_p[0], abs=1e-6)
