"""Smoothed (Huber) isotropic total variation with one learned log-weight.

R_θ(x) = 10^θ Σ_j h_γ(|(∇x)_j|), h_γ(t) = t²/(2γ) for t ≤ γ, t − γ/2 otherwise, θ of
shape (1,).  ∇ is the forward difference with **Neumann** boundary: the difference
leaving the image (last column for ∂/∂x, last row for ∂/∂y) is zero.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from problems.base import as_columns, check_theta, from_columns, namespace_and_device

LN10 = math.log(10.0)


class TotalVariation:
    """Huber-TV regulariser for images of ``image_shape`` (θ = log10 of the weight)."""

    def __init__(self, image_shape: tuple[int, int], *, gamma: float = 0.01) -> None:
        if len(image_shape) != 2:
            raise ValueError(f"image_shape must be (H, W); got image_shape={image_shape!r}")
        if not gamma > 0:
            raise ValueError(f"gamma must be positive; got gamma={gamma!r}")
        self.image_shape = (int(image_shape[0]), int(image_shape[1]))
        self.n = self.image_shape[0] * self.image_shape[1]
        self.gamma = float(gamma)
        self.theta_shape = (1,)

    def __repr__(self) -> str:
        return f"TotalVariation(image_shape={self.image_shape}, gamma={self.gamma})"

    def mask_host(self) -> np.ndarray:
        return np.ones(1)

    # -- differences on blocks (n, b) ------------------------------------------------------
    def _diff(self, xp: Any, cols: Any) -> tuple[Any, Any]:
        """Forward differences (dx, dy), each (H, W, b), zero at the last column / row."""
        h, w = self.image_shape
        img = xp.reshape(cols, (h, w, cols.shape[1]))
        dx = xp.zeros_like(img)
        dy = xp.zeros_like(img)
        dx[:, : w - 1, :] = img[:, 1:, :] - img[:, : w - 1, :]
        dy[: h - 1, :, :] = img[1:, :, :] - img[: h - 1, :, :]
        return dx, dy

    def _diff_adjoint(self, xp: Any, dx: Any, dy: Any) -> Any:
        """∇ᵀ(dx, dy) → (n, b) (minus a divergence)."""
        h, w = self.image_shape
        out = xp.zeros_like(dx)
        out[:, 1:, :] = out[:, 1:, :] + dx[:, : w - 1, :]
        out[:, : w - 1, :] = out[:, : w - 1, :] - dx[:, : w - 1, :]
        out[1:, :, :] = out[1:, :, :] + dy[: h - 1, :, :]
        out[: h - 1, :, :] = out[: h - 1, :, :] - dy[: h - 1, :, :]
        return xp.reshape(out, (self.n, dx.shape[2]))

    def _weight(self, xp: Any, theta: Any) -> Any:
        theta = check_theta(xp, theta, self.theta_shape)
        return xp.exp(LN10 * theta[0])

    def _field(self, xp: Any, x: Any) -> tuple[Any, Any, Any]:
        dx, dy = self._diff(xp, xp.reshape(x, (self.n, 1)))
        return dx, dy, xp.sqrt(dx * dx + dy * dy)

    # -- R, ∇R, ∇²R v, Jᵀ ---------------------------------------------------------------
    def value(self, x: Any, theta: Any) -> Any:
        xp, _ = namespace_and_device(x, theta)
        _, _, t = self._field(xp, x)
        g = self.gamma
        h = xp.where(t <= g, t * t / (2.0 * g), t - g / 2.0)
        return self._weight(xp, theta) * xp.sum(h)

    def _unit_grad(self, xp: Any, x: Any) -> tuple[Any, Any]:
        """ψ(∇x) = ∇x / max(|∇x|, γ): the gradient of h_γ(|·|) at each pixel."""
        dx, dy, t = self._field(xp, x)
        m = xp.maximum(t, self.gamma)
        return dx / m, dy / m

    def grad(self, x: Any, theta: Any) -> Any:
        xp, _ = namespace_and_device(x, theta)
        px, py = self._unit_grad(xp, x)
        return self._weight(xp, theta) * xp.reshape(self._diff_adjoint(xp, px, py), (self.n,))

    def hvp(self, x: Any, theta: Any, v: Any) -> Any:
        """10^θ ∇ᵀ H_j ∇v with H_j = I/γ inside the quadratic zone, (I − ûûᵀ)/|u| outside."""
        xp, _ = namespace_and_device(x, theta, v)
        dx, dy, t = self._field(xp, x)
        g = self.gamma
        m = xp.maximum(t, g)
        inside = t <= g
        ux, uy = dx / m, dy / m  # unit direction outside the quadratic zone
        cols, single = as_columns(v)
        vx, vy = self._diff(xp, cols)
        proj = xp.where(inside, 0.0, ux * vx + uy * vy)  # (H, W, b) via broadcasting
        hx = (vx - proj * ux) / m
        hy = (vy - proj * uy) / m
        out = self._weight(xp, theta) * self._diff_adjoint(xp, hx, hy)
        return from_columns(xp, out, single)

    def jac_t(self, x: Any, theta: Any, w: Any) -> Any:
        """∂θ⟨∇R, w⟩ = ln(10) 10^θ ⟨ψ(∇x), ∇w⟩: w (n,) → (1,); w (n, b) → (1, b)."""
        xp, _ = namespace_and_device(x, theta, w)
        px, py = self._unit_grad(xp, x)
        cols, single = as_columns(w)
        wx, wy = self._diff(xp, cols)
        ip = xp.sum(xp.reshape(px * wx + py * wy, (self.n, cols.shape[1])), axis=0)
        out = (LN10 * self._weight(xp, theta)) * xp.reshape(ip, (1, cols.shape[1]))
        return from_columns(xp, out, single)

