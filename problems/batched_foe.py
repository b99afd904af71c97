"""Fields-of-Experts kernels on batches: images (B, n), blocks (B, n, b).

The batch is folded into the single-sample matmul of ``problems.foe``: the K² shifted
copies of the zero-padded batch are stacked once, shape (K², B·n·b), and all F filters
act in one matmul (F, K²) @ (K², B·n·b).  The adjoint (a correlation) is one matmul
(K², F) @ (F, B·n·b) followed by K² shifted additions.  The only Python loop runs over
the K² filter offsets.  θ is shared by the batch and has the layout of ``problems.foe``.
"""

from __future__ import annotations

from typing import Any

import array_api_compat

from problems.base import check_theta, pad_zeros_2d
from problems.foe import LN10, FieldsOfExperts


class BatchedFoE:
    """Batched R_θ, ∇R and (through ``linearize``) ∇²R V and Jᵀ W for a ``FieldsOfExperts``."""

    def __init__(self, regularizer: FieldsOfExperts) -> None:
        self.reg = regularizer
        self.image_shape = regularizer.image_shape
        self.n = regularizer.n
        self.k = regularizer.kernel_size
        self.num_filters = regularizer.num_filters
        self.expert = regularizer.expert
        self.theta_shape = regularizer.theta_shape

    def split(self, xp: Any, theta: Any) -> tuple[Any, Any]:
        """(filters (F, K²), scales 10^{p_f} (F,))."""
        theta = check_theta(xp, theta, self.theta_shape)
        k2 = self.k**2
        return theta[:, :k2], xp.exp(LN10 * theta[:, k2])

    def stack(self, xp: Any, v3: Any) -> Any:
        """Shifted copies of the padded batch (B, n, b): (K², B·n·b), row a·K + c ↔ k[a, c]."""
        h, w = self.image_shape
        k = self.k
        r = k // 2
        bsz, _, b = v3.shape
        img = pad_zeros_2d(xp, xp.reshape(v3, (bsz, h, w, b)), r)
        shifts = [
            img[:, 2 * r - a : 2 * r - a + h, 2 * r - c : 2 * r - c + w, :]
            for a in range(k)
            for c in range(k)
        ]
        return xp.reshape(xp.stack(shifts, axis=0), (k * k, -1))

    def adjoint(self, xp: Any, filters: Any, u: Any, bsz: int, b: int) -> Any:
        """Σ_f k_f ⋆ u_f for u of shape (F, B·n·b) → (B, n, b)."""
        h, w = self.image_shape
        k = self.k
        r = k // 2
        mixed = xp.reshape(
            xp.matmul(xp.permute_dims(filters, (1, 0)), u), (k * k, bsz, h, w, b)
        )
        dev = array_api_compat.device(u)
        buf = xp.zeros((bsz, h + 2 * r, w + 2 * r, b), dtype=u.dtype, device=dev)
        for a in range(k):
            for c in range(k):
                rows = slice(2 * r - a, 2 * r - a + h)
                cols = slice(2 * r - c, 2 * r - c + w)
                buf[:, rows, cols, :] += mixed[a * k + c, ...]
        return xp.reshape(buf[:, r : r + h, r : r + w, :], (bsz, self.n, b))

    def responses(self, xp: Any, X: Any, filters: Any) -> tuple[Any, Any]:
        """The stack of X (K², B·n) and the filter responses z = k ∗ x (F, B·n)."""
        sx = self.stack(xp, xp.reshape(X, (X.shape[0], self.n, 1)))
        return sx, xp.matmul(filters, sx)

    def value(self, xp: Any, X: Any, theta: Any) -> Any:
        """R_θ(x_i) for every row: (B,)."""
        filters, scales = self.split(xp, theta)
        _, z = self.responses(xp, X, filters)
        phi = xp.reshape(self.expert.value(z), (self.num_filters, X.shape[0], self.n))
        per = xp.sum(phi, axis=2)
        return xp.sum(scales[:, None] * per, axis=0)

    def grad(self, xp: Any, X: Any, theta: Any) -> Any:
        """∇R(x_i) for every row: (B, n)."""
        filters, scales = self.split(xp, theta)
        _, z = self.responses(xp, X, filters)
        u = scales[:, None] * self.expert.d1(z)
        return xp.reshape(self.adjoint(xp, filters, u, X.shape[0], 1), (X.shape[0], self.n))

    def value_and_grad(self, xp: Any, X: Any, theta: Any) -> tuple[Any, Any]:
        """(R_θ(x_i) (B,), ∇R(x_i) (B, n)) sharing the filter responses."""
        filters, scales = self.split(xp, theta)
        _, z = self.responses(xp, X, filters)
        phi = xp.reshape(self.expert.value(z), (self.num_filters, X.shape[0], self.n))
        value = xp.sum(scales[:, None] * xp.sum(phi, axis=2), axis=0)
        u = scales[:, None] * self.expert.d1(z)
        grad = xp.reshape(self.adjoint(xp, filters, u, X.shape[0], 1), (X.shape[0], self.n))
        return value, grad

    def linearize(self, xp: Any, X: Any, theta: Any) -> FoELinearization:
        return FoELinearization(self, xp, X, theta)


