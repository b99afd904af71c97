"""The ``Problem`` protocol (one sample of a bilevel problem) and shared array helpers.

Conventions: images are flattened row-major to vectors of shape (n,); a block of b
vectors has shape (n, b).  θ may be passed with shape ``theta_shape`` or flat (p,),
p = prod(theta_shape); ``jac_t`` always returns flat (p,) or (p, b) (row-major θ).
Numerical methods take their array namespace and device from their inputs.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import array_api_compat

from backends.counting import Counter


class SquaredErrorUpperLoss:
    """ℓ(x) = ½‖x − x_true‖² and ∇ℓ = x − x_true for a sample holding ``x_true``."""

    x_true: Any

    def upper_loss(self, x: Any) -> Any:
        xp = array_api_compat.array_namespace(x)
        r = x - self.x_true
        return 0.5 * xp.sum(r * r)

    def upper_grad(self, x: Any) -> Any:
        return x - self.x_true


@runtime_checkable
class Problem(Protocol):
    """One sample: lower level f(x, θ), upper loss ℓ(x) = ½‖x − x_true‖², counted operators.

    ``hvp`` and ``jac_t`` accept one vector (n,) or a block (n, b), process the block in one
    pass and record it in ``counter`` as one pass of b applications.
    """

    n: int
    image_shape: tuple[int, ...]
    theta_shape: tuple[int, ...]
    counter: Counter
    xp: Any
    device: Any
    dtype: Any
    x_true: Any
    y: Any
    theta_mask: Any

    def lower_objective(self, x: Any, theta: Any) -> Any:
        """f(x, θ) as a 0-d array (counts one 'f')."""
        ...

    def lower_grad(self, x: Any, theta: Any) -> Any:
        """∇ₓf(x, θ), shape (n,) (counts one 'grad')."""
        ...

    def hvp(self, x: Any, theta: Any, v: Any) -> Any:
        """∇²ₓₓf(x, θ) v for v of shape (n,) or (n, b)."""
        ...

    def jac_t(self, x: Any, theta: Any, w: Any) -> Any:
        """∂θ⟨∇ₓf(x, θ), w⟩: w (n,) → (p,), w (n, b) → (p, b)."""
        ...

    def upper_loss(self, x: Any) -> Any:
        """½‖x − x_true‖² as a 0-d array."""
        ...

    def upper_grad(self, x: Any) -> Any:
        """x − x_true."""
        ...


def namespace_and_device(*arrays: Any) -> tuple[Any, Any]:
    """The common array namespace and the device of the first array."""
    xp = array_api_compat.array_namespace(*arrays)
    return xp, array_api_compat.device(arrays[0])


def theta_size(theta_shape: tuple[int, ...]) -> int:
    return math.prod(theta_shape)


def check_theta(xp: Any, theta: Any, theta_shape: tuple[int, ...]) -> Any:
    """Return θ with shape ``theta_shape``; accept that shape or the flat (p,) vector."""
    shape = tuple(theta.shape)
    if shape == tuple(theta_shape):
        return theta
    p = theta_size(theta_shape)
    if shape == (p,):
        return xp.reshape(theta, tuple(theta_shape))
    raise ValueError(
        f"theta has shape {shape}; expected {tuple(theta_shape)} (or flat ({p},))"
    )


def check_vector(v: Any, n: int, name: str) -> None:
    """Raise ValueError unless ``v`` has shape (n,) or (n, b)."""
    if v.ndim not in (1, 2) or v.shape[0] != n:
        raise ValueError(f"{name} has shape {tuple(v.shape)}; expected ({n},) or ({n}, b)")


def check_finite(xp: Any, a: Any, name: str) -> None:
    """Raise ValueError naming ``name`` if ``a`` holds NaN or ±inf (a device sync: use at setup)."""
    if not bool(xp.all(xp.isfinite(a))):
        raise ValueError(f"{name} contains NaN or inf values")


def as_columns(v: Any) -> tuple[Any, bool]:
    """View (n,) as (n, 1); return the block and whether the input was a single vector."""
    if v.ndim == 1:
        xp = array_api_compat.array_namespace(v)
        return xp.reshape(v, (v.shape[0], 1)), True
    return v, False


def from_columns(xp: Any, v: Any, single: bool) -> Any:
    """Undo ``as_columns``: (m, 1) → (m,) when the input was a single vector."""
    return xp.reshape(v, (v.shape[0],)) if single else v


def pad_zeros_2d(xp: Any, a: Any, c: int) -> Any:
    """Zero-pad the two image axes of ``a`` (shape (..., H, W, b)) by ``c`` on each side."""
    if c == 0:
        return a
    *lead, h, w, b = a.shape
    dev = array_api_compat.device(a)
    out = xp.zeros((*lead, h + 2 * c, w + 2 * c, b), dtype=a.dtype, device=dev)
    out[..., c : c + h, c : c + w, :] = a
    return out


def psnr(x: Any, x_true: Any, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB (host float)."""
    xp = array_api_compat.array_namespace(x, x_true)
    mse = float(xp.mean((x - x_true) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)
