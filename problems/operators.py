"""Forward operators A (with adjoints) acting on flattened images and blocks of them.

Every operator maps (n,) → (n,) and (n, b) → (n, b) (output the image's size) and exposes
``apply`` (A), ``adjoint`` (Aᵀ), ``image_shape``, ``n`` and ``shape``.  Host constants
(the inpainting mask) are moved to the input's device once and cached per device.
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat
import numpy as np

from problems.base import as_columns, from_columns, namespace_and_device, pad_zeros_2d


class _Operator:
    """Shared bookkeeping for square image-to-image operators."""

    symmetric = False

    def __init__(self, image_shape: tuple[int, ...]) -> None:
        self.image_shape = tuple(int(s) for s in image_shape)
        self.n = math.prod(self.image_shape)
        self.shape = (self.n, self.n)

    def __call__(self, v: Any) -> Any:
        return self.apply(v)

    def _check(self, v: Any) -> None:
        if v.ndim not in (1, 2) or v.shape[0] != self.n:
            raise ValueError(
                f"{type(self).__name__} for n={self.n} applied to an array of shape "
                f"{tuple(v.shape)}"
            )

    def apply(self, v: Any) -> Any:
        raise NotImplementedError

    def adjoint(self, v: Any) -> Any:
        raise NotImplementedError

    def normal(self, v: Any) -> Any:
        """AᵀA v."""
        return self.adjoint(self.apply(v))


class Identity(_Operator):
    """A = I (denoising)."""

    symmetric = True

    def apply(self, v: Any) -> Any:
        self._check(v)
        return v

    def adjoint(self, v: Any) -> Any:
        self._check(v)
        return v

    def normal(self, v: Any) -> Any:
        self._check(v)
        return v

    def __repr__(self) -> str:
        return f"Identity(image_shape={self.image_shape})"


class Inpainting(_Operator):
    """A = diag(mask): a seeded ``fraction_removed`` of the pixels is set to zero.

    ``mask`` (host NumPy, float 0/1, shape (n,)) marks the kept pixels; exactly
    round(fraction_removed · n) pixels are removed, chosen by ``numpy.random.default_rng(seed)``.
    """

    symmetric = True

    def __init__(
        self, image_shape: tuple[int, ...], fraction_removed: float, seed: int = 0
    ) -> None:
        super().__init__(image_shape)
        fraction = float(fraction_removed)
        if not 0.0 <= fraction < 1.0 or not math.isfinite(fraction):
            raise ValueError(
                f"fraction_removed must be in [0, 1); got fraction={fraction_removed!r}"
            )
        self.fraction_removed = fraction
        self.seed = seed
        removed = np.random.default_rng(seed).permutation(self.n)[: round(fraction * self.n)]
        mask = np.ones(self.n)
        mask[removed] = 0.0
        self.mask = mask
        self._device_masks: dict[tuple[str, str, str], Any] = {}

    def device_mask(self, xp: Any, device: Any, dtype: Any) -> Any:
        """The mask as a (n,) array of ``dtype`` on ``device`` (cached)."""
        key = (xp.__name__, repr(device), repr(dtype))
        if key not in self._device_masks:
            self._device_masks[key] = xp.asarray(self.mask, dtype=dtype, device=device)
        return self._device_masks[key]

    def apply(self, v: Any) -> Any:
        self._check(v)
        xp, dev = namespace_and_device(v)
        m = self.device_mask(xp, dev, v.dtype)
        return v * (m if v.ndim == 1 else m[:, None])

    adjoint = apply
    normal = apply

    def __repr__(self) -> str:
        return (
            f"Inpainting(image_shape={self.image_shape}, "
            f"fraction_removed={self.fraction_removed}, seed={self.seed})"
        )


def gaussian_kernel_1d(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian of radius c = int(sigma / 0.3 + 1), length 2c + 1."""
    c = int(sigma / 0.3 + 1)
    t = np.arange(-c, c + 1, dtype=np.float64)
    g = np.exp(-(t**2) / (2.0 * sigma**2))
    return g / g.sum()


class GaussianBlur(_Operator):
    """Convolution with a normalised Gaussian of width ``sigma`` (zero boundary, same size).

    Applied separably (a 1-D convolution along rows, then along columns).  The kernel
    is symmetric, so with zero boundaries A is a symmetric matrix and Aᵀ = A.
    """

    symmetric = True

    def __init__(self, image_shape: tuple[int, int], sigma: float) -> None:
        if len(image_shape) != 2:
            raise ValueError(f"GaussianBlur needs a 2-D image_shape; got {image_shape!r}")
        super().__init__(image_shape)
        if not sigma > 0 or not math.isfinite(sigma):
            raise ValueError(f"sigma must be a positive finite number; got sigma={sigma!r}")
        self.sigma = float(sigma)
        self.kernel = gaussian_kernel_1d(self.sigma)
        self.radius = (self.kernel.size - 1) // 2
        self._taps = [float(t) for t in self.kernel]

    def _blur_axis(self, xp: Any, img: Any, axis: int) -> Any:
        """1-D zero-boundary convolution of ``img`` (H, W, b) along ``axis`` (0 or 1)."""
        c = self.radius
        h, w, _ = img.shape
        padded = pad_zeros_2d(xp, img, c)
        # keep the other axis unpadded
        if axis == 0:
            padded = padded[:, c : c + w, :]
        else:
            padded = padded[c : c + h, :, :]
        out = None
        for k, tap in enumerate(self._taps):
            part = padded[k : k + h, :, :] if axis == 0 else padded[:, k : k + w, :]
            out = tap * part if out is None else out + tap * part
        return out

    def apply(self, v: Any) -> Any:
        self._check(v)
        xp = array_api_compat.array_namespace(v)
        cols, single = as_columns(v)
        h, w = self.image_shape
        img = xp.reshape(cols, (h, w, cols.shape[1]))
        img = self._blur_axis(xp, self._blur_axis(xp, img, 0), 1)
        return from_columns(xp, xp.reshape(img, (self.n, cols.shape[1])), single)

    adjoint = apply

    def __repr__(self) -> str:
        return f"GaussianBlur(image_shape={self.image_shape}, sigma={self.sigma})"


def add_relative_noise(clean: Any, noise_level: float, seed: int) -> Any:
    """Return y = clean + δ‖clean‖ e/‖e‖ with e ~ N(0, I) from ``default_rng(seed)`` (host).

    The noise is drawn on the host, then copied to ``clean``'s device and dtype.
    """
    if not noise_level >= 0 or not math.isfinite(noise_level):
        raise ValueError(f"noise_level must be a non-negative number; got {noise_level!r}")
    xp, dev = namespace_and_device(clean)
    e = np.random.default_rng(seed).standard_normal(tuple(clean.shape))
    e /= np.linalg.norm(e)
    noise = xp.asarray(e, dtype=clean.dtype, device=dev)
    scale = noise_level * xp.sqrt(xp.sum(clean * clean))
    return clean + scale * noise
