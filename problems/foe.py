"""Fields-of-Experts regulariser R_θ(x) = Σ_f 10^{p_f} Σ_j φ((k_f ∗ x)_j).

θ has shape (F, K·K + 1): row f holds filter k_f flattened row-major, then the exponent
p_f.  ∗ is the true 2-D convolution (kernel flipped) with zero boundary and output the
image's size, i.e. ``scipy.signal.convolve2d(x, k, mode="same")`` for odd K.

All F filters are applied at once: the K² shifted copies of the zero-padded image (or
block of images) are stacked once, then one matmul (F, K²) @ (K², n·b).  The adjoint
(a correlation) is one matmul (K², F) @ (F, n·b) followed by K² shifted additions.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import array_api_compat
import numpy as np

from problems.base import (
    as_columns,
    check_theta,
    check_vector,
    from_columns,
    namespace_and_device,
    pad_zeros_2d,
)
from problems.experts import Expert

LN10 = math.log(10.0)
LEARN_OPTIONS = ("filters", "exponents", "both")


def dct_filters(kernel_size: int) -> np.ndarray:
    """The orthonormal 2-D DCT-II basis of size K×K without the constant filter.

    Returns shape (K² − 1, K, K); filter (u, v) (u, v not both 0, row-major order) is
    c_u c_vᵀ with c_u[i] = α_u cos(π (2i + 1) u / (2K)), α_0 = √(1/K), α_u = √(2/K).
    """
    k = int(kernel_size)
    if k < 2:
        raise ValueError(f"kernel_size must be at least 2; got kernel_size={kernel_size!r}")
    i = np.arange(k)
    basis = np.cos(np.pi * np.outer(np.arange(k), 2 * i + 1) / (2 * k))
    basis[0] *= math.sqrt(1.0 / k)
    basis[1:] *= math.sqrt(2.0 / k)
    filters = np.einsum("ui,vj->uvij", basis, basis).reshape(k * k, k, k)
    return filters[1:].copy()


def gaussian_filters(kernel_size: int, num_filters: int, seed: int = 0) -> np.ndarray:
    """Seeded random filters: i.i.d. N(0, 1) entries, then each made zero-mean, unit norm.

    Returns shape (num_filters, K, K).
    """
    k = int(kernel_size)
    rng = np.random.default_rng(seed)
    filters = rng.standard_normal((num_filters, k, k))
    filters -= filters.mean(axis=(1, 2), keepdims=True)
    filters /= np.linalg.norm(filters.reshape(num_filters, -1), axis=1)[:, None, None]
    return filters


def initial_theta(filters: np.ndarray, exponent: float | np.ndarray = 0.0) -> np.ndarray:
    """Pack host filters (F, K, K) and exponents (scalar or (F,)) into θ of shape (F, K² + 1)."""
    filters = np.asarray(filters, dtype=np.float64)
    f = filters.shape[0]
    exps = np.broadcast_to(np.asarray(exponent, dtype=np.float64), (f,))
    return np.concatenate([filters.reshape(f, -1), exps[:, None]], axis=1)


class FieldsOfExperts:
    """R_θ(x) for images of ``image_shape`` with F = ``num_filters`` K×K filters.

    ``learn`` selects the learned parameters ("filters", "exponents" or "both"); the
    others are masked out of ``jac_t``.  ``gamma`` is the Huber / smooth-ℓ1 parameter.
    """

    def __init__(
        self,
        image_shape: tuple[int, int],
        kernel_size: int,
        num_filters: int,
        *,
        expert: str = "lorentzian",
        gamma: float = 0.01,
        learn: Literal["filters", "exponents", "both"] = "both",
    ) -> None:
        if len(image_shape) != 2:
            raise ValueError(f"image_shape must be (H, W); got image_shape={image_shape!r}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer; got {kernel_size!r}")
        if num_filters < 1:
            raise ValueError(f"num_filters must be positive; got {num_filters!r}")
        if learn not in LEARN_OPTIONS:
            raise ValueError(f"learn must be one of {LEARN_OPTIONS}; got learn={learn!r}")
        self.image_shape = (int(image_shape[0]), int(image_shape[1]))
        self.n = self.image_shape[0] * self.image_shape[1]
        self.kernel_size = int(kernel_size)
        self.num_filters = int(num_filters)
        self.expert = Expert(expert, gamma)
        self.learn = learn
        self.theta_shape = (self.num_filters, self.kernel_size**2 + 1)

    def __repr__(self) -> str:
        return (
            f"FieldsOfExperts(image_shape={self.image_shape}, kernel_size={self.kernel_size}, "
            f"num_filters={self.num_filters}, expert={self.expert.name!r}, "
            f"gamma={self.expert.gamma}, learn={self.learn!r})"
        )

    # -- parameters ----------------------------------------------------------------
    def mask_host(self) -> np.ndarray:
        """Flat (p,) 0/1 host mask of the learned entries of θ."""
        mask = np.zeros(self.theta_shape)
        if self.learn in ("filters", "both"):
            mask[:, :-1] = 1.0
        if self.learn in ("exponents", "both"):
            mask[:, -1] = 1.0
        return mask.reshape(-1)

    def _split(self, xp: Any, theta: Any) -> tuple[Any, Any]:
        theta = check_theta(xp, theta, self.theta_shape)
        k2 = self.kernel_size**2
        return theta[:, :k2], xp.exp(LN10 * theta[:, k2])

    # -- convolutions ----------------------------------------------------------------
    def _stack(self, xp: Any, cols: Any) -> Any:
        """Shifted copies of the padded block (n, b): shape (K², n·b), row a·K + c ↔ k[a, c]."""
        h, w = self.image_shape
        k = self.kernel_size
        r = k // 2
        img = pad_zeros_2d(xp, xp.reshape(cols, (h, w, cols.shape[1])), r)
        # (k ∗ x)[i, j] = Σ_{a,c} k[a, c] x[i + r − a, j + r − c]
        #              = Σ_{a,c} k[a, c] P[i + 2r − a, j + 2r − c]   (P: x padded by r)
        shifts = [
            img[2 * r - a : 2 * r - a + h, 2 * r - c : 2 * r - c + w, :]
            for a in range(k)
            for c in range(k)
        ]
        return xp.reshape(xp.stack(shifts, axis=0), (k * k, -1))

    def _adjoint(self, xp: Any, filters: Any, u: Any, b: int) -> Any:
        """Σ_f k_f ⋆ u_f (correlation) for u of shape (F, n·b) → (n, b)."""
        h, w = self.image_shape
        k = self.kernel_size
        r = k // 2
        mixed = xp.reshape(xp.matmul(xp.permute_dims(filters, (1, 0)), u), (k * k, h, w, b))
        # out[i, j] = Σ_{a,c} mixed[a·K + c, i + a − r, j + c − r] (zero outside): scatter each
        # shifted plane into a buffer padded by 2r, then crop
        buf = xp.zeros((h + 2 * r, w + 2 * r, b), dtype=u.dtype, device=array_api_compat.device(u))
        for a in range(k):
            for c in range(k):
                rows = slice(2 * r - a, 2 * r - a + h)
                cols = slice(2 * r - c, 2 * r - c + w)
                buf[rows, cols, :] += mixed[a * k + c, ...]
        return xp.reshape(buf[r : r + h, r : r + w, :], (self.n, b))

    def convolve(self, v: Any, filters: Any) -> Any:
        """(k_f ∗ v) for all filters: v (n,) → (F, n); v (n, b) → (F, n, b).

        ``filters`` has shape (F, K, K) or (F, K²) on v's device.
        """
        check_vector(v, self.n, "v")
        xp, _ = namespace_and_device(v, filters)
        filters = xp.reshape(filters, (filters.shape[0], self.kernel_size**2))
        cols, single = as_columns(v)
        z = xp.matmul(filters, self._stack(xp, cols))
        if single:
            return z
        return xp.reshape(z, (filters.shape[0], self.n, cols.shape[1]))

    def convolve_adjoint(self, u: Any, filters: Any) -> Any:
        """Σ_f (adjoint of k_f ∗)(u_f): u (F, n) → (n,); u (F, n, b) → (n, b)."""
        xp, _ = namespace_and_device(u, filters)
        filters = xp.reshape(filters, (filters.shape[0], self.kernel_size**2))
        single = u.ndim == 2
        b = 1 if single else u.shape[2]
        out = self._adjoint(xp, filters, xp.reshape(u, (u.shape[0], -1)), b)
        return from_columns(xp, out, single)

    # -- R, ∇R, ∇²R v, Jᵀ ---------------------------------------------------------------
    def _responses(self, xp: Any, x: Any, filters: Any) -> tuple[Any, Any]:
        """The stack of x (K², n) and the filter responses z = k ∗ x (F, n)."""
        sx = self._stack(xp, xp.reshape(x, (self.n, 1)))
        return sx, xp.matmul(filters, sx)

    def value(self, x: Any, theta: Any) -> Any:
        """R_θ(x) as a 0-d array."""
        xp, _ = namespace_and_device(x, theta)
        filters, scales = self._split(xp, theta)
        _, z = self._responses(xp, x, filters)
        return xp.sum(scales * xp.sum(self.expert.value(z), axis=1))

    def grad(self, x: Any, theta: Any) -> Any:
        """∇R = Σ_f 10^{p_f} k̃_f ∗ φ'(k_f ∗ x), shape (n,)."""
        xp, _ = namespace_and_device(x, theta)
        filters, scales = self._split(xp, theta)
        _, z = self._responses(xp, x, filters)
        u = scales[:, None] * self.expert.d1(z)
        return xp.reshape(self._adjoint(xp, filters, u, 1), (self.n,))

    def value_and_grad(self, x: Any, theta: Any) -> tuple[Any, Any]:
        """(R_θ(x), ∇R) sharing the filter responses k_f ∗ x."""
        xp, _ = namespace_and_device(x, theta)
        filters, scales = self._split(xp, theta)
        _, z = self._responses(xp, x, filters)
        phi, u = self.expert.value_and_d1(z)
        value = xp.sum(scales * xp.sum(phi, axis=1))
        u *= scales[:, None]
        return value, xp.reshape(self._adjoint(xp, filters, u, 1), (self.n,))

    def hvp(self, x: Any, theta: Any, v: Any) -> Any:
        """∇²R v = Σ_f 10^{p_f} k̃_f ∗ (φ''(k_f ∗ x) ⊙ (k_f ∗ v)) for v (n,) or (n, b)."""
        xp, _ = namespace_and_device(x, theta, v)
        filters, scales = self._split(xp, theta)
        _, z = self._responses(xp, x, filters)
        cols, single = as_columns(v)
        b = cols.shape[1]
        weight = self.expert.d2(z)
        weight *= scales[:, None]  # (F, n)
        kv = xp.reshape(xp.matmul(filters, self._stack(xp, cols)), (self.num_filters, self.n, b))
        kv *= weight[:, :, None]
        u = xp.reshape(kv, (self.num_filters, self.n * b))
        return from_columns(xp, self._adjoint(xp, filters, u, b), single)

    def jac_t(self, x: Any, theta: Any, w: Any) -> Any:
        """∂θ⟨∇R_θ(x), w⟩, unmasked: w (n,) → (p,); w (n, b) → (p, b) (θ flattened row-major).

        With z_f = k_f ∗ x and s_f = 10^{p_f}, ⟨∇R, w⟩ = Σ_f s_f ⟨φ'(z_f), k_f ∗ w⟩, so
        ∂/∂k_f[a] = s_f (⟨φ''(z_f) ⊙ (k_f ∗ w), S_a x⟩ + ⟨φ'(z_f), S_a w⟩) with S_a the shift
        for filter entry a, and ∂/∂p_f = ln(10) s_f ⟨φ'(z_f), k_f ∗ w⟩.
        """
        xp, _ = namespace_and_device(x, theta, w)
        filters, scales = self._split(xp, theta)
        sx, z = self._responses(xp, x, filters)
        d1, d2 = self.expert.d1(z), self.expert.d2(z)
        cols, single = as_columns(w)
        b = cols.shape[1]
        f, n, k2 = self.num_filters, self.n, self.kernel_size**2
        sw = self._stack(xp, cols)  # (K², n·b)
        kw = xp.reshape(xp.matmul(filters, sw), (f, n, b))
        inner = xp.matmul(sx, d2[:, :, None] * kw)  # (F, K², b): kernel in the inner conv
        sw_t = xp.reshape(xp.permute_dims(xp.reshape(sw, (k2, n, b)), (1, 0, 2)), (n, k2 * b))
        outer = xp.reshape(xp.matmul(d1, sw_t), (f, k2, b))  # kernel in the outer conv
        d_filters = scales[:, None, None] * (inner + outer)
        d_exps = (LN10 * scales)[:, None] * xp.sum(d1[:, :, None] * kw, axis=1)  # (F, b)
        out = xp.concat([d_filters, d_exps[:, None, :]], axis=1)
        return from_columns(xp, xp.reshape(out, (f * (k2 + 1), b)), single)
