"""Fields-of-Experts kernels on batches: images (B, n), blocks (B, n, b).

The batch is folded into the single-sample matmul of ``problems.foe``, with the samples
as the *trailing* axis: a batch is laid out as (H, W, B·b), so every shifted copy of the
zero-padded batch is a slice whose rows are contiguous runs of W·B·b numbers (a leading
batch axis would leave runs of W).  The K² shifted copies are stacked once, shape
(K², n·B·b), and all F filters act in one matmul (F, K²) @ (K², n·B·b).  The adjoint (a
correlation) is one matmul (K², F) @ (F, n·B·b) followed by K² shifted additions.  The
only Python loop runs over the K² filter offsets.  θ is shared by the batch and has the
layout of ``problems.foe``.  Filter responses are kept in this layout, (F, n·B) with the
pixel index major, and converted back to rows (B, n, b) only at the end of a kernel.
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
        """Shifted copies of the padded batch (B, n, b): (K², n·B·b), row a·K + c ↔ k[a, c].

        Column (j, i, c) holds pixel j of sample i, block column c.
        """
        h, w = self.image_shape
        k = self.k
        r = k // 2
        bsz, _, b = v3.shape
        dev = array_api_compat.device(v3)
        padded = xp.zeros((h + 2 * r, w + 2 * r, bsz, b), dtype=v3.dtype, device=dev)
        padded[r : r + h, r : r + w, :, :] = xp.reshape(
            xp.permute_dims(v3, (1, 0, 2)), (h, w, bsz, b)
        )
        padded = xp.reshape(padded, (h + 2 * r, w + 2 * r, bsz * b))
        shifts = [
            padded[2 * r - a : 2 * r - a + h, 2 * r - c : 2 * r - c + w, :]
            for a in range(k)
            for c in range(k)
        ]
        return xp.reshape(xp.stack(shifts, axis=0), (k * k, -1))

    def stack_samples(self, xp: Any, v3: Any) -> Any:
        """As ``stack`` in the sample-major layout: (K², B, n, b), for per-sample products."""
        h, w = self.image_shape
        k = self.k
        r = k // 2
        bsz, n, b = v3.shape
        img = pad_zeros_2d(xp, xp.reshape(v3, (bsz, h, w, b)), r)
        shifts = [
            img[:, 2 * r - a : 2 * r - a + h, 2 * r - c : 2 * r - c + w, :]
            for a in range(k)
            for c in range(k)
        ]
        return xp.reshape(xp.stack(shifts, axis=0), (k * k, bsz, n, b))

    def adjoint(self, xp: Any, filters: Any, u: Any, bsz: int, b: int) -> Any:
        """Σ_f k_f ⋆ u_f for u of shape (F, n·B·b) (pixel-major) → rows (B, n, b)."""
        h, w = self.image_shape
        k = self.k
        r = k // 2
        mixed = xp.reshape(
            xp.matmul(xp.permute_dims(filters, (1, 0)), u), (k * k, h, w, bsz * b)
        )
        dev = array_api_compat.device(u)
        buf = xp.zeros((h + 2 * r, w + 2 * r, bsz * b), dtype=u.dtype, device=dev)
        for a in range(k):
            for c in range(k):
                rows = slice(2 * r - a, 2 * r - a + h)
                cols = slice(2 * r - c, 2 * r - c + w)
                buf[rows, cols, :] += mixed[a * k + c, ...]
        return self.to_rows(xp, buf[r : r + h, r : r + w, :], bsz, b)

    def to_rows(self, xp: Any, grid: Any, bsz: int, b: int) -> Any:
        """(H, W, B·b) or (n, B·b) pixel-major → a fresh row-major (B, n, b) array."""
        dev = array_api_compat.device(grid)
        out = xp.empty((bsz, self.n, b), dtype=grid.dtype, device=dev)
        out[...] = xp.permute_dims(xp.reshape(grid, (self.n, bsz, b)), (1, 0, 2))
        return out

    def responses(self, xp: Any, X: Any, filters: Any) -> tuple[Any, Any]:
        """The stack of X (K², n·B) and the filter responses z = k ∗ x (F, n·B)."""
        sx = self.stack(xp, xp.reshape(X, (X.shape[0], self.n, 1)))
        return sx, xp.matmul(filters, sx)

    def _per_sample(self, xp: Any, phi: Any, scales: Any, bsz: int) -> Any:
        """Σ_f 10^{p_f} Σ_j φ_fj for each sample: (F, n·B) → (B,).

        Σ_f first, by one (1, F) @ (F, n·B) product, then Σ_j over contiguous rows of
        (n, B): a strided per-sample sum would cost several times more.  The summation
        order differs from ``FieldsOfExperts.value``, so values agree to round-off only.
        """
        weighted = xp.matmul(scales[None, :], phi)
        return xp.sum(xp.reshape(weighted, (self.n, bsz)), axis=0)

    def value(self, xp: Any, X: Any, theta: Any) -> Any:
        """R_θ(x_i) for every row: (B,)."""
        filters, scales = self.split(xp, theta)
        _, z = self.responses(xp, X, filters)
        return self._per_sample(xp, self.expert.value(z), scales, X.shape[0])

    def grad(self, xp: Any, X: Any, theta: Any) -> Any:
        """∇R(x_i) for every row: (B, n)."""
        filters, scales = self.split(xp, theta)
        _, z = self.responses(xp, X, filters)
        u = self.expert.d1(z)
        u *= scales[:, None]
        return xp.reshape(self.adjoint(xp, filters, u, X.shape[0], 1), (X.shape[0], self.n))

    def value_and_grad(self, xp: Any, X: Any, theta: Any) -> tuple[Any, Any]:
        """(R_θ(x_i) (B,), ∇R(x_i) (B, n)) sharing the filter responses."""
        filters, scales = self.split(xp, theta)
        _, z = self.responses(xp, X, filters)
        phi, u = self.expert.value_and_d1(z)
        value = self._per_sample(xp, phi, scales, X.shape[0])
        u *= scales[:, None]
        grad = xp.reshape(self.adjoint(xp, filters, u, X.shape[0], 1), (X.shape[0], self.n))
        return value, grad

    def linearize(self, xp: Any, X: Any, theta: Any) -> FoELinearization:
        return FoELinearization(self, xp, X, theta)


class FoELinearization:
    """The quantities of ∇²R and Jᵀ that depend only on (X, θ), computed once.

    Kept: the filters, 10^{p_f}, the stack of X, z = k ∗ x and φ''(z)·10^{p_f} (all in
    the pixel-major layout of ``BatchedFoE``).  Jᵀ contracts over each sample's pixels,
    which wants the sample-major layout; its stack of X and φ'(z), φ''(z) are built in
    that layout on first use (a transposing copy would cost more than recomputing).  Each
    ``hvp`` costs the two convolutions k ∗ v and its adjoint.
    """

    def __init__(self, kern: BatchedFoE, xp: Any, X: Any, theta: Any) -> None:
        self.kern, self.xp = kern, xp
        self.X = X
        self.batch_size = X.shape[0]
        self.filters, self.scales = kern.split(xp, theta)
        self.sx, self.z = kern.responses(xp, X, self.filters)
        weight = kern.expert.d2(self.z)
        weight *= self.scales[:, None]
        self.weight = weight  # (F, n·B)
        self._samples: tuple[Any, Any, Any] | None = None

    def hvp(self, v3: Any) -> Any:
        """∇²R V for V (B, n, b) → (B, n, b)."""
        xp, kern = self.xp, self.kern
        bsz, n, b = v3.shape
        f = kern.num_filters
        kv = xp.reshape(xp.matmul(self.filters, kern.stack(xp, v3)), (f, n * bsz, b))
        kv *= self.weight[:, :, None]
        u = xp.reshape(kv, (f, n * bsz * b))
        return kern.adjoint(xp, self.filters, u, bsz, b)

    def _sample_major(self) -> tuple[Any, Any, Any]:
        """(stack of X (K², B, n), φ'(z), φ''(z) (F, B, n)) in the sample-major layout."""
        if self._samples is None:
            xp, kern = self.xp, self.kern
            bsz, n = self.X.shape
            sx = kern.stack_samples(xp, xp.reshape(self.X, (bsz, n, 1)))
            k2 = sx.shape[0]
            z = xp.reshape(xp.matmul(self.filters, xp.reshape(sx, (k2, -1))),
                           (kern.num_filters, bsz, n))
            self._samples = (xp.reshape(sx, (k2, bsz, n)), kern.expert.d1(z), kern.expert.d2(z))
        return self._samples

    def jac_t(self, w3: Any) -> Any:
        """∂θ⟨∇R(x_i), w_i⟩ for W (B, n, b) → (B, p, b), unmasked (θ row-major).

        Per sample s and column c (θ layout of ``FieldsOfExperts.jac_t``):
        ∂/∂k_f[a] = 10^{p_f} (Σ_j S_a x · φ''(z_f) (k_f ∗ w) + Σ_j φ'(z_f) S_a w), as
        batched products over each sample's pixels whose operands are strided views: for a
        few columns, (F, n) @ (n, K²) per sample and column; for many (b ≥ 8), where those
        views would be copied, (K², n) @ (n, b) per sample and filter.
        """
        xp, kern = self.xp, self.kern
        sx, d1, d2 = self._sample_major()
        bsz, n, b = w3.shape
        f, k2 = kern.num_filters, kern.k**2
        sw = kern.stack_samples(xp, w3)  # (K², B, n, b)
        kw = xp.reshape(xp.matmul(self.filters, xp.reshape(sw, (k2, -1))), (f, bsz, n, b))
        t = d2[:, :, :, None] * kw  # (F, B, n, b)
        d1_s = xp.permute_dims(d1, (1, 0, 2))[:, None, :, :]  # (B, 1, F, n)
        if b < 8:
            sx_t = xp.permute_dims(sx, (1, 2, 0))[:, None, :, :]  # (B, 1, n, K²)
            both = xp.matmul(xp.permute_dims(t, (1, 3, 0, 2)), sx_t)  # (B, b, F, K²)
            both += xp.matmul(d1_s, xp.permute_dims(sw, (1, 3, 2, 0)))
            both = xp.permute_dims(both, (0, 2, 3, 1))  # (B, F, K², b)
        else:
            sx_s = xp.permute_dims(sx, (1, 0, 2))[:, None, :, :]  # (B, 1, K², n)
            both = xp.matmul(sx_s, xp.permute_dims(t, (1, 0, 2, 3)))  # (B, F, K², b)
            outer = xp.matmul(d1_s, xp.permute_dims(sw, (1, 0, 2, 3)))  # (B, K², F, b)
            both += xp.permute_dims(outer, (0, 2, 1, 3))
        d_filters = self.scales[None, :, None, None] * both
        d_exps = xp.sum(d1[:, :, :, None] * kw, axis=2)  # (F, B, b)
        d_exps = (LN10 * self.scales)[None, :, None] * xp.permute_dims(d_exps, (1, 0, 2))
        out = xp.concat([d_filters, d_exps[:, :, None, :]], axis=2)
        return xp.reshape(out, (bsz, f * (k2 + 1), b))
