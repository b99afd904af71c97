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


def test_crops_per_image_gives_samples_in_image_order(tmp_path) -> None:
    """With problem.crops_per_image = 2, samples 2i and 2i + 1 are image i's two crops
    (the loader's), sample 3..4 from start = 3; task=evaluate's held-out images start
    after the images training cropped, one crop each."""
    from test_datasets import make_jpegs  # tests/ is on sys.path (rootdir)

    from framework.experiment.config import Config, EvaluateConfig
    from framework.experiment.evaluate import prepare_evaluation
    from framework.experiment.theta_file import write_theta
    from problems.datasets import load_bsds300

    make_jpegs(tmp_path, 4)
    cfg = ProblemConfig(name="bsds_deblur", dataset="bsds300", data_path=str(tmp_path),
                        crop=16, crops_per_image=2, num_samples=5, operator="blur",
                        blur_sigma=1.0, regularizer="tv")
    be = get_backend("numpy")
    crops = load_bsds300(tmp_path, "train", crop=16, count=3, per_image=2)
    truths = [be.to_numpy(p.x_true) for p in build_problems(cfg, be, 0).problems]
    assert len(truths) == 5
    for k, truth in enumerate(truths):
        np.testing.assert_array_equal(truth, crops[k].reshape(-1))
    later = build_problems(dataclasses.replace(cfg, start=3, num_samples=2), be, 0).problems
    for k, p in enumerate(later):
        np.testing.assert_array_equal(be.to_numpy(p.x_true), crops[3 + k].reshape(-1))
    write_theta(tmp_path / "theta.npz", np.array([-1.0]))
    _, held_out = prepare_evaluation(Config(problem=cfg, evaluate=EvaluateConfig(
        theta_path=str(tmp_path / "theta.npz"), num_samples=1)))
    assert (held_out.start, held_out.crops_per_image, held_out.split) == (3, 1, "train")
    # every sample's noise is its own: the training crops' and the held-out image's
    shown = build_problems(dataclasses.replace(held_out, num_samples=1), be, 0).problems
    noise = [be.to_numpy(p.y) - be.to_numpy(p.operator.apply(p.x_true))
             for p in (*build_problems(cfg, be, 0).problems, *shown)]
    assert len({np.round(e, 12).tobytes() for e in noise}) == 6
    # crop 0 of an image has the noise of one crop per image
    image1 = build_problems(dataclasses.replace(cfg, crops_per_image=1, num_samples=3), be,
                            0).problems[1]
    np.testing.assert_array_equal(noise[2], be.to_numpy(image1.y)
                                  - be.to_numpy(image1.operator.apply(image1.x_true)))
