"""Forward operators A on flattened images: ``apply`` (A), ``adjoint`` (Aᵀ), ``normal`` (AᵀA)
map one image (n,), a batch (B, n) or blocks (B, n, b) to the same shape.  ``Identity`` and
``GaussianBlur`` act on any batch; an ``Inpainting`` holds one mask per sample (B, n),
moved to the input's device once and cached.  ``stack_operators`` joins samples' operators.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import array_api_compat
import numpy as np

from problems.base import check_agree, pad_zeros_2d


class _Operator:
    """Shared bookkeeping for square image-to-image operators; subclasses implement
    ``apply3`` and ``adjoint3`` (xp, blocks (B, n, b)) → (B, n, b)."""

    batch_size: int | None = None  # None: acts on any batch
    parameters: tuple[str, ...] = ()  # shown by repr after image_shape

    def __init__(self, image_shape: tuple[int, ...]) -> None:
        self.image_shape = tuple(int(s) for s in image_shape)
        self.n = math.prod(self.image_shape)

    def __repr__(self) -> str:
        shown = "".join(f", {name}={getattr(self, name)}" for name in self.parameters)
        return f"{type(self).__name__}(image_shape={self.image_shape}{shown})"

    def _on_blocks(self, kernel: Any, v: Any) -> Any:
        """``kernel`` (xp, (B, n, b)) → (B, n, b) applied to v promoted to blocks (checked)."""
        xp = array_api_compat.array_namespace(v)
        bsz = 1 if v.ndim == 1 else v.shape[0]
        ok = v.ndim in (1, 2, 3) and v.shape[min(v.ndim, 2) - 1] == self.n
        if not ok or self.batch_size not in (None, bsz):
            want = ("(n,), (B, n) or (B, n, b)" if self.batch_size is None
                    else f"({self.batch_size}, {self.n}) or ({self.batch_size}, {self.n}, b)")
            raise ValueError(f"{type(self).__name__} for n={self.n} applied to an array of "
                             f"shape {tuple(v.shape)}; expected {want}")
        v3 = v if v.ndim == 3 else xp.reshape(v, (bsz, self.n, 1))
        return xp.reshape(kernel(xp, v3), v.shape)

    def apply(self, v: Any) -> Any:
        return self._on_blocks(self.apply3, v)

    def adjoint(self, v: Any) -> Any:
        return self._on_blocks(self.adjoint3, v)

    def normal(self, v: Any) -> Any:
        """AᵀA v."""
        return self._on_blocks(self.normal3, v)

    def normal3(self, xp: Any, v3: Any) -> Any:
        """AᵀA on blocks (B, n, b) (a fresh array)."""
        return self.adjoint3(xp, self.apply3(xp, v3))

    def rows(self, rows: Sequence[int]) -> _Operator:
        """The operator of samples ``rows`` (host indices)."""
        return self


class Identity(_Operator):
    """A = I (denoising)."""

    def apply3(self, xp: Any, v3: Any) -> Any:
        return v3

    adjoint3 = apply3
    normal3 = apply3


class Inpainting(_Operator):
    """A_i = diag(mask_i): exactly round(fraction_removed · n) pixels, drawn by
    ``numpy.random.default_rng(seed)``, are set to zero.  Given host 0/1 ``masks`` (B, n),
    the operator holds those samples (``seed``: their seeds, for the record)."""

    parameters = ("fraction_removed", "seed")

    def __init__(
        self, image_shape: tuple[int, ...], fraction_removed: float, seed: Any = 0, *,
        masks: np.ndarray | None = None,
    ) -> None:
        super().__init__(image_shape)
        if not 0.0 <= fraction_removed < 1.0:  # false for NaN too
            raise ValueError(f"fraction_removed must be in [0, 1); got {fraction_removed!r}")
        self.fraction_removed, self.seed = float(fraction_removed), seed
        if masks is None:
            count = round(self.fraction_removed * self.n)
            removed = np.random.default_rng(seed).permutation(self.n)[:count]
            masks = np.ones((1, self.n))
            masks[0, removed] = 0.0
        self.masks = np.asarray(masks, dtype=np.float64)
        self.batch_size = int(self.masks.shape[0])
        self._device_masks: dict[tuple[str, str, str], Any] = {}

    @property
    def mask(self) -> np.ndarray:
        """The host mask (n,) of a single-sample operator."""
        if self.batch_size != 1:
            raise ValueError(f"an Inpainting of {self.batch_size} samples has masks, not mask")
        return self.masks[0]

    def apply3(self, xp: Any, v3: Any) -> Any:
        device = array_api_compat.device(v3)
        key = (xp.__name__, str(device), v3.dtype)  # no repr of the dtype: 10 µs a call
        if key not in self._device_masks:  # the masks (B, n, 1) on v3's device, cached
            m = xp.asarray(self.masks, dtype=v3.dtype, device=device)
            self._device_masks[key] = xp.reshape(m, (self.batch_size, self.n, 1))
        return v3 * self._device_masks[key]

    adjoint3 = apply3
    normal3 = apply3

    def rows(self, rows: Sequence[int]) -> Inpainting:
        seeds = self.seed if isinstance(self.seed, int) else tuple(self.seed[r] for r in rows)
        return Inpainting(self.image_shape, self.fraction_removed, seeds,
                          masks=self.masks[list(rows)])


def gaussian_kernel_1d(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian of radius c = int(sigma / 0.3 + 1), length 2c + 1."""
    c = int(sigma / 0.3 + 1)
    t = np.arange(-c, c + 1, dtype=np.float64)
    g = np.exp(-(t**2) / (2.0 * sigma**2))
    return g / g.sum()


