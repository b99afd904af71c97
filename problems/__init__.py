"""Bilevel learning problems: one instance is one sample (lower level f(x, θ), upper loss ℓ(x)).

Modules: ``base`` (the ``Problem`` protocol and array helpers), ``operators`` (forward
operators and noise), ``foe`` (Fields of Experts), ``tv`` (smoothed total variation),
``imaging`` (the imaging problem), ``quadratic`` (a closed-form test problem) and
``datasets`` (MNIST / BSDS300 loaders and the embedded MNIST sample).
"""

from problems.base import Problem, psnr
from problems.batched import BatchedImagingProblem
from problems.datasets import load_bsds300, load_embedded_mnist, load_mnist
from problems.foe import FieldsOfExperts, dct_filters, gaussian_filters
from problems.imaging import ImagingProblem
from problems.linearization import linearize
from problems.operators import GaussianBlur, Identity, Inpainting, add_relative_noise
from problems.quadratic import QuadraticProblem
from problems.tv import TotalVariation

__all__ = [
    "BatchedImagingProblem",
    "FieldsOfExperts",
    "GaussianBlur",
    "Identity",
    "ImagingProblem",
    "Inpainting",
    "Problem",
    "QuadraticProblem",
    "TotalVariation",
    "add_relative_noise",
    "dct_filters",
    "gaussian_filters",
    "linearize",
    "load_bsds300",
    "load_embedded_mnist",
    "load_mnist",
    "psnr",
]
