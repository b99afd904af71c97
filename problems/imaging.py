"""The imaging problem f_i(x, θ) = ½‖A_i x − y_i‖² + R_θ(x) + (ε/2)‖x‖², batch-first."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import array_api_compat
import numpy as np

from backends.counting import Counter
from problems.base import UPPER_LOSSES, Linearization, Problem, as_rows, check_agree
from problems.operators import add_relative_noise, stack_operators


class ImagingProblem(Problem):
    """B imaging samples (rows of ``X_true`` and ``Y``, (n,) for one sample or (B, n)), one
    forward operator A_i each (``problems.operators``), one regulariser (``FieldsOfExperts``
    or ``TotalVariation``) and one θ; ``concat`` joins samples into one batch.  Inputs are
    checked for NaN/inf once, here (checking in every HVP would sync the device).
    ``scales``: each sample's intensity scale, 1 unless it was normalised (``from_image``):
    sample i's image is scales[i] times its x."""

    def __init__(
        self,
        x_true: Any,
        y: Any,
        operator: Any,
        regularizer: Any,
        *,
        epsilon: float = 1e-6,
        upper: str = "squared_error",
        mse_floor: float = 0.0,
        counter: Counter | None = None,
        checked: bool = False,
        scales: Sequence[float] | None = None,
    ) -> None:
        if upper not in UPPER_LOSSES:
            raise ValueError(f"upper must be one of {UPPER_LOSSES}; got upper={upper!r}")
        if not (math.isfinite(mse_floor) and mse_floor >= 0):
            raise ValueError(f"mse_floor must be a finite number ≥ 0; got {mse_floor!r}")
        if mse_floor and upper != "neg_psnr":
            raise ValueError(f"mse_floor belongs to upper='neg_psnr'; got upper={upper!r}")
        self.upper, self.mse_floor = upper, float(mse_floor)
        self.xp = xp = array_api_compat.array_namespace(x_true, y)
        self.device = array_api_compat.device(x_true)
        self.dtype = x_true.dtype
        self.image_shape, self.n = tuple(regularizer.image_shape), regularizer.n
        X_true, _ = as_rows(x_true, self.n, "x_true")
        Y, _ = as_rows(y, self.n, "y")
        if Y.shape[0] != X_true.shape[0]:
            raise ValueError(f"y holds {Y.shape[0]} samples; x_true holds {X_true.shape[0]}")
        if not checked:
            for name, a in (("x_true", X_true), ("y", Y)):
                if not bool(xp.all(xp.isfinite(a))):  # a device sync: checked once, here
                    raise ValueError(f"{name} contains NaN or inf values")
        if operator.n != self.n:
            raise ValueError(f"operator acts on n={operator.n} unknowns; expected n={self.n}")
        self.batch_size = int(X_true.shape[0])
        if operator.batch_size not in (None, self.batch_size):
            raise ValueError(
                f"operator holds {operator.batch_size} samples; the problem {self.batch_size}"
            )
        self.X_true, self.Y = X_true, Y
        self.scales = (1.0,) * self.batch_size if scales is None else tuple(map(float, scales))
        if len(self.scales) != self.batch_size or not all(s > 0 for s in self.scales):
            raise ValueError(f"scales must be {self.batch_size} positive numbers; got {scales!r}")
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
        upper: str = "squared_error",
        mse_floor: float = 0.0,
        normalize: bool = False,
    ) -> ImagingProblem:
        """A sample from a host image (H, W): y = A x_true + relative noise (seeded).

        ``normalize``: the sample is posed on the scale of its own data, y/s and x_true/s
        with s = ‖y‖/√m (the RMS of y, known without x_true), and records s in ``scales``;
        multiply its x*(θ) by s for the image.  A regulariser that is not 1-homogeneous
        (any FoE expert but the TV-like ones) then sees images of one brightness."""
        host = np.asarray(image, dtype=np.float64)
        if not np.all(np.isfinite(host)):
            raise ValueError("image contains NaN or inf values")
        if host.shape != tuple(regularizer.image_shape):
            raise ValueError(
                f"image has shape {host.shape}; the regulariser expects {regularizer.image_shape}"
            )
        x_true = backend.asarray(host.reshape(-1))
        y = add_relative_noise(operator.apply(x_true), noise_level, seed)
        if not normalize:
            return cls(x_true, y, operator, regularizer, epsilon=epsilon, upper=upper,
                       mse_floor=mse_floor)
        xp = array_api_compat.array_namespace(y)
        scale = float(xp.sqrt(xp.mean(y * y)))  # one host sync, at set-up
        if not scale > 0:
            raise ValueError("normalize needs data y that are not all zero; set normalize=false")
        return cls(x_true / scale, y / scale, operator, regularizer, epsilon=epsilon,
                   upper=upper, mse_floor=mse_floor, scales=(scale,))

    @classmethod
    def concat(
        cls, problems: Sequence[ImagingProblem], *, counter: Counter | None = None
    ) -> ImagingProblem:
        """The samples of ``problems`` as one batch (validated: image shape, regulariser,
        ε, device and dtype, operator kind)."""
        first = check_agree("problems", problems, {
            "image shape": lambda pr: pr.image_shape,
            "regulariser": lambda pr: repr(pr.regularizer),
            "epsilon": lambda pr: pr.epsilon,
            "upper loss": lambda pr: (pr.upper, pr.mse_floor),
            "array namespace, device and dtype": lambda pr: (pr.xp.__name__, pr.device, pr.dtype),
        }, ImagingProblem)
        xp = first.xp
        return cls(
            xp.concat([pr.X_true for pr in problems], axis=0),
            xp.concat([pr.Y for pr in problems], axis=0),
            stack_operators([pr.operator for pr in problems]),
            first.regularizer, epsilon=first.epsilon, upper=first.upper,
            mse_floor=first.mse_floor, counter=counter,
            checked=True, scales=[s for pr in problems for s in pr.scales],
        )

    def _select(self, rows: tuple[int, ...]) -> ImagingProblem:
        xp = self.xp
        index = xp.asarray(list(rows), dtype=xp.int64, device=self.device)
        return ImagingProblem(
            xp.take(self.X_true, index, axis=0), xp.take(self.Y, index, axis=0),
            self.operator.rows(rows), self.regularizer, epsilon=self.epsilon,
            upper=self.upper, mse_floor=self.mse_floor, counter=self.counter, checked=True,
            scales=[self.scales[r] for r in rows],
        )

    def __repr__(self) -> str:
        return (
            f"ImagingProblem(batch_size={self.batch_size}, n={self.n}, "
            f"operator={self.operator!r}, regularizer={self.regularizer!r}, "
            f"epsilon={self.epsilon}, upper={self.upper!r}"
            + (f", mse_floor={self.mse_floor}" if self.mse_floor else "") + ")"
        )

    def _rows_value_and_grad(
        self, X: Any, theta: Any, *, value: bool, grad: bool, frozen: Any = None
    ) -> tuple[Any, Any]:
        xp = array_api_compat.array_namespace(X)
        bsz, n = X.shape
        r = self.operator.apply3(xp, xp.reshape(X, (bsz, n, 1)))
        r = xp.reshape(r, (bsz, n)) - self.Y
        reg_value, reg_grad = (
            self.regularizer.rows_value_and_grad(xp, X, theta, value=value, grad=grad)
            if frozen is None else frozen.value_and_grad(value=value, grad=grad))
        out_value = out_grad = None
        if value:
            ridge = (0.5 * self.epsilon) * xp.sum(X * X, axis=1)
            out_value = 0.5 * xp.sum(r * r, axis=1) + reg_value + ridge
        if grad:
            data = xp.reshape(self.operator.adjoint3(xp, xp.reshape(r, (bsz, n, 1))), (bsz, n))
            out_grad = data + reg_grad + self.epsilon * X
        return out_value, out_grad

    def linearize(self, x: Any, theta: Any) -> Linearization:
        """∇²ₓₓf_i and Jᵀ frozen at (x, θ), the x-dependent work done once."""
        X, single = self._rows(x)
        xp = array_api_compat.array_namespace(X, theta)
        reg = self.regularizer.linearize(xp, X, theta)
        operator, epsilon = self.operator, self.epsilon

        def hvp3(v3: Any) -> Any:
            out = reg.hvp(v3)
            out += operator.normal3(xp, v3)
            if epsilon:
                out += epsilon * v3
            return out

        shared = None  # FoE: f and ∇f from the linearization's own filter responses
        if hasattr(reg, "value_and_grad"):
            shared = partial(self._value_and_grad, x, theta, value=True, grad=True, frozen=reg)
        return Linearization(self, hvp3, reg.jac_t, single=single, frozen=reg,
                             value_and_grad=shared)