class GaussianBlur(_Operator):
    """Convolution with a normalised Gaussian of width ``sigma`` (zero boundary, same size),
    applied separably (along rows, then columns) to (B, H, W, b).  The kernel is symmetric,
    so with zero boundaries A is a symmetric matrix and Aᵀ = A."""

    parameters = ("sigma",)

    def __init__(self, image_shape: tuple[int, int], sigma: float) -> None:
        if len(image_shape) != 2:
            raise ValueError(f"GaussianBlur needs a 2-D image_shape; got {image_shape!r}")
        super().__init__(image_shape)
        if not sigma > 0 or not math.isfinite(sigma):
            raise ValueError(f"sigma must be a positive finite number; got sigma={sigma!r}")
        self.sigma = float(sigma)
        self._taps = [float(t) for t in gaussian_kernel_1d(self.sigma)]
        self.radius = len(self._taps) // 2

    def _blur_axis(self, xp: Any, img: Any, axis: int) -> Any:
        """1-D zero-boundary convolution of ``img`` (B, H, W, b) along image axis 0 or 1."""
        c = self.radius
        _, h, w, _ = img.shape
        padded = pad_zeros_2d(xp, img, c)
        # keep the other axis unpadded
        padded = padded[:, :, c : c + w, :] if axis == 0 else padded[:, c : c + h, :, :]
        out = None
        for k, tap in enumerate(self._taps):
            part = padded[:, k : k + h, :, :] if axis == 0 else padded[:, :, k : k + w, :]
            out = tap * part if out is None else out + tap * part
        return out

    def apply3(self, xp: Any, v3: Any) -> Any:
        bsz, n, b = v3.shape
        h, w = self.image_shape
        img = xp.reshape(v3, (bsz, h, w, b))
        img = self._blur_axis(xp, self._blur_axis(xp, img, 0), 1)
        return xp.reshape(img, (bsz, n, b))

    adjoint3 = apply3


def stack_operators(operators: Sequence[Any]) -> Any:
    """One operator for the samples of ``operators`` (in order): all ``Identity``, all
    ``Inpainting`` (masks stacked) or all ``GaussianBlur`` with one σ, on one image shape."""
    first = check_agree("operators", operators, {
        "kind": lambda op: type(op).__name__,
        "image shape": lambda op: op.image_shape,
        "sigma": lambda op: getattr(op, "sigma", None),
    }, _Operator)
    if not isinstance(first, Inpainting):
        return first
    seeds = [s for op in operators for s in ([op.seed] if isinstance(op.seed, int) else op.seed)]
    return Inpainting(first.image_shape, first.fraction_removed, tuple(seeds),
                      masks=np.concatenate([op.masks for op in operators]))


def relative_noise_variance(Y: Any, noise_level: float) -> Any:
    """Each row's noise variance σ² per entry, known from the data alone, for the noise of
    ``add_relative_noise``: y = Ax + e with ‖e‖ = δ‖Ax‖ and e nearly orthogonal to Ax, so
    ‖y‖² ≈ (1 + δ²)‖Ax‖² and σ² = δ²/(1 + δ²)·‖y‖²/m.  ``Y`` (B, m) → (B,)."""
    xp = array_api_compat.array_namespace(Y)
    return noise_level**2 / (1.0 + noise_level**2) * xp.mean(Y * Y, axis=1)


def add_relative_noise(clean: Any, noise_level: float, seed: int) -> Any:
    """y = clean + δ‖clean‖ e/‖e‖ with e ~ N(0, I) drawn on the host by ``default_rng(seed)``,
    then copied to ``clean``'s device and dtype."""
    if not noise_level >= 0 or not math.isfinite(noise_level):
        raise ValueError(f"noise_level must be a non-negative number; got {noise_level!r}")
    xp = array_api_compat.array_namespace(clean)
    e = np.random.default_rng(seed).standard_normal(tuple(clean.shape))
    e /= np.linalg.norm(e)
    noise = xp.asarray(e, dtype=clean.dtype, device=array_api_compat.device(clean))
    scale = noise_level * xp.sqrt(xp.sum(clean * clean))
    return clean + scale * noise
