"""The imaging problem f(x, θ) = ½‖Ax − y‖² + R_θ(x) + (ε/2)‖x‖² for one sample."""

from __future__ import annotations

import math
from typing import Any

import array_api_compat
import numpy as np

from backends.counting import Counter, block_size
from problems.base import SquaredErrorUpperLoss, check_finite, check_theta, check_vector
from problems.operators import add_relative_noise


class ImagingProblem(SquaredErrorUpperLoss):
    """One imaging sample implementing the ``Problem`` protocol.

    ``x_true`` (n,) and ``y`` (n,) are arrays on the backend's device; ``operator`` is a
    forward operator (``apply``/``adjoint``/``normal``) and ``regularizer`` a
    ``FieldsOfExperts`` or ``TotalVariation``.  Inputs are checked for NaN/inf once,
    here (checking in every HVP would sync the device); θ shapes are checked every call.
    """

    def __init__(
        self,
        x_true: Any,
        y: Any,
        operator: Any,
        regularizer: Any,
        *,
        epsilon: float = 1e-6,
        counter: Counter | None = None,
    ) -> None:
        xp = array_api_compat.array_namespace(x_true, y)
        self.xp = xp
        self.device = array_api_compat.device(x_true)
        self.dtype = x_true.dtype
        self.image_shape = tuple(regularizer.image_shape)
        self.n = math.prod(self.image_shape)
        for name, a in (("x_true", x_true), ("y", y)):
            if tuple(a.shape) != (self.n,):
                raise ValueError(f"{name} has shape {tuple(a.shape)}; expected ({self.n},)")
            check_finite(xp, a, name)
        if operator.n != self.n:
            raise ValueError(f"operator acts on n={operator.n} unknowns; expected n={self.n}")
        if not epsilon >= 0:
            raise ValueError(f"epsilon must be non-negative; got epsilon={epsilon!r}")
        self.x_true = x_true
        self.y = y
        self.operator = operator
        self.regularizer = regularizer
        self.epsilon = float(epsilon)
        self.counter = counter if counter is not None else Counter()
        self.theta_shape = tuple(regularizer.theta_shape)
        self.p = math.prod(self.theta_shape)
        self.theta_mask = xp.asarray(regularizer.mask_host(), dtype=self.dtype, device=self.device)

    @classmethod
    def from_image(
        cls,
        image: Any,
        backend: Any,
        operator: Any,
        regularizer: Any,
        *,
        noise_level: float = 0.1,
        seed: int = 0,
        epsilon: float = 1e-6,
    ) -> ImagingProblem:
        """Build a sample from a host image (H, W): y = A x_true + relative noise (seeded)."""
        host = np.asarray(image, dtype=np.float64)
        if not np.all(np.isfinite(host)):
            raise ValueError("image contains NaN or inf values")
        if host.shape != tuple(regularizer.image_shape):
            raise ValueError(
                f"image has shape {host.shape}; the regulariser expects {regularizer.image_shape}"
            )
        x_true = backend.asarray(host.reshape(-1))
        y = add_relative_noise(operator.apply(x_true), noise_level, seed)
        return cls(x_true, y, operator, regularizer, epsilon=epsilon)

    def __repr__(self) -> str:
        return (
            f"ImagingProblem(n={self.n}, operator={self.operator!r}, "
            f"regularizer={self.regularizer!r}, epsilon={self.epsilon})"
        )

    def _theta(self, theta: Any) -> Any:
        return check_theta(self.xp, theta, self.theta_shape)

    def lower_objective(self, x: Any, theta: Any) -> Any:
        check_vector(x, self.n, "x")
        xp = array_api_compat.array_namespace(x)
        theta = self._theta(theta)
        self.counter.add("f")
        r = self.operator.apply(x) - self.y
        data = 0.5 * xp.sum(r * r)
        return data + self.regularizer.value(x, theta) + (0.5 * self.epsilon) * xp.sum(x * x)

    def lower_grad(self, x: Any, theta: Any) -> Any:
        check_vector(x, self.n, "x")
        theta = self._theta(theta)
        self.counter.add("grad")
        data = self.operator.adjoint(self.operator.apply(x) - self.y)
        return data + self.regularizer.grad(x, theta) + self.epsilon * x

    def lower_value_and_grad(self, x: Any, theta: Any) -> tuple[Any, Any]:
        """(f, ∇ₓf) sharing the regulariser's work (counts one 'f' and one 'grad')."""
        check_vector(x, self.n, "x")
        xp = array_api_compat.array_namespace(x)
        theta = self._theta(theta)
        self.counter.add("f")
        self.counter.add("grad")
        r = self.operator.apply(x) - self.y
        fused = getattr(self.regularizer, "value_and_grad", None)
        if fused is not None:
            reg_value, reg_grad = fused(x, theta)
        else:
            reg_value, reg_grad = self.regularizer.value(x, theta), self.regularizer.grad(x, theta)
        value = 0.5 * xp.sum(r * r) + reg_value + (0.5 * self.epsilon) * xp.sum(x * x)
        return value, self.operator.adjoint(r) + reg_grad + self.epsilon * x

    def hvp(self, x: Any, theta: Any, v: Any) -> Any:
        check_vector(x, self.n, "x")
        check_vector(v, self.n, "v")
        theta = self._theta(theta)
        self.counter.add("hvp", block_size(v))
        out = self.regularizer.hvp(x, theta, v)
        out += self.operator.normal(v)
        if self.epsilon:
            out += self.epsilon * v
        return out

    def jac_t(self, x: Any, theta: Any, w: Any) -> Any:
        check_vector(x, self.n, "x")
        check_vector(w, self.n, "w")
        theta = self._theta(theta)
        self.counter.add("jac_t", block_size(w))
        out = self.regularizer.jac_t(x, theta, w)
        return out * (self.theta_mask if w.ndim == 1 else self.theta_mask[:, None])

    def linearize(self, x: Any, theta: Any) -> Any:
        """Hessian and Jᵀ at a fixed (x, θ), with the x-dependent work done once
        (``problems.linearization``); counted like ``hvp``/``jac_t``."""
        from problems.linearization import linearize

        return linearize(self, x, theta)
