"""The Huber-TV baseline of ``task=evaluate``: the weight grid search."""

from __future__ import annotations

import numpy as np
import pytest

from backends import get_backend
from framework.experiment.evaluate import best_tv_weight
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
