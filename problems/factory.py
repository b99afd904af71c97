"""Build the samples of a run from its ``problem`` config: ``build_problems``.

Every random draw (noise, masks, the quadratic matrices, random filters) is seeded by child j
of ``numpy.random.SeedSequence(seed)`` for image index j (``problem.start`` + position), so an
image keeps its mask and noise whichever range loads it and held-out images never share a
training image's draws (BSDS300's test split: ``SeedSequence([seed, 1])``).  With
``problem.crops_per_image`` k > 1 sample s is crop s mod k of image s // k: crop 0 is seeded
as above, crop c > 0 by child s // k of ``SeedSequence([seed, 2, c])`` (``[seed, 3, c]``
on the test split), so held-out images (one crop each) share no training crop's draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from problems.composite import SumRegularizer
from problems.datasets import (
    MNIST_IMAGES,
    images_spanned,
    load_bsds300,
    load_embedded_mnist,
    load_mnist,
)
from problems.foe import FieldsOfExperts, dct_filters, gaussian_filters, initial_theta
from problems.imaging import ImagingProblem
from problems.operators import GaussianBlur, Identity, Inpainting
from problems.quadratic import QuadraticProblem
from problems.tv import TotalVariation


@dataclass(frozen=True)
class ProblemSet:
    """The samples of a run, the initial θ (host NumPy, ``theta_shape``) and its mask
    (host 0/1 array of θ's shape; 1 = learned)."""

    problems: tuple[Any, ...]
    theta0: np.ndarray
    mask: np.ndarray
    description: str

    def __len__(self) -> int:
        return len(self.problems)


def _sample_seeds(seed: int, count: int, split: str = "train", crop: int = 0) -> list[int]:
    """The seeds of images 0 … count − 1 of ``split`` (of their crop number ``crop``)."""
    test = split != "train"
    entropy = ([seed, 1] if test else seed) if crop == 0 else [seed, 2 + test, crop]
    children = np.random.SeedSequence(entropy).spawn(count)
    return [int(c.generate_state(1, dtype=np.uint32)[0]) for c in children]


def _images(cfg: Any) -> np.ndarray:
    if cfg.dataset == "embedded_mnist":
        images = load_embedded_mnist().images
        if cfg.start + cfg.num_samples > images.shape[0]:
            raise ValueError(
                f"problem.num_samples: the embedded MNIST sample holds {images.shape[0]} "
                f"digits; asked for {cfg.num_samples} from start={cfg.start}"
            )
        return images[cfg.start : cfg.start + cfg.num_samples]
    if cfg.dataset == "mnist":
        path = Path(cfg.data_path).expanduser()
        if path.is_dir():
            path = path / MNIST_IMAGES
        return load_mnist(path, count=cfg.num_samples, start=cfg.start)
    # bsds300 (the schema admits no other dataset): samples are crops, crops_per_image
    # of each image in turn
    end, per = cfg.start + cfg.num_samples, cfg.crops_per_image
    crops = load_bsds300(cfg.data_path, cfg.split, crop=cfg.crop,
                         count=images_spanned(end, per), per_image=per)
    return crops[cfg.start : end]


def _operator(cfg: Any, shape: tuple[int, int], seed: int) -> Any:
    if cfg.operator == "identity":
        return Identity(shape)
    if cfg.operator == "inpainting":
        return Inpainting(shape, cfg.fraction_removed, seed=seed)
    return GaussianBlur(shape, cfg.blur_sigma)


def _foe(cfg: Any, shape: tuple[int, int], seed: int) -> tuple[FieldsOfExperts, np.ndarray]:
    k = cfg.kernel_size
    count = cfg.num_filters if cfg.num_filters is not None else k * k - 1
    dct = cfg.filters_init == "dct"
    filters = dct_filters(k)[:count] if dct else gaussian_filters(k, count, seed)
    widths = tuple(cfg.expert_widths)
    reg = FieldsOfExperts(shape, k, count, expert=cfg.expert, gamma=cfg.gamma, learn=cfg.learn,
                          boundary=cfg.boundary, zero_mean=cfg.zero_mean_filters, widths=widths)
    return reg, initial_theta(filters, cfg.init_exponent, len(widths))


def _regularizer(cfg: Any, shape: tuple[int, int], seed: int) -> tuple[Any, np.ndarray]:
    if cfg.regularizer == "tv":
        return TotalVariation(shape, gamma=cfg.gamma), np.array([cfg.init_exponent])
    if cfg.regularizer == "tv_foe":  # θ = (TV's log10 weight, the FoE's θ flattened)
        foe, foe_theta = _foe(cfg, shape, seed)
        tv = TotalVariation(shape, gamma=cfg.gamma if cfg.tv_gamma is None else cfg.tv_gamma)
        reg = SumRegularizer([tv, foe])
        return reg, np.concatenate([[cfg.tv_init_exponent], foe_theta.reshape(-1)])
    return _foe(cfg, shape, seed)


def build_problems(cfg: Any, backend: Any, seed: int) -> ProblemSet:
    """Construct the samples described by ``cfg`` (a ``ProblemConfig``) on ``backend``."""
    # child j seeds image index j (module docstring); the child after the range seeds the
    # regulariser (for start = 0: child num_samples)
    first, per = cfg.start, cfg.crops_per_image
    end = first + cfg.num_samples
    if per == 1:
        seeds = _sample_seeds(seed, end + 1, cfg.split)[first:]
    else:  # sample s: crop s mod k of image s // k; the regulariser: image end's child
        family = [_sample_seeds(seed, end + 1, cfg.split, crop) for crop in range(per)]
        seeds = [family[s % per][s // per] for s in range(first, end)] + [family[0][end]]
    if cfg.name == "quadratic":
        problems = tuple(
            QuadraticProblem(cfg.n, cfg.num_terms, seed=s, noise_level=cfg.noise_level,
                             coupling=cfg.coupling, backend=backend)
            for s in seeds[:-1]
        )
        theta0 = np.zeros(problems[0].theta_shape)
        desc = f"quadratic n={cfg.n} terms={cfg.num_terms} × {cfg.num_samples} samples"
        return ProblemSet(problems, theta0, np.ones_like(theta0), desc)
    images = _images(cfg)
    shape = (int(images.shape[1]), int(images.shape[2]))
    reg, theta0 = _regularizer(cfg, shape, seeds[-1])
    problems = [
        ImagingProblem.from_image(image, backend, _operator(cfg, shape, s), reg,
                                  noise_level=cfg.noise_level, seed=s, epsilon=cfg.epsilon,
                                  upper=cfg.upper_loss, mse_floor=cfg.mse_floor,
                                  normalize=cfg.normalize)
        for image, s in zip(images, seeds[:-1], strict=True)
    ]
    mask = reg.mask_host().reshape(theta0.shape)
    desc = (
        f"{cfg.name}: {len(problems)} × {shape[0]}×{shape[1]} {cfg.dataset} images, "
        f"{cfg.operator} operator, {reg!r}{', normalised' if cfg.normalize else ''}"
    )
    return ProblemSet(tuple(problems), theta0, mask, desc)
