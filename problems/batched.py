"""A mini-batch of imaging samples solved together: arrays (B, n), blocks (B, n, b).

``BatchedImagingProblem.from_problems`` stacks B ``ImagingProblem`` samples that share the
image shape, the regulariser configuration, θ's shape, ε and the forward-operator kind
(per-sample data y_i and masks; blur shares σ).  Rows are samples, images flattened
row-major.  Every method processes the whole batch (and a block of b vectors per sample)
in one pass and counts B (or B·b) evaluations / applications in the shared ``counter``.
``linearize(X, θ)`` precomputes what depends only on (X, θ), so that each HVP in a Krylov
loop costs just k ∗ v and its adjoint (FoE).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import array_api_compat

from backends.counting import Counter
from problems.base import check_theta
from problems.batched_foe import BatchedFoE
from problems.batched_operators import BatchedOperator
from problems.batched_tv import BatchedTV
from problems.foe import FieldsOfExperts
from problems.imaging import ImagingProblem
from problems.tv import TotalVariation


def regularizer_key(reg: Any) -> tuple[Any, ...]:
    """What two regularisers must share to be batched."""
    if isinstance(reg, FieldsOfExperts):
        return ("foe", reg.image_shape, reg.kernel_size, reg.num_filters, reg.expert, reg.learn)
    if isinstance(reg, TotalVariation):
        return ("tv", reg.image_shape, reg.gamma)
    raise ValueError(
        f"regularizer: unsupported {type(reg).__name__}; use FieldsOfExperts or TotalVariation"
    )


def batched_regularizer(reg: Any) -> BatchedFoE | BatchedTV:
    """The batched kernels for a ``FieldsOfExperts`` or ``TotalVariation``."""
    regularizer_key(reg)
    return BatchedFoE(reg) if isinstance(reg, FieldsOfExperts) else BatchedTV(reg)


def _check_batch(a: Any, bsz: int, n: int, name: str, ndims: tuple[int, ...]) -> None:
    if a.ndim not in ndims or a.shape[0] != bsz or a.shape[1] != n:
        want = " or ".join(
            f"({bsz}, {n})" if d == 2 else f"({bsz}, {n}, b)" for d in ndims
        )
        raise ValueError(f"{name} has shape {tuple(a.shape)}; expected {want}")


class BatchedImagingProblem:
    """B imaging samples f_i(x, θ) = ½‖A_i x − y_i‖² + R_θ(x) + (ε/2)‖x‖², one θ."""

    def __init__(
        self,
        X_true: Any,
        Y: Any,
        operator: BatchedOperator,
        regularizer: Any,
        *,
        epsilon: float,
        counter: Counter | None = None,
    ) -> None:
        xp = array_api_compat.array_namespace(X_true, Y)
        self.xp = xp
        self.device = array_api_compat.device(X_true)
        self.dtype = X_true.dtype
        self.kernels = batched_regularizer(regularizer)
        self.regularizer = regularizer
        self.image_shape = tuple(regularizer.image_shape)
        self.n = regularizer.n
        self.batch_size = int(X_true.shape[0])
        _check_batch(X_true, self.batch_size, self.n, "X_true", (2,))
        _check_batch(Y, self.batch_size, self.n, "Y", (2,))
        self.X_true, self.Y = X_true, Y
        self.operator = operator
        self.epsilon = float(epsilon)
        self.counter = counter if counter is not None else Counter()
        self.theta_shape = tuple(regularizer.theta_shape)
        self.p = math.prod(self.theta_shape)
        self.theta_mask = xp.asarray(regularizer.mask_host(), dtype=self.dtype, device=self.device)
        self._subsets: dict[tuple[int, ...], BatchedImagingProblem] = {}

    @classmethod
    def from_problems(
        cls, problems: Sequence[ImagingProblem], *, counter: Counter | None = None
    ) -> BatchedImagingProblem:
        """Stack samples (validated: image shape, regulariser, θ shape, ε, operator kind)."""
        if len(problems) == 0:
            raise ValueError("problems must contain at least one ImagingProblem")
        first = problems[0]
        key = regularizer_key(first.regularizer)
        for i, pr in enumerate(problems):
            if not isinstance(pr, ImagingProblem):
                raise ValueError(f"problems[{i}] is a {type(pr).__name__}, not an ImagingProblem")
            if pr.image_shape != first.image_shape:
                raise ValueError(
                    f"problems[{i}] has image shape {pr.image_shape}; "
                    f"problems[0] has {first.image_shape}"
                )
            if regularizer_key(pr.regularizer) != key:
                raise ValueError(
                    f"problems[{i}] has regulariser {pr.regularizer!r}; "
                    f"problems[0] has {first.regularizer!r}"
                )
            if pr.theta_shape != first.theta_shape:
                raise ValueError(
                    f"problems[{i}] has theta shape {pr.theta_shape}; "
                    f"problems[0] has {first.theta_shape}"
                )
            if pr.epsilon != first.epsilon:
                raise ValueError(
                    f"problems[{i}] has epsilon={pr.epsilon}; problems[0] has {first.epsilon}"
                )
            if pr.xp is not first.xp or pr.device != first.device or pr.dtype != first.dtype:
                raise ValueError(
                    f"problems[{i}] lives on {pr.device!r} ({pr.dtype}); "
                    f"problems[0] on {first.device!r} ({first.dtype})"
                )
        xp = first.xp
        operator = BatchedOperator.from_operators(
            [pr.operator for pr in problems], xp, first.device, first.dtype
        )
        X_true = xp.stack([pr.x_true for pr in problems], axis=0)
        Y = xp.stack([pr.y for pr in problems], axis=0)
        return cls(
            X_true, Y, operator, first.regularizer, epsilon=first.epsilon, counter=counter
        )

    def __repr__(self) -> str:
        return (
            f"BatchedImagingProblem(batch_size={self.batch_size}, n={self.n}, "
            f"operator={self.operator.kind.__name__}, regularizer={self.regularizer!r}, "
            f"epsilon={self.epsilon})"
        )

    def subset(self, rows: Sequence[int]) -> BatchedImagingProblem:
        """The samples ``rows`` (host indices, in that order) as a batch sharing this
        problem's counter; the last few subsets are cached."""
        key = tuple(int(r) for r in rows)
        if key == tuple(range(self.batch_size)):
            return self
        cached = self._subsets.get(key)
        if cached is None:
            bad = [r for r in key if not 0 <= r < self.batch_size]
            if bad or not key:
                raise ValueError(
                    f"rows must be a non-empty list of sample indices in [0, {self.batch_size}); "
                    f"got {list(key)!r}"
                )
            xp = self.xp
            index = xp.asarray(list(key), dtype=xp.int64, device=self.device)
            cached = BatchedImagingProblem(
                xp.take(self.X_true, index, axis=0), xp.take(self.Y, index, axis=0),
                self.operator.rows(xp, index), self.regularizer, epsilon=self.epsilon,
                counter=self.counter,
            )
            if len(self._subsets) >= 8:
                self._subsets.pop(next(iter(self._subsets)))
            self._subsets[key] = cached
        return cached

    def _theta(self, theta: Any) -> Any:
        return check_theta(self.xp, theta, self.theta_shape)

    def _x(self, X: Any) -> None:
        _check_batch(X, self.batch_size, self.n, "X", (2,))

    def lower_objective(self, X: Any, theta: Any) -> Any:
        """f_i(x_i, θ) for every row: (B,) (counts B 'f')."""
        self._x(X)
        xp = array_api_compat.array_namespace(X)
        theta = self._theta(theta)
        self.counter.add("f", self.batch_size)
        r = self.operator.apply(xp, X) - self.Y
        data = 0.5 * xp.sum(r * r, axis=1)
        reg = self.kernels.value(xp, X, theta)
        return data + reg + (0.5 * self.epsilon) * xp.sum(X * X, axis=1)

    def lower_grad(self, X: Any, theta: Any) -> Any:
        """∇ₓf_i(x_i, θ) for every row: (B, n) (counts B 'grad')."""
        self._x(X)
        xp = array_api_compat.array_namespace(X)
        theta = self._theta(theta)
        self.counter.add("grad", self.batch_size)
        data = self.operator.adjoint(xp, self.operator.apply(xp, X) - self.Y)
        return data + self.kernels.grad(xp, X, theta) + self.epsilon * X

    def lower_value_and_grad(self, X: Any, theta: Any) -> tuple[Any, Any]:
        """(f_i, ∇ₓf_i) for every row, sharing the regulariser's filter responses
        (counts B 'f' and B 'grad')."""
        self._x(X)
        xp = array_api_compat.array_namespace(X)
        theta = self._theta(theta)
        self.counter.add("f", self.batch_size)
        self.counter.add("grad", self.batch_size)
        r = self.operator.apply(xp, X) - self.Y
        fused = getattr(self.kernels, "value_and_grad", None)
        if fused is not None:
            reg_value, reg_grad = fused(xp, X, theta)
        else:
            reg_value, reg_grad = self.kernels.value(xp, X, theta), self.kernels.grad(xp, X, theta)
        ridge = (0.5 * self.epsilon) * xp.sum(X * X, axis=1)
        value = 0.5 * xp.sum(r * r, axis=1) + reg_value + ridge
        return value, self.operator.adjoint(xp, r) + reg_grad + self.epsilon * X

    def linearize(self, X: Any, theta: Any) -> BatchedLinearization:
        """Freeze (X, θ): the returned object applies ∇²ₓₓf_i and Jᵀ cheaply, counted here."""
        self._x(X)
        xp = array_api_compat.array_namespace(X, theta)
        return BatchedLinearization(self, self.kernels.linearize(xp, X, self._theta(theta)))

    def hvp(self, X: Any, theta: Any, V: Any) -> Any:
        """∇²ₓₓf_i(x_i, θ) v_i: V (B, n) → (B, n); V (B, n, b) → (B, n, b) (one pass)."""
        _check_batch(V, self.batch_size, self.n, "V", (2, 3))
        return self.linearize(X, theta).hvp(V)

    def jac_t(self, X: Any, theta: Any, W: Any) -> Any:
        """∂θ⟨∇ₓf_i(x_i, θ), w_i⟩ (masked): W (B, n) → (B, p); W (B, n, b) → (B, p, b)."""
        _check_batch(W, self.batch_size, self.n, "W", (2, 3))
        return self.linearize(X, theta).jac_t(W)

    def upper_loss(self, X: Any) -> Any:
        """½‖x_i − x_true,i‖² for every row: (B,)."""
        self._x(X)
        xp = array_api_compat.array_namespace(X)
        r = X - self.X_true
        return 0.5 * xp.sum(r * r, axis=1)

    def upper_grad(self, X: Any) -> Any:
        """x_i − x_true,i: (B, n)."""
        self._x(X)
        return X - self.X_true


