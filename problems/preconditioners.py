"""An FFT preconditioner M ≈ H⁻¹ for the FoE imaging Hessians
H_i = A_iᵀA_i + Σ_f K_fᵀ diag(w_{f,i}) K_f + εI with w_{f,i} = 10^{p_f} φ''(K_f x_i).

Each weight field becomes its clipped mean c_{f,i} = mean(max(w_{f,i}, 0)) (the clip keeps
M positive definite where a non-convex expert has φ'' < 0), A_iᵀA_i a convolution (a blur
by |ĝ|², an inpainting mask by its kept fraction, the identity by 1) and the image
boundary (zero or symmetric) a periodic one.  Then D_i(ω) = â_i(ω) + Σ_f c_{f,i}|k̂_f(ω)|²
+ ε is real, positive and even, and M_i v = F⁻¹(F v / D_i) is symmetric positive definite:
F + 1 real FFTs of image size to build, one forward and one inverse real FFT per sample to
apply (O(n log n), against O(n F K²) for an HVP).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import array_api_compat
import numpy as np

from problems.foe import FieldsOfExperts
from problems.operators import GaussianBlur, Identity, Inpainting, gaussian_kernel_1d


def _power(xp: Any, kernels: Any, shape: tuple[int, int]) -> Any:
    """|k̂(ω)|² on the rfft grid of ``shape`` for kernels (m, K, K) → (m, h, w // 2 + 1)."""
    return xp.abs(xp.fft.rfftn(kernels, s=shape, axes=(-2, -1))) ** 2


def fft_preconditioner(problem: Any, X: Any, theta: Any, *, frozen: Any = None
                       ) -> Callable[[Any], Any]:
    """M: rows (B, n) → (B, n) (or one point (n,) for B = 1), M_i ≈ H_i(x_i, θ)⁻¹; blocks
    (B, n, k) column by column; ``frozen``: the FoE linearization at (X, θ), if at hand."""
    reg, op = problem.regularizer, problem.operator
    if not isinstance(reg, FieldsOfExperts):
        raise ValueError(f"the FFT preconditioner is built for Fields of Experts, not {reg!r}; "
                         "use solver.preconditioner=none")
    xp = array_api_compat.array_namespace(X)
    X = X if X.ndim == 2 else xp.reshape(X, (1, -1))
    dev, dtype = array_api_compat.device(X), X.dtype
    h, w = reg.image_shape
    k, f, bsz = reg.kernel_size, reg.num_filters, X.shape[0]
    frozen = frozen or reg.linearize(xp, X, theta)
    filters, weight = frozen.filters, frozen.weight()  # weight (F, n·B), pixel-major
    # c (F, B): the mean of each filter's weights over each sample's pixels, summed along
    # contiguous rows (pixel-major → sample-major first) so that a sample's c has the same
    # bits in any batch (subsets of rows: Newton's inner solves, Dask shards, B = 1)
    positive = xp.permute_dims(xp.reshape(xp.maximum(weight, 0.0), (f, h * w, bsz)), (0, 2, 1))
    c = xp.reshape(xp.mean(xp.reshape(positive, (f * bsz, h * w)), axis=1), (f, bsz))
    powers = _power(xp, xp.reshape(filters, (f, k, k)), (h, w))  # (F, h, w')
    # the symbol D_i (B, h, w // 2 + 1), Σ_f c_fi |k̂_f|² summed filter by filter (a
    # product would take another BLAS path for B = 1 than for a batch)
    D = xp.sum(c[:, :, None, None] * powers[:, None, :, :], axis=0)
    if isinstance(op, Identity):
        D = D + 1.0
    elif isinstance(op, Inpainting):
        kept = xp.asarray(op.masks.mean(axis=1), dtype=dtype, device=dev)
        D = D + kept[:, None, None]
    elif isinstance(op, GaussianBlur):
        g = gaussian_kernel_1d(op.sigma)
        D = D + _power(xp, xp.asarray(np.outer(g, g)[None], dtype=dtype, device=dev), (h, w))
    else:
        raise ValueError(f"no FFT symbol for the forward operator {op!r}")
    return SymbolInverse(xp, D + problem.epsilon, (h, w))


class SymbolInverse:
    """M: rows (B, n) → (B, n), the inverse of each sample's FFT symbol D_i (B, h, w′);
    blocks (B, n, k) column by column; ``restrict(rows)``: the same for fewer samples (their
    symbols, the same bits)."""

    def __init__(self, xp: Any, D: Any, shape: tuple[int, int]) -> None:
        self.xp, self.D, self.shape = xp, D, shape

    def _rows(self, V: Any) -> Any:
        xp, (h, w) = self.xp, self.shape
        images = xp.reshape(V, (*V.shape[:-1], h, w))
        out = xp.fft.irfftn(xp.fft.rfftn(images, axes=(-2, -1)) / self.D, s=(h, w),
                            axes=(-2, -1))
        return xp.reshape(xp.astype(out, V.dtype), V.shape)

    def __call__(self, V: Any) -> Any:
        xp = self.xp
        if V.ndim == 3:  # a block (B, n, k), as recycle-space set-up applies M: by columns
            return xp.permute_dims(self._rows(xp.permute_dims(V, (2, 0, 1))), (1, 2, 0))
        return self._rows(V)

    def restrict(self, rows: list[int]) -> SymbolInverse:
        xp = self.xp
        pick = xp.asarray(rows, dtype=xp.int64, device=array_api_compat.device(self.D))
        return SymbolInverse(xp, xp.take(self.D, pick, axis=0), self.shape)
