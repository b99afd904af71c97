"""Bilevel learning problems, batch-first: one instance holds B samples (lower level
f_i(x, θ), upper loss ℓ_i(x)); a single sample is B = 1.

Each module states what it owns (see the layout table in README.md).
"""

from problems.datasets import load_embedded_mnist
from problems.foe import FieldsOfExperts, dct_filters
from problems.imaging import ImagingProblem
from problems.operators import GaussianBlur, Identity, Inpainting
from problems.quadratic import QuadraticProblem

__all__ = [
    "FieldsOfExperts",
    "GaussianBlur",
    "Identity",
    "ImagingProblem",
    "Inpainting",
    "QuadraticProblem",
    "dct_filters",
    "load_embedded_mnist",
]
