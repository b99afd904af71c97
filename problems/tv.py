"""Smoothed (Huber) isotropic total variation with one learned log-weight.

R_θ(x) = 10^θ Σ_j h_γ(|(∇x)_j|), h_γ(t) = t²/(2γ) for t ≤ γ, t − γ/2 otherwise, θ of
shape (1,).  ∇ is the forward difference with **Neumann** boundary: the difference
leaving the image (last column for ∂/∂x, last row for ∂/∂y) is zero.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from problems.base import LN10, RowRegularizer, check_theta


class TotalVariation(RowRegularizer):
    """Huber-TV regulariser for images of ``image_shape`` (θ = log10 of the weight);
    differences act on (B, H, W, b)."""

    def __init__(self, image_shape: tuple[int, int], *, gamma: float = 0.01) -> None:
        super().__init__(image_shape)
        if not gamma > 0:
            raise ValueError(f"gamma must be positive; got gamma={gamma!r}")
        self.gamma = float(gamma)
        self.theta_shape = (1,)

    def __repr__(self) -> str:
        return f"TotalVariation(image_shape={self.image_shape}, gamma={self.gamma})"

    def mask_host(self) -> np.ndarray:
        return np.ones(1)

    def log_weight_mask_host(self) -> np.ndarray:
        return np.ones(1)  # θ is the log10 weight

    def diff(self, xp: Any, v3: Any) -> tuple[Any, Any]:
        """Forward differences (dx, dy) of V (B, n, b), each (B, H, W, b), zero at the last
        column / row."""
        h, w = self.image_shape
        img = xp.reshape(v3, (v3.shape[0], h, w, v3.shape[2]))
        dx = xp.zeros_like(img)
        dy = xp.zeros_like(img)
        dx[:, :, : w - 1, :] = img[:, :, 1:, :] - img[:, :, : w - 1, :]
        dy[:, : h - 1, :, :] = img[:, 1:, :, :] - img[:, : h - 1, :, :]
        return dx, dy

    def diff_adjoint(self, xp: Any, dx: Any, dy: Any) -> Any:
        """∇ᵀ(dx, dy) → (B, n, b) (minus a divergence)."""
        h, w = self.image_shape
        out = xp.zeros_like(dx)
        out[:, :, 1:, :] = out[:, :, 1:, :] + dx[:, :, : w - 1, :]
        out[:, :, : w - 1, :] = out[:, :, : w - 1, :] - dx[:, :, : w - 1, :]
        out[:, 1:, :, :] = out[:, 1:, :, :] + dy[:, : h - 1, :, :]
        out[:, : h - 1, :, :] = out[:, : h - 1, :, :] - dy[:, : h - 1, :, :]
        return xp.reshape(out, (dx.shape[0], self.n, dx.shape[3]))

    def weight(self, xp: Any, theta: Any) -> Any:
        theta = check_theta(xp, theta, self.theta_shape)
        return xp.exp(LN10 * theta[0])

    def field(self, xp: Any, X: Any) -> tuple[Any, Any, Any]:
        """(∇x, |∇x|) of a batch X (B, n): dx, dy, t each (B, H, W, 1)."""
        dx, dy = self.diff(xp, xp.reshape(X, (X.shape[0], self.n, 1)))
        return dx, dy, xp.sqrt(dx * dx + dy * dy)

    def rows_value_and_grad(
        self, xp: Any, X: Any, theta: Any, *, value: bool = True, grad: bool = True
    ) -> tuple[Any, Any]:
        bsz = X.shape[0]
        dx, dy, t = self.field(xp, X)
        g = self.gamma
        weight = self.weight(xp, theta)
        out_value = out_grad = None
        if value:
            h = xp.where(t <= g, t * t / (2.0 * g), t - g / 2.0)
            out_value = weight * xp.sum(xp.reshape(h, (bsz, self.n)), axis=1)
        if grad:
            m = xp.maximum(t, g)  # ψ(∇x) = ∇x / max(|∇x|, γ): the gradient of h_γ(|·|)
            out = self.diff_adjoint(xp, dx / m, dy / m)
            out_grad = weight * xp.reshape(out, (bsz, self.n))
        return out_value, out_grad

    def linearize(self, xp: Any, X: Any, theta: Any) -> TVLinearization:
        return TVLinearization(self, xp, X, theta)


class TVLinearization:
    """∇x, |∇x|, the unit directions and the weight at (X, θ), computed once."""

    def __init__(self, reg: TotalVariation, xp: Any, X: Any, theta: Any) -> None:
        self.reg, self.xp = reg, xp
        self.weight = reg.weight(xp, theta)
        dx, dy, t = reg.field(xp, X)
        self.m = xp.maximum(t, reg.gamma)
        self.inside = t <= reg.gamma
        self.ux, self.uy = dx / self.m, dy / self.m  # also ψ(∇x) for Jᵀ

    def hvp(self, v3: Any) -> Any:
        """10^θ ∇ᵀ H_j ∇v per sample, H_j = I/γ inside the quadratic zone, (I − ûûᵀ)/|u|
        outside: V (B, n, b) → (B, n, b)."""
        xp = self.xp
        vx, vy = self.reg.diff(xp, v3)
        proj = xp.where(self.inside, 0.0, self.ux * vx + self.uy * vy)
        hx = (vx - proj * self.ux) / self.m
        hy = (vy - proj * self.uy) / self.m
        return self.weight * self.reg.diff_adjoint(xp, hx, hy)

    def jac_t(self, w3: Any) -> Any:
        """ln(10) 10^θ ⟨ψ(∇x_i), ∇w_i⟩: W (B, n, b) → (B, 1, b)."""
        xp = self.xp
        bsz, n, b = w3.shape
        wx, wy = self.reg.diff(xp, w3)
        ip = xp.sum(xp.reshape(self.ux * wx + self.uy * wy, (bsz, n, b)), axis=1)
        return (LN10 * self.weight) * xp.reshape(ip, (bsz, 1, b))

