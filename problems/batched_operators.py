"""Forward operators on batches with per-sample data: X (B, n), blocks V (B, n, b).

``BatchedOperator.from_operators`` accepts B operators of one kind: all ``Identity``,
all ``Inpainting`` (per-sample masks, stacked to (B, n) on the device) or all
``GaussianBlur`` with one σ (applied separably to (B, H, W, b), as ``problems.operators``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from problems.base import pad_zeros_2d
from problems.operators import GaussianBlur, Identity, Inpainting

OPERATOR_KINDS = (Identity, Inpainting, GaussianBlur)


class BatchedOperator:
    """A_i for every sample: ``apply``/``adjoint`` on (B, n); ``normal`` on (B, n, b)."""

    def __init__(self, kind: type, image_shape: tuple[int, ...], masks: Any = None,
                 taps: Sequence[float] = ()) -> None:
        self.kind = kind
        self.image_shape = tuple(image_shape)
        self.masks = masks  # (B, n) device array for inpainting
        self.taps = [float(t) for t in taps]

    @classmethod
    def from_operators(
        cls, operators: Sequence[Any], xp: Any, device: Any, dtype: Any
    ) -> BatchedOperator:
        first = operators[0]
        kind = type(first)
        if kind not in OPERATOR_KINDS:
            raise ValueError(
                f"operators: unsupported forward operator {kind.__name__}; "
                f"use one of {', '.join(k.__name__ for k in OPERATOR_KINDS)}"
            )
        for i, op in enumerate(operators):
            if type(op) is not kind:
                raise ValueError(
                    f"operators: sample {i} has a {type(op).__name__}, sample 0 a {kind.__name__}"
                )
            if tuple(op.image_shape) != tuple(first.image_shape):
                raise ValueError(
                    f"operators: sample {i} acts on images {op.image_shape}, "
                    f"sample 0 on {first.image_shape}"
                )
            if kind is GaussianBlur and op.sigma != first.sigma:
                raise ValueError(
                    f"operators: blur must share sigma; sample {i} has sigma={op.sigma}, "
                    f"sample 0 sigma={first.sigma}"
                )
        if kind is Inpainting:
            host = np.stack([np.asarray(op.mask, dtype=np.float64) for op in operators])
            return cls(kind, first.image_shape, xp.asarray(host, dtype=dtype, device=device))
        if kind is GaussianBlur:
            return cls(kind, first.image_shape, taps=first.kernel)
        return cls(kind, first.image_shape)

    def rows(self, xp: Any, index: Any) -> BatchedOperator:
        """The operators of the samples at device index array ``index`` (in that order)."""
        if self.masks is None:
            return self
        return BatchedOperator(self.kind, self.image_shape, xp.take(self.masks, index, axis=0),
                               self.taps)

    def _blur_axis(self, xp: Any, img: Any, axis: int) -> Any:
        """Zero-boundary 1-D convolution of (B, H, W, b) along image axis 0 or 1."""
        c = (len(self.taps) - 1) // 2
        _, h, w, _ = img.shape
        padded = pad_zeros_2d(xp, img, c)
        padded = padded[:, :, c : c + w, :] if axis == 0 else padded[:, c : c + h, :, :]
        out = None
        for k, tap in enumerate(self.taps):
            part = padded[:, k : k + h, :, :] if axis == 0 else padded[:, :, k : k + w, :]
            out = tap * part if out is None else out + tap * part
        return out

    def _apply3(self, xp: Any, v3: Any) -> Any:
        if self.kind is Identity:
            return v3
        if self.kind is Inpainting:
            return v3 * self.masks[:, :, None]
        bsz, n, b = v3.shape
        h, w = self.image_shape
        img = xp.reshape(v3, (bsz, h, w, b))
        img = self._blur_axis(xp, self._blur_axis(xp, img, 0), 1)
        return xp.reshape(img, (bsz, n, b))

    def apply(self, xp: Any, X: Any) -> Any:
        """A_i x_i for X (B, n) → (B, n) (all three kinds are symmetric: Aᵀ = A)."""
        if self.kind is Identity:
            return X
        if self.kind is Inpainting:
            return X * self.masks
        out = self._apply3(xp, xp.reshape(X, (X.shape[0], X.shape[1], 1)))
        return xp.reshape(out, X.shape)

    adjoint = apply

    def normal(self, xp: Any, v3: Any) -> Any:
        """A_iᵀA_i v for V (B, n, b) → (B, n, b)."""
        if self.kind is GaussianBlur:
            return self._apply3(xp, self._apply3(xp, v3))
        return self._apply3(xp, v3)
