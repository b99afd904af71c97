"""Bilevel learning problems, batch-first: one instance holds B samples (lower level
f_i(x, θ), upper loss ℓ_i(x)); a single sample is B = 1.

Each module states what it owns (see the layout table in README.md).
"""

from problems.base import Linearization, Problem, psnr
from problems.datasets import load_bsds300, load_embedded_mnist, load_mnist
from problems.foe import FieldsOfExperts, dct_filters, gaussian_filters
from problems.imaging import ImagingProblem
from problems.operators import GaussianBlur, Identity, Inpainting, add_relative_noise
from problems.quadratic import QuadraticProblem
from problems.tv import TotalVariation

__all__ = [
    "FieldsOfExperts",
    "GaussianBlur",
    "Identity",
    "ImagingProblem",
    "Inpainting",
    "Linearization",
    "Problem",
    "QuadraticProblem",
    "TotalVariation",
    "add_relative_noise",
    "dct_filters",
    "gaussian_filters",
    "load_bsds300",
    "load_embedded_mnist",
    "load_mnist",
    "psnr",
]
