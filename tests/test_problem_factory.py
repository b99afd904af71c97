"""build_problems: seeded data keyed by image index."""

from __future__ import annotations

import dataclasses

import numpy as np

from backends import get_backend
from framework.experiment.config import ProblemConfig
from problems.factory import build_problems


def _data(cfg: ProblemConfig, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    be = get_backend("numpy")
    return [(np.asarray(p.operator.mask), be.to_numpy(p.y))
            for p in build_problems(cfg, be, seed).problems]


def test_an_image_keeps_its_mask_and_noise_in_any_range() -> None:
    base = ProblemConfig(num_samples=6)
    whole = _data(base)
    part = _data(dataclasses.replace(base, start=2, num_samples=3))
    for (mask_a, y_a), (mask_b, y_b) in zip(whole[2:5], part, strict=True):
        np.testing.assert_array_equal(mask_a, mask_b)
        np.testing.assert_array_equal(y_a, y_b)
    # another seed draws other masks
    assert not np.array_equal(_data(base, seed=1)[0][0], whole[0][0])


def test_held_out_images_do_not_reuse_training_draws() -> None:
    train = _data(ProblemConfig(num_samples=8))
    held_out = _data(ProblemConfig(num_samples=8, start=8))
    for (mask_t, _), (mask_h, _) in zip(train, held_out, strict=True):
        assert not np.array_equal(mask_t, mask_h)


def test_the_test_split_has_its_own_seeds() -> None:
    from problems.factory import _sample_seeds

    train, test = _sample_seeds(0, 4), _sample_seeds(0, 4, "test")
    assert not set(train) & set(test)
    assert _sample_seeds(0, 4, "train") == train
