"""Fields-of-Experts regulariser R_θ(x) = Σ_f Σ_m 10^{p_fm} Σ_j φ_m((k_f ∗ x)_j), batch-first.

φ_m is the expert at width γ·c_m for the M multipliers c_m of ``widths`` (default one, c = 1:
the classic FoE, one weight per filter); with M > 1 each filter's expert is a learned
mixture of widths, Σ_m 10^{p_fm} φ(z; γ c_m) (the Student-t expert then spans a family of
heavy-tailed penalties, as the scale mixtures of Gaussians do, with the mixture weights
learned per filter).

θ has shape (F, K·K + M): row f holds filter k_f flattened row-major, then the exponents
p_f1 … p_fM.  With ``zero_mean`` the filter is that row minus its mean, k_f = u_f − mean(u_f): the
regulariser is then blind to the image's mean level whatever θ an optimiser reaches, and
Jᵀ's filter part is projected the same way (the chain rule through the centring).

∗ is the true 2-D convolution with output the image's size, for odd K, on the image padded
by r = K // 2 on each side as ``boundary`` says:

- ``"zero"`` (the default): zeros outside, ``scipy.signal.convolve2d(x, k, mode="same")``;
  a derivative-like filter then sees a jump at the border and penalises the border
  pixels' own values;
- ``"symmetric"``: the image reflected about its edges (the edge pixel repeated,
  ``numpy.pad(x, r, mode="symmetric")``: P[r − 1 − t] = x[t], P[r + h + t] = x[h − 1 − t]
  for t < r; rows, then columns, so corners reflect twice), i.e.
  ``scipy.signal.convolve2d(x, k, mode="same", boundary="symm")``; needs r ≤ H, W.

Layout: blocks (B, n, b) are laid out batch-last, (H, W, B·b); the K² shifted copies of
the padded batch, stacked once (K², n·B·b), meet all F filters in one matmul, and the
adjoint is one matmul and K² shifted additions, then the padding's adjoint: the interior
(zero), or the interior with the ring folded back (added) onto the pixels it copies
(symmetric).  Filter responses are pixel-major (F, n·B); Jᵀ works in the sample-major
layout (K², B, n, b).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cached_property
from typing import Any, Literal

import array_api_compat
import numpy as np

from backends.kernels import flipped_windows, shifted_sum
from problems.base import LN10, RowRegularizer, check_theta, pad_zeros_2d
from problems.experts import WIDTHLESS_EXPERTS, Expert

LEARN_OPTIONS = ("filters", "exponents", "both")
BOUNDARY_OPTIONS = ("zero", "symmetric")
COLUMN_WISE = 8  # batch size from which NumPy applies a block Hessian column by column


def dct_filters(kernel_size: int) -> np.ndarray:
    """The orthonormal 2-D DCT-II basis of size K×K without the constant filter, (K² − 1, K, K):
    filter (u, v) (row-major, not both 0) is c_u c_vᵀ with c_u[i] = α_u cos(π (2i + 1) u / (2K)),
    α_0 = √(1/K), α_u = √(2/K)."""
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
    """Seeded random filters (num_filters, K, K): i.i.d. N(0, 1) entries, then each made
    zero-mean and unit-norm."""
    k = int(kernel_size)
    rng = np.random.default_rng(seed)
    filters = rng.standard_normal((num_filters, k, k))
    filters -= filters.mean(axis=(1, 2), keepdims=True)
    filters /= np.linalg.norm(filters.reshape(num_filters, -1), axis=1)[:, None, None]
    return filters


def _reflect_ring(xp: Any, padded: Any, r: int, axis: int) -> Any:
    """Fill, in place, the ring of width r around the interior of ``padded`` (image axes
    ``axis``, ``axis + 1``; interior already written) by the symmetric reflection: rows
    over the interior columns, then columns over all rows (corners reflect twice)."""
    lead = (slice(None),) * axis
    hp, wp = padded.shape[axis], padded.shape[axis + 1]
    h, w = hp - 2 * r, wp - 2 * r
    cols = slice(r, r + w)
    padded[*lead, :r, cols, ...] = xp.flip(padded[*lead, r:2 * r, cols, ...], axis=axis)
    padded[*lead, r + h:, cols, ...] = xp.flip(padded[*lead, h:h + r, cols, ...], axis=axis)
    padded[*lead, :, :r, ...] = xp.flip(padded[*lead, :, r:2 * r, ...], axis=axis + 1)
    padded[*lead, :, r + w:, ...] = xp.flip(padded[*lead, :, w:w + r, ...], axis=axis + 1)
    return padded


def _fold_ring(xp: Any, buf: Any, r: int) -> Any:
    """The adjoint of ``_reflect_ring`` on the first two axes of ``buf`` (h + 2r, w + 2r, m),
    then of the interior's placement: the ring added back onto the pixels it copies
    (columns over all rows, then rows over the interior columns), the interior (h, w, m)."""
    h, w = buf.shape[0] - 2 * r, buf.shape[1] - 2 * r
    buf[:, r:2 * r, ...] += xp.flip(buf[:, :r, ...], axis=1)
    buf[:, w:w + r, ...] += xp.flip(buf[:, r + w:, ...], axis=1)
    cols = slice(r, r + w)
    buf[r:2 * r, cols, ...] += xp.flip(buf[:r, cols, ...], axis=0)
    buf[h:h + r, cols, ...] += xp.flip(buf[r + h:, cols, ...], axis=0)
    return buf[r:r + h, r:r + w, ...]


def initial_theta(filters: np.ndarray, exponent: float | np.ndarray = 0.0,
                  num_widths: int = 1) -> np.ndarray:
    """Pack host filters (F, K, K) and exponents (scalar, (F,) or (F, M)) into θ of shape
    (F, K² + M), M = ``num_widths`` (a scalar or (F,) exponent starts every width there)."""
    filters = np.asarray(filters, dtype=np.float64)
    f = filters.shape[0]
    exps = np.asarray(exponent, dtype=np.float64)
    exps = np.broadcast_to(exps[:, None] if exps.ndim == 1 else exps, (f, num_widths))
    return np.concatenate([filters.reshape(f, -1), exps], axis=1)


class FieldsOfExperts(RowRegularizer):
    """R_θ(x) for images of ``image_shape`` with F = ``num_filters`` K×K filters; ``learn``
    selects the learned parameters (the others are masked out of the problem's Jᵀ), ``gamma``
    is the experts' width parameter, ``widths`` its multipliers (one weight per filter and
    width; module docstring), ``boundary`` the padding outside the image
    (``BOUNDARY_OPTIONS``; module docstring)."""

    def __init__(
        self,
        image_shape: tuple[int, int],
        kernel_size: int,
        num_filters: int,
        *,
        expert: str = "lorentzian",
        gamma: float = 0.01,
        learn: Literal["filters", "exponents", "both"] = "both",
        boundary: Literal["zero", "symmetric"] = "zero",
        zero_mean: bool = False,
        widths: Sequence[float] = (1.0,),
    ) -> None:
        super().__init__(image_shape)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer; got {kernel_size!r}")
        if learn not in LEARN_OPTIONS:
            raise ValueError(f"learn must be one of {LEARN_OPTIONS}; got learn={learn!r}")
        if boundary not in BOUNDARY_OPTIONS:
            raise ValueError(
                f"boundary must be one of {BOUNDARY_OPTIONS}; got boundary={boundary!r}")
        if boundary == "symmetric" and kernel_size // 2 > min(self.image_shape):
            raise ValueError(f"boundary='symmetric' reflects kernel_size // 2 = "
                             f"{kernel_size // 2} pixels; the image {self.image_shape} "
                             "is smaller")
        widths = tuple(float(c) for c in widths)
        if not widths or not all(c > 0 for c in widths) or len(set(widths)) < len(widths):
            raise ValueError("widths must be distinct positive multipliers of gamma (at least "
                             f"one); got widths={list(widths)!r}")
        if len(widths) > 1 and expert in WIDTHLESS_EXPERTS:
            raise ValueError(f"expert {expert!r} has no width, so its widths would all be "
                             "the same expert; mix widths of huber, smooth_l1 or student_t")
        self.kernel_size = k = int(kernel_size)
        self.num_filters = int(num_filters)
        self.expert = Expert(expert, gamma)  # the expert at width γ, and its name
        self.widths = widths
        self.experts = tuple(Expert(expert, gamma * c) for c in widths)  # one per width
        self.learn = learn
        self.boundary = str(boundary)  # a config's enum member as its name (for the repr)
        self.zero_mean = bool(zero_mean)
        self.theta_shape = (self.num_filters, k**2 + len(widths))
        # (k ∗ x)[i, j] = Σ_{a,c} k[a, c] x[i + r − a, j + r − c]
        #              = Σ_{a,c} k[a, c] P[i + 2r − a, j + 2r − c]   (P: x padded by r = K // 2)
        # so window a·K + c of P (image axes first) pairs with filter entry k[a, c]
        h, w = self.image_shape
        r = self.radius = k // 2
        self.windows = [
            (slice(2 * r - a, 2 * r - a + h), slice(2 * r - c, 2 * r - c + w), ...)
            for a in range(k)
            for c in range(k)
        ]

    def __repr__(self) -> str:
        return (
            f"FieldsOfExperts(image_shape={self.image_shape}, kernel_size={self.kernel_size}, "
            f"num_filters={self.num_filters}, expert={self.expert.name!r}, "
            f"gamma={self.expert.gamma}, learn={self.learn!r}, boundary={self.boundary!r}, "
            f"zero_mean={self.zero_mean}, widths={list(self.widths)})"
        )

    def mask_host(self) -> np.ndarray:
        mask, k2 = np.zeros(self.theta_shape), self.kernel_size**2
        mask[:, :k2] = self.learn != "exponents"
        mask[:, k2:] = self.learn != "filters"
        return mask.reshape(-1)

    def log_weight_mask_host(self) -> np.ndarray:
        mask = np.zeros(self.theta_shape)
        mask[:, self.kernel_size**2:] = 1.0  # the exponents p_fm
        return mask.reshape(-1)

    def split(self, xp: Any, theta: Any) -> tuple[Any, Any]:
        """(filters (F, K²), scales 10^{p_fm} (F, M)); with ``zero_mean`` each filter is its
        row of θ minus that row's mean."""
        theta = check_theta(xp, theta, self.theta_shape)
        k2 = self.kernel_size**2
        filters = theta[:, :k2]
        if self.zero_mean:
            filters = filters - xp.mean(filters, axis=1, keepdims=True)
        return filters, xp.exp(LN10 * theta[:, k2:])

    # -- convolutions in the batch-last layout -----------------------------------------
    def stack(self, xp: Any, v3: Any) -> Any:
        """Shifted copies of the padded batch (B, n, b): (K², n·B·b), row a·K + c ↔ k[a, c];
        column (j, i, c) holds pixel j of sample i, block column c."""
        h, w = self.image_shape
        k, r = self.kernel_size, self.radius
        bsz, _, b = v3.shape
        dev = array_api_compat.device(v3)
        alloc = xp.zeros if self.boundary == "zero" else xp.empty
        padded = alloc((h + 2 * r, w + 2 * r, bsz, b), dtype=v3.dtype, device=dev)
        grid = v3 if bsz == 1 else xp.permute_dims(v3, (1, 0, 2))
        padded[r : r + h, r : r + w, :, :] = xp.reshape(grid, (h, w, bsz, b))
        if self.boundary == "symmetric":
            _reflect_ring(xp, padded, r, 0)
        padded = xp.reshape(padded, (h + 2 * r, w + 2 * r, bsz * b))
        return flipped_windows(xp, padded, k, self.windows)

    def stack_samples(self, xp: Any, v3: Any) -> Any:
        """As ``stack`` in the sample-major layout: (K², B, n, b), for per-sample products."""
        h, w = self.image_shape
        k, r = self.kernel_size, self.radius
        bsz, n, b = v3.shape
        img = xp.reshape(v3, (bsz, h, w, b))
        if self.boundary == "zero":
            img = pad_zeros_2d(xp, img, r)
        else:
            padded = xp.empty((bsz, h + 2 * r, w + 2 * r, b), dtype=v3.dtype,
                              device=array_api_compat.device(v3))
            padded[:, r : r + h, r : r + w, :] = img
            img = _reflect_ring(xp, padded, r, 1)
        shifted = xp.stack([img[:, *win] for win in self.windows], axis=0)
        return xp.reshape(shifted, (k * k, bsz, n, b))

    def adjoint(self, xp: Any, filters: Any, u: Any, bsz: int, b: int) -> Any:
        """Σ_f k_f ⋆ u_f for u of shape (F, n·B·b) (pixel-major) → rows (B, n, b): the
        windows' adjoint, then the padding's (the interior, with the ring folded back onto
        it for the symmetric boundary)."""
        h, w = self.image_shape
        k = self.kernel_size
        mixed = xp.reshape(xp.matmul(xp.permute_dims(filters, (1, 0)), u), (k * k, h, w, bsz * b))
        if self.boundary == "zero":
            crop = shifted_sum(xp, mixed, k, self.windows)
        else:
            full = shifted_sum(xp, mixed, k, self.windows, full=True)
            crop = _fold_ring(xp, full, self.radius)
        grid = xp.reshape(crop, (self.n, bsz, b))
        return self._sample_rows(xp, grid)

    def _sample_rows(self, xp: Any, grid: Any) -> Any:
        """Pixel-major (n, B, ...) → row-major (B, n, ...): a fresh array for B > 1, a
        reshape for B = 1 (fresh when ``grid`` is: the adjoint's reshaped crop is)."""
        if grid.shape[1] == 1:
            return xp.reshape(grid, (1, grid.shape[0], *grid.shape[2:]))
        out = xp.empty((grid.shape[1], grid.shape[0], *grid.shape[2:]), dtype=grid.dtype,
                       device=array_api_compat.device(grid))
        out[...] = xp.permute_dims(grid, (1, 0, *range(2, grid.ndim)))
        return out

    def responses(self, xp: Any, X: Any, filters: Any) -> tuple[Any, Any]:
        """The stack of X (K², n·B) and the filter responses z = k ∗ x (F, n·B)."""
        sx = self.stack(xp, xp.reshape(X, (X.shape[0], self.n, 1)))
        return sx, xp.matmul(filters, sx)

    def rows_value_and_grad(
        self, xp: Any, X: Any, theta: Any, *, value: bool = True, grad: bool = True
    ) -> tuple[Any, Any]:
        return FoELinearization(self, xp, X, theta).value_and_grad(value=value, grad=grad)

    def linearize(self, xp: Any, X: Any, theta: Any) -> FoELinearization:
        return FoELinearization(self, xp, X, theta)


