"""Batch-first problems: the ``Problem`` base class (contract and shared bookkeeping), helpers.

Conventions: a problem holds B samples (``batch_size``); images are flattened row-major,
so a batch of points has shape (B, n) and a block of b vectors per sample (B, n, b).  A
single sample is B = 1: its methods also take one point x (n,) with one vector (n,) or a
block (n, b), and return unwrapped results.  θ (shared by the batch) may be passed with
shape ``theta_shape`` or flat (p,); ``jac_t`` returns flat θ rows: (B, p[, b]) or (p[, b]).
Numerical methods take their array namespace and device from their inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import array_api_compat

from backends.counting import Counter


def as_rows(x: Any, n: int, name: str) -> tuple[Any, bool]:
    """(B, n) rows of ``x`` and whether ``x`` was one point (n,) (then B = 1)."""
    if x.ndim == 1 and x.shape[0] == n:
        return array_api_compat.array_namespace(x).reshape(x, (1, n)), True
    if x.ndim == 2 and x.shape[1] == n:
        return x, False
    raise ValueError(f"{name} has shape {tuple(x.shape)}; expected ({n},) or (B, {n})")


def from_rows(xp: Any, out: Any, single: bool) -> Any:
    """Undo ``as_rows`` on a per-sample result (B, ...) → (...) for one point (None stays)."""
    return xp.reshape(out, tuple(out.shape[1:])) if single and out is not None else out


def as_blocks(v: Any, n: int, batch_size: int, single: bool, name: str) -> Any:
    """Blocks (B, n, b) of ``v``: for one point v (n,) or (n, b); else V (B, n) or (B, n, b)."""
    xp = array_api_compat.array_namespace(v)
    if single:
        if v.ndim in (1, 2) and v.shape[0] == n:
            return xp.reshape(v, (1, n, 1 if v.ndim == 1 else v.shape[1]))
        raise ValueError(f"{name} has shape {tuple(v.shape)}; expected ({n},) or ({n}, b)")
    if v.ndim in (2, 3) and v.shape[0] == batch_size and v.shape[1] == n:
        return v if v.ndim == 3 else xp.reshape(v, (batch_size, n, 1))
    raise ValueError(
        f"{name} has shape {tuple(v.shape)}; expected ({batch_size}, {n}) or ({batch_size}, {n}, b)"
    )


def from_blocks(xp: Any, out: Any, ndim: int, single: bool) -> Any:
    """Undo ``as_blocks`` on a result (B, m, b) for an input of ``ndim`` dimensions."""
    bsz, m, b = out.shape
    if single:
        return xp.reshape(out, (m,) if ndim == 1 else (m, b))
    return out if ndim == 3 else xp.reshape(out, (bsz, m))


Kernel = Callable[[Any], Any]


class Linearization:
    """∇²ₓₓf (``hvp``, also ``__call__``) and Jᵀ (``jac_t``, masked by ``theta_mask``) of a
    problem frozen at (X, θ), from its kernels on blocks ``hvp3`` (B, n, b) → (B, n, b) and
    ``jac_t3`` (B, n, b) → (B, p, b); each call counts one pass of B·b applications in
    ``problem.counter``.  ``frozen``: the regulariser's own linearization;
    ``value_and_grad``: the counted (f, ∇ₓf) at the point from its work (or None)."""

    def __init__(self, problem: Any, hvp3: Kernel, jac_t3: Kernel, *, single: bool,
                 frozen: Any = None, value_and_grad: Callable[[], Any] | None = None) -> None:
        self.problem, self.single, self.frozen = problem, single, frozen
        self.value_and_grad = value_and_grad
        self._hvp3, self._jac_t3 = hvp3, jac_t3
        self.batch_size, self.n = problem.batch_size, problem.n
        self.shape = (problem.n, problem.n)

    def hvp(self, v: Any) -> Any:
        """∇²ₓₓf_i v_i, shaped like v."""
        v3 = as_blocks(v, self.n, self.batch_size, self.single, "v")
        self.problem.counter.add("hvp", self.batch_size * int(v3.shape[2]))
        out = self._hvp3(v3)
        return from_blocks(array_api_compat.array_namespace(v), out, v.ndim, self.single)

    __call__ = hvp

    def jac_t(self, w: Any) -> Any:
        """∂θ⟨∇ₓf_i, w_i⟩ masked by ``theta_mask``: (n,) → (p,), (n, b) → (p, b);
        (B, n) → (B, p), (B, n, b) → (B, p, b)."""
        w3 = as_blocks(w, self.n, self.batch_size, self.single, "w")
        self.problem.counter.add("jac_t", self.batch_size * int(w3.shape[2]))
        out = self._jac_t3(w3)
        out *= self.problem.theta_mask[None, :, None]
        return from_blocks(array_api_compat.array_namespace(w), out, w.ndim, self.single)


def check_theta(xp: Any, theta: Any, theta_shape: tuple[int, ...]) -> Any:
    """Return θ with shape ``theta_shape``; accept that shape or the flat (p,) vector."""
    shape = tuple(theta.shape)
    if shape == tuple(theta_shape):
        return theta
    p = math.prod(theta_shape)
    if shape == (p,):
        return xp.reshape(theta, tuple(theta_shape))
    raise ValueError(f"theta has shape {shape}; expected {tuple(theta_shape)} (or flat ({p},))")


def check_agree(
    label: str, items: Sequence[Any], shared: dict[str, Callable[[Any], Any]], cls: type
) -> Any:
    """The first of ``items`` after checking there is one, each is a ``cls`` and all agree
    on each ``shared`` property (its name → its value for an item)."""
    if len(items) == 0:
        raise ValueError(f"{label} must contain at least one {cls.__name__}")
    first = items[0]
    for i, item in enumerate(items):
        if not isinstance(item, cls):
            raise ValueError(f"{label}[{i}] is a {type(item).__name__}, not a {cls.__name__}")
        for name, key in shared.items():
            if key(item) != key(first):
                raise ValueError(
                    f"{label}[{i}] has {name} {key(item)!r}; {label}[0] has {key(first)!r}"
                )
    return first


LN10 = math.log(10.0)  # regularisers weight by 10^θ


class RowRegularizer:
    """A regulariser of (H, W) images.  Subclasses set ``theta_shape`` and implement
    ``rows_value_and_grad(xp, X, θ, *, value=True, grad=True)`` (R_θ(x_i) (B,) and ∇R(x_i)
    (B, n) of rows X (B, n); None where not asked), ``linearize(xp, X, θ)`` (``hvp``/``jac_t``
    on blocks (B, n, b)), ``mask_host()`` (flat 0/1 mask of the learned entries of θ),
    ``log_weight_mask_host()`` (flat 0/1 mask of θ's log10 weights: adding s to all of them
    scales R_θ by 10^s) and a ``repr`` naming their whole configuration (equal reprs are
    solved as one batch)."""

    def __init__(self, image_shape: tuple[int, int]) -> None:
        if len(image_shape) != 2:
            raise ValueError(f"image_shape must be (H, W); got image_shape={image_shape!r}")
        self.image_shape = (int(image_shape[0]), int(image_shape[1]))
        self.n = self.image_shape[0] * self.image_shape[1]

    def value(self, x: Any, theta: Any) -> Any:
        """R_θ(x_i): 0-d for x (n,), (B,) for X (B, n)."""
        xp = array_api_compat.array_namespace(x, theta)
        X, single = as_rows(x, self.n, "x")
        return from_rows(xp, self.rows_value_and_grad(xp, X, theta, grad=False)[0], single)


UPPER_LOSSES = ("squared_error", "neg_psnr")


class Problem:
    """B samples f_i(x, θ) with upper loss ℓ_i(x) (``upper``: ``squared_error``
    ½‖x − x_true,i‖², or ``neg_psnr`` 10 log10(‖x − x_true,i‖²/n + δ), minus the PSNR in
    dB of images in [0, 1] for the ``mse_floor`` δ = 0; δ > 0 caps the gain a crop already
    reconstructed to an MSE ≪ δ can add to the mean), counted operators and the shared
    bookkeeping.  Subclasses set the attributes below and implement
    ``_rows_value_and_grad(X, θ, *, value, grad)`` (f (B,) and ∇ₓf (B, n) of rows X,
    uncounted; None where not asked), ``linearize`` and ``_select(rows)`` (a new problem)."""

    n: int
    batch_size: int
    image_shape: tuple[int, ...]
    theta_shape: tuple[int, ...]
    counter: Counter
    xp: Any
    device: Any
    dtype: Any
    X_true: Any
    Y: Any
    theta_mask: Any
    upper: str = "squared_error"
    mse_floor: float = 0.0  # δ of neg_psnr
    scales: tuple[float, ...] | None = None  # per sample: its image is scale · x (None: 1)

    def _rows(self, x: Any) -> tuple[Any, bool]:
        """x promoted to (B, n); one point (n,) only for a single-sample problem."""
        rows, single = as_rows(x, self.n, "x")
        if rows.shape[0] != self.batch_size:
            one = f"({self.n},) or " if self.batch_size == 1 else ""
            raise ValueError(f"x has shape {tuple(x.shape)}; expected "
                             f"{one}({self.batch_size}, {self.n})")
        return rows, single

    def _sample_row(self, a: Any, name: str) -> Any:
        if self.batch_size != 1:
            raise ValueError(
                f"{name} of a batch of {self.batch_size} samples is ambiguous; "
                "use the batch arrays X_true / Y or subset([i])"
            )
        return a[0, ...]

    @property
    def x_true(self) -> Any:
        """The ground truth (n,) of a single-sample problem."""
        return self._sample_row(self.X_true, "x_true")

    @property
    def y(self) -> Any:
        """The data of a single-sample problem."""
        return self._sample_row(self.Y, "y")

    @property
    def scale(self) -> float:
        """A single-sample problem's intensity scale: its image is scale · x (1 unless the
        sample was posed on its data's scale, ``ImagingProblem.from_image(normalize=True)``)."""
        self._sample_row(self.Y, "scale")
        return 1.0 if self.scales is None else self.scales[0]

    def upper_loss(self, x: Any) -> Any:
        """ℓ_i(x_i) (see the class doc): 0-d or (B,)."""
        rows, single = self._rows(x)
        r = rows - self.X_true
        sq = self.xp.sum(r * r, axis=1)
        if self.upper == "neg_psnr":
            return from_rows(self.xp, (10.0 / LN10) * self.xp.log(sq / self.n + self.mse_floor),
                             single)
        return from_rows(self.xp, 0.5 * sq, single)

    def upper_grad(self, x: Any) -> Any:
        """∇ℓ_i(x_i), shaped like x: x_i − x_true,i, or (20/ln 10)(x_i − x_true,i)/(‖x_i −
        x_true,i‖² + nδ) for ``neg_psnr``."""
        rows, single = self._rows(x)
        r = rows - self.X_true
        if self.upper == "neg_psnr":
            r = r * ((20.0 / LN10) / (self.xp.sum(r * r, axis=1) + self.n * self.mse_floor)
                     )[:, None]
        return from_rows(self.xp, r, single)

    def _value_and_grad(self, x: Any, theta: Any, *, value: bool, grad: bool,
                        **shared: Any) -> tuple[Any, Any]:
        X, single = self._rows(x)
        out = self._rows_value_and_grad(X, theta, value=value, grad=grad, **shared)
        if value:
            self.counter.add("f", self.batch_size)
        if grad:
            self.counter.add("grad", self.batch_size)
        return from_rows(self.xp, out[0], single), from_rows(self.xp, out[1], single)

    def lower_objective(self, x: Any, theta: Any) -> Any:
        """f_i(x_i, θ): 0-d for x (n,), (B,) for X (B, n) (counts B 'f')."""
        return self._value_and_grad(x, theta, value=True, grad=False)[0]

    def lower_grad(self, x: Any, theta: Any) -> Any:
        """∇ₓf_i(x_i, θ), shaped like x (counts B 'grad')."""
        return self._value_and_grad(x, theta, value=False, grad=True)[1]

    def lower_value_and_grad(self, x: Any, theta: Any) -> tuple[Any, Any]:
        """(f, ∇ₓf) sharing their work (counts B 'f' and B 'grad')."""
        return self._value_and_grad(x, theta, value=True, grad=True)

    def hvp(self, x: Any, theta: Any, v: Any) -> Any:
        """∇²ₓₓf v: x (n,) with v (n,) or (n, b); X (B, n) with V (B, n) or (B, n, b)."""
        return self.linearize(x, theta).hvp(v)

    def jac_t(self, x: Any, theta: Any, w: Any) -> Any:
        """∂θ⟨∇ₓf, w⟩: w (n,) → (p,), (n, b) → (p, b); W (B, n) → (B, p), (B, n, b) → (B, p, b)."""
        return self.linearize(x, theta).jac_t(w)

    def linearize(self, x: Any, theta: Any) -> Linearization:
        """∇²ₓₓf and Jᵀ frozen at (x, θ)."""
        raise NotImplementedError

    def subset(self, rows: Sequence[int]) -> Any:
        """Samples ``rows`` (host indices, in that order) as a problem of their own, sharing
        this one's counter; the last few subsets are cached."""
        key = tuple(int(r) for r in rows)
        if not key or any(not 0 <= r < self.batch_size for r in key):
            raise ValueError(f"rows must be a non-empty list of sample indices in "
                             f"[0, {self.batch_size}); got {list(key)!r}")
        if key == tuple(range(self.batch_size)):
            return self
        cache = self.__dict__.setdefault("_subsets", {})
        if key not in cache:
            if len(cache) >= 8:
                cache.pop(next(iter(cache)))
            cache[key] = self._select(key)
        return cache[key]


def pad_zeros_2d(xp: Any, a: Any, c: int) -> Any:
    """Zero-pad the two image axes of ``a`` (shape (..., H, W, b)) by ``c`` on each side."""
    if c == 0:
        return a
    *lead, h, w, b = a.shape
    dev = array_api_compat.device(a)
    out = xp.zeros((*lead, h + 2 * c, w + 2 * c, b), dtype=a.dtype, device=dev)
    out[..., c : c + h, c : c + w, :] = a
    return out


def psnr(x: Any, x_true: Any) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1] (host float)."""
    xp = array_api_compat.array_namespace(x, x_true)
    mse = float(xp.mean((x - x_true) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(1.0 / mse)