class BatchedLinearization:
    """∇²ₓₓf_i and Jᵀ_i at a fixed (X, θ); applications are counted in the problem."""

    def __init__(self, problem: BatchedImagingProblem, reg_state: Any) -> None:
        self.problem = problem
        self.reg = reg_state
        self.batch_size, self.n, self.p = problem.batch_size, problem.n, problem.p
        self.shape = (problem.n, problem.n)

    def hvp(self, V: Any) -> Any:
        """V (B, n) → (B, n); V (B, n, b) → (B, n, b); counts B·b 'hvp' in one pass."""
        pr = self.problem
        _check_batch(V, pr.batch_size, pr.n, "V", (2, 3))
        xp = array_api_compat.array_namespace(V)
        v3 = V if V.ndim == 3 else xp.reshape(V, (*V.shape, 1))
        pr.counter.add("hvp", pr.batch_size * int(v3.shape[2]))
        out = self.reg.hvp(v3)
        out += pr.operator.normal(xp, v3)
        if pr.epsilon:
            out += pr.epsilon * v3
        return out if V.ndim == 3 else xp.reshape(out, V.shape)

    def jac_t(self, W: Any) -> Any:
        """W (B, n) → (B, p); W (B, n, b) → (B, p, b), masked by ``theta_mask``; counts B·b."""
        pr = self.problem
        _check_batch(W, pr.batch_size, pr.n, "W", (2, 3))
        xp = array_api_compat.array_namespace(W)
        w3 = W if W.ndim == 3 else xp.reshape(W, (*W.shape, 1))
        pr.counter.add("jac_t", pr.batch_size * int(w3.shape[2]))
        out = self.reg.jac_t(w3) * pr.theta_mask[None, :, None]
        return out if W.ndim == 3 else xp.reshape(out, (pr.batch_size, pr.p))