class FoELinearization:
    """What ∇²R and Jᵀ need from (X, θ), computed once: the stack of X and z = k ∗ x
    (pixel-major); on first use Σ_m 10^{p_fm} φ_m''(z) for ``hvp`` and, for ``jac_t``, the
    sample-major stack, each width's φ_m'(z) and the weighted φ''(z) (recomputed in that
    layout for B > 1: cheaper than a transposing copy).

    With one width the weights 10^{p_f} multiply after the experts' sums, as they always
    have (the same bits as before widths existed); with several they weight each width's
    φ_m', φ_m'' before the sums."""

    def __init__(self, reg: FieldsOfExperts, xp: Any, X: Any, theta: Any) -> None:
        self.reg, self.xp, self.X = reg, xp, X
        self.filters, self.scales = reg.split(xp, theta)  # scales (F, M)
        self.sx, self.z = reg.responses(xp, X, self.filters)
        self._weight: Any = None

    def _weighted(self, parts: list[Any]) -> Any:
        """Σ_m 10^{p_fm} parts[m] for parts (F, ...) each (the first one updated in place)."""
        extra = (None,) * (parts[0].ndim - 1)
        out = parts[0]
        out *= self.scales[(slice(None), 0, *extra)]
        for m, part in enumerate(parts[1:], start=1):
            part *= self.scales[(slice(None), m, *extra)]
            out += part
        return out

    def value_and_grad(self, *, value: bool = True, grad: bool = True) -> tuple[Any, Any]:
        """R (B,) and ∇R (B, n) at X from the responses z (None where not asked)."""
        xp, reg, z, scales = self.xp, self.reg, self.z, self.scales
        bsz, n = self.X.shape
        out_value = out_grad = None
        phis, us = [], []
        for expert in reg.experts:
            if value and grad:
                phi, u = expert.value_and_d1(z)
            else:
                phi = expert.value(z) if value else None
                u = expert.d1(z) if grad else None
            phis.append(phi)
            us.append(u)
        if value:  # Σ_j Σ_f 10^{p_fm} φ_m,fj per sample: Σ_f by one product per width (as
            # z = k ∗ x), then each sample's pixels as one contiguous row (its sum
            # independent of B)
            total = xp.matmul(scales[None, :, 0], phis[0])
            for m, phi in enumerate(phis[1:], start=1):
                total += xp.matmul(scales[None, :, m], phi)
            weighted = xp.reshape(total, (n, bsz))
            out_value = xp.sum(reg._sample_rows(xp, weighted), axis=-1)
        if grad:
            u = self._weighted(us)
            out_grad = xp.reshape(reg.adjoint(xp, self.filters, u, bsz, 1), (bsz, n))
        return out_value, out_grad

    def weight(self) -> Any:
        """Σ_m 10^{p_fm} φ_m''(z), (F, n·B)."""
        if self._weight is None:
            self._weight = self._weighted([expert.d2(self.z) for expert in self.reg.experts])
        return self._weight

    def hvp(self, v3: Any) -> Any:
        """∇²R V for V (B, n, b) → (B, n, b) (a fresh array); with NumPy, from
        ``COLUMN_WISE`` samples on, column by column (the same numbers, faster)."""
        xp, (bsz, _, b) = self.xp, v3.shape
        if b > 1 and bsz >= COLUMN_WISE and array_api_compat.is_numpy_namespace(xp):
            return xp.concat([self._hvp(v3[:, :, j : j + 1]) for j in range(b)], axis=2)
        return self._hvp(v3)

    def _hvp(self, v3: Any) -> Any:
        xp, reg = self.xp, self.reg
        bsz, n, b = v3.shape
        f = reg.num_filters
        kv = xp.reshape(xp.matmul(self.filters, reg.stack(xp, v3)), (f, n * bsz, b))
        kv *= self.weight()[:, :, None]
        u = xp.reshape(kv, (f, n * bsz * b))
        return reg.adjoint(xp, self.filters, u, bsz, b)

    @cached_property
    def _sample_major(self) -> tuple[Any, list[Any], Any, Any]:
        """(stack of X (K², B, n), each width's φ_m'(z) (F, B, n), and φ'(z), φ''(z)
        (F, B, n) for the filters' part: with one width unweighted (its weight multiplies
        later), with several weighted and summed) in the sample-major layout."""
        xp, reg = self.xp, self.reg
        bsz, n = self.X.shape
        f, k2 = reg.num_filters, reg.kernel_size**2
        if bsz == 1:
            sx, z = self.sx, self.z
        else:
            sx = xp.reshape(reg.stack_samples(xp, xp.reshape(self.X, (bsz, n, 1))), (k2, -1))
            z = xp.matmul(self.filters, sx)
        z = xp.reshape(z, (f, bsz, n))
        d1 = [expert.d1(z) for expert in reg.experts]
        if len(d1) == 1:
            return xp.reshape(sx, (k2, bsz, n)), d1, d1[0], reg.expert.d2(z)
        d1_sum = self._weighted([xp.asarray(part, copy=True) for part in d1])
        d2_sum = self._weighted([expert.d2(z) for expert in reg.experts])
        return xp.reshape(sx, (k2, bsz, n)), d1, d1_sum, d2_sum

    def jac_t(self, w3: Any) -> Any:
        """∂θ⟨∇R(x_i), w_i⟩ for W (B, n, b) → (B, p, b), unmasked (θ row-major).

        With z_f = k_f ∗ x and s_fm = 10^{p_fm}, ⟨∇R, w⟩ = Σ_f ⟨Σ_m s_fm φ_m'(z_f), k_f ∗ w⟩,
        so ∂/∂k_f[a] = ⟨Σ_m s_fm φ_m''(z_f) ⊙ (k_f ∗ w), S_a x⟩ + ⟨Σ_m s_fm φ_m'(z_f), S_a w⟩
        with S_a the shift for filter entry a, and ∂/∂p_fm = ln(10) s_fm ⟨φ_m'(z_f), k_f ∗ w⟩
        — per sample, as batched products over each sample's pixels: for a few columns,
        (F, n) @ (n, K²) per sample and column; for many (b ≥ 8), (K², n) @ (n, b) per
        sample and filter.
        """
        xp, reg = self.xp, self.reg
        sx, d1_each, d1, d2 = self._sample_major
        bsz, n, b = w3.shape
        f, k2 = reg.num_filters, reg.kernel_size**2
        sw = reg.stack_samples(xp, w3)  # (K², B, n, b)
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
        # one width: its weight multiplies here; several: already inside d1, d2
        d_filters = self.scales[None, :, 0, None, None] * both if len(d1_each) == 1 else both
        if reg.zero_mean:  # the chain rule through k_f = u_f − mean(u_f): the same projection
            d_filters = d_filters - xp.mean(d_filters, axis=2, keepdims=True)
        d_exps = xp.stack([xp.sum(part[:, :, :, None] * kw, axis=2) for part in d1_each],
                          axis=1)  # (F, M, B, b)
        d_exps = (LN10 * self.scales)[None, :, :, None] * xp.permute_dims(d_exps, (2, 0, 1, 3))
        out = xp.concat([d_filters, d_exps], axis=2)
        return xp.reshape(out, (bsz, f * (k2 + len(d1_each)), b))