class FoELinearization:
    """The quantities of ∇²R and Jᵀ that depend only on (X, θ), computed once.

    Kept: the filters, 10^{p_f}, the stack of X, z = k ∗ x and φ''(z)·10^{p_f}; φ'(z) and
    φ''(z) for Jᵀ are computed on first use.  Each ``hvp`` then costs the two convolutions
    k ∗ v and its adjoint.
    """

    def __init__(self, kern: BatchedFoE, xp: Any, X: Any, theta: Any) -> None:
        self.kern, self.xp = kern, xp
        self.batch_size = X.shape[0]
        self.filters, self.scales = kern.split(xp, theta)
        self.sx, self.z = kern.responses(xp, X, self.filters)
        weight = kern.expert.d2(self.z)
        weight *= self.scales[:, None]
        self.weight = weight  # (F, B·n)
        self._d1d2: tuple[Any, Any] | None = None

    def hvp(self, v3: Any) -> Any:
        """∇²R V for V (B, n, b) → (B, n, b)."""
        xp, kern = self.xp, self.kern
        bsz, n, b = v3.shape
        f = kern.num_filters
        kv = xp.reshape(xp.matmul(self.filters, kern.stack(xp, v3)), (f, bsz * n, b))
        kv *= self.weight[:, :, None]
        u = xp.reshape(kv, (f, bsz * n * b))
        return kern.adjoint(xp, self.filters, u, bsz, b)

    def jac_t(self, w3: Any) -> Any:
        """∂θ⟨∇R(x_i), w_i⟩ for W (B, n, b) → (B, p, b), unmasked (θ row-major)."""
        xp, kern = self.xp, self.kern
        if self._d1d2 is None:
            self._d1d2 = (kern.expert.d1(self.z), kern.expert.d2(self.z))
        d1, d2 = self._d1d2
        bsz, n, b = w3.shape
        f, k2 = kern.num_filters, kern.k**2
        sw = kern.stack(xp, w3)  # (K², B·n·b)
        kw = xp.reshape(xp.matmul(self.filters, sw), (f, bsz, n, b))
        d1 = xp.reshape(d1, (f, bsz, n))
        d2 = xp.reshape(d2, (f, bsz, n))
        sx = xp.permute_dims(xp.reshape(self.sx, (k2, bsz, n)), (1, 0, 2))  # (B, K², n)
        t = xp.permute_dims(d2[:, :, :, None] * kw, (1, 2, 0, 3))  # (B, n, F, b)
        inner = xp.reshape(xp.matmul(sx, xp.reshape(t, (bsz, n, f * b))), (bsz, k2, f, b))
        inner = xp.permute_dims(inner, (0, 2, 1, 3))  # (B, F, K², b)
        sw4 = xp.permute_dims(xp.reshape(sw, (k2, bsz, n, b)), (1, 2, 0, 3))  # (B, n, K², b)
        outer = xp.matmul(xp.permute_dims(d1, (1, 0, 2)), xp.reshape(sw4, (bsz, n, k2 * b)))
        outer = xp.reshape(outer, (bsz, f, k2, b))
        d_filters = self.scales[None, :, None, None] * (inner + outer)
        d_exps = xp.sum(d1[:, :, :, None] * kw, axis=2)  # (F, B, b)
        d_exps = (LN10 * self.scales)[None, :, None] * xp.permute_dims(d_exps, (1, 0, 2))
        out = xp.concat([d_filters, d_exps[:, :, None, :]], axis=2)
        return xp.reshape(out, (bsz, f * (k2 + 1), b))
