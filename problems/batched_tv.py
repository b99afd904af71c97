"""Huber total variation (``problems.tv``) on batches: images (B, n), blocks (B, n, b).

Differences act on arrays (B, H, W, b) with the Neumann boundary of ``problems.tv``; the
weight 10^θ is shared by the batch.
"""

from __future__ import annotations

from typing import Any

from problems.base import check_theta
from problems.tv import LN10, TotalVariation


class BatchedTV:
    """Batched R_θ, ∇R and (through ``linearize``) ∇²R V and Jᵀ W for a ``TotalVariation``."""

    def __init__(self, regularizer: TotalVariation) -> None:
        self.reg = regularizer
        self.image_shape = regularizer.image_shape
        self.n = regularizer.n
        self.gamma = regularizer.gamma
        self.theta_shape = regularizer.theta_shape

    def weight(self, xp: Any, theta: Any) -> Any:
        theta = check_theta(xp, theta, self.theta_shape)
        return xp.exp(LN10 * theta[0])

    def diff(self, xp: Any, v3: Any) -> tuple[Any, Any]:
        """Forward differences (dx, dy) of V (B, n, b), each (B, H, W, b)."""
        h, w = self.image_shape
        img = xp.reshape(v3, (v3.shape[0], h, w, v3.shape[2]))
        dx = xp.zeros_like(img)
        dy = xp.zeros_like(img)
        dx[:, :, : w - 1, :] = img[:, :, 1:, :] - img[:, :, : w - 1, :]
        dy[:, : h - 1, :, :] = img[:, 1:, :, :] - img[:, : h - 1, :, :]
        return dx, dy

    def diff_adjoint(self, xp: Any, dx: Any, dy: Any) -> Any:
        """∇ᵀ(dx, dy) → (B, n, b)."""
        h, w = self.image_shape
        out = xp.zeros_like(dx)
        out[:, :, 1:, :] = out[:, :, 1:, :] + dx[:, :, : w - 1, :]
        out[:, :, : w - 1, :] = out[:, :, : w - 1, :] - dx[:, :, : w - 1, :]
        out[:, 1:, :, :] = out[:, 1:, :, :] + dy[:, : h - 1, :, :]
        out[:, : h - 1, :, :] = out[:, : h - 1, :, :] - dy[:, : h - 1, :, :]
        return xp.reshape(out, (dx.shape[0], self.n, dx.shape[3]))

    def field(self, xp: Any, X: Any) -> tuple[Any, Any, Any]:
        dx, dy = self.diff(xp, xp.reshape(X, (X.shape[0], self.n, 1)))
        return dx, dy, xp.sqrt(dx * dx + dy * dy)

    def value(self, xp: Any, X: Any, theta: Any) -> Any:
        _, _, t = self.field(xp, X)
        g = self.gamma
        h = xp.where(t <= g, t * t / (2.0 * g), t - g / 2.0)
        return self.weight(xp, theta) * xp.sum(xp.reshape(h, (X.shape[0], self.n)), axis=1)

    def grad(self, xp: Any, X: Any, theta: Any) -> Any:
        dx, dy, t = self.field(xp, X)
        m = xp.maximum(t, self.gamma)
        out = self.diff_adjoint(xp, dx / m, dy / m)
        return self.weight(xp, theta) * xp.reshape(out, (X.shape[0], self.n))

    def linearize(self, xp: Any, X: Any, theta: Any) -> TVLinearization:
        return TVLinearization(self, xp, X, theta)


class TVLinearization:
    """∇x, |∇x|, the unit directions and the weight at (X, θ), computed once."""

    def __init__(self, kern: BatchedTV, xp: Any, X: Any, theta: Any) -> None:
        self.kern, self.xp = kern, xp
        self.weight = kern.weight(xp, theta)
        dx, dy, t = kern.field(xp, X)
        self.m = xp.maximum(t, kern.gamma)
        self.inside = t <= kern.gamma
        self.ux, self.uy = dx / self.m, dy / self.m  # also ψ(∇x) for Jᵀ

    def hvp(self, v3: Any) -> Any:
        """10^θ ∇ᵀ H_j ∇v per sample: V (B, n, b) → (B, n, b)."""
        xp = self.xp
        vx, vy = self.kern.diff(xp, v3)
        proj = xp.where(self.inside, 0.0, self.ux * vx + self.uy * vy)
        hx = (vx - proj * self.ux) / self.m
        hy = (vy - proj * self.uy) / self.m
        return self.weight * self.kern.diff_adjoint(xp, hx, hy)

    def jac_t(self, w3: Any) -> Any:
        """ln(10) 10^θ ⟨ψ(∇x_i), ∇w_i⟩: W (B, n, b) → (B, 1, b)."""
        xp = self.xp
        bsz, n, b = w3.shape
        wx, wy = self.kern.diff(xp, w3)
        ip = xp.sum(xp.reshape(self.ux * wx + self.uy * wy, (bsz, n, b)), axis=1)
        return (LN10 * self.weight) * xp.reshape(ip, (bsz, 1, b))
