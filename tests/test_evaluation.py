"""The Huber-TV baseline of ``task=evaluate``: the weight grid search."""

from __future__ import annotations

import numpy as np

from backends import get_backend
from framework.experiment.evaluate import best_tv_weight
from problems.imaging import ImagingProblem
from problems.operators import Identity
from problems.tv import TotalVariation

SHAPE = (16, 16)


def image() -> np.ndarray:
    t = np.linspace(0, 1, 16)
    return 0.5 + 0.3 * np.sin(6 * t)[:, None] * np.cos(4 * t)[None, :] + 0.2 * (t[None, :] > 0.5)


def test_best_tv_weight_picks_the_best_grid_point() -> None:
    def factory() -> ImagingProblem:
        return ImagingProblem.from_image(
            image(), get_backend("numpy"), Identity(SHAPE), TotalVariation(SHAPE), noise_level=0.2
        )

    grid = [-4.0, -1.5, 3.0]
    result = best_tv_weight(factory, grid)
    assert result.grid == tuple(grid) and len(result.psnrs) == 3
    assert result.best_psnr == max(result.psnrs)
    assert result.best_theta == -1.5  # neither almost no smoothing nor a flat image
