"""Outer (upper-level) optimisers on θ: Adam and gradient descent with Armijo backtracking.

Both work on arrays of any array-API namespace (taken from θ) and keep their state on
θ's device.  ``mask`` (same shape as θ, 1 = learned, 0 = frozen) zeroes the gradient of
frozen entries, so those never move.  ``state_dict()`` returns host NumPy arrays and
Python scalars (checkpointable); ``load_state_dict`` restores them, moving arrays back to
θ's device at the next step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

from backends.choice import Choice
from backends.host import to_host

# Outer optimisers (config ``outer.name``).
Optimizer = Choice("Optimizer", "adam gd")


@dataclass(frozen=True)
class OuterStep:
    """One outer update: the new θ, the step length used, backtracking trials and whether
    the step was accepted (gradient descent refuses a step that never satisfies Armijo)."""

    theta: Any
    step_size: float
    backtracks: int
    accepted: bool
    loss_evals: int


def _host(a: Any) -> np.ndarray | None:
    return None if a is None else to_host(a)


def _like(host: np.ndarray | None, theta: Any) -> Any:
    if host is None:
        return None
    xp = array_api_compat.array_namespace(theta)
    return xp.asarray(host, dtype=theta.dtype, device=array_api_compat.device(theta))


def _check_shapes(theta: Any, grad: Any) -> None:
    if tuple(theta.shape) != tuple(grad.shape):
        raise ValueError(
            f"grad has shape {tuple(grad.shape)}; expected θ's shape {tuple(theta.shape)}"
        )


class _Masked:
    """Shared mask handling: the mask is kept on the host and moved to θ's device."""

    def __init__(self, mask: Any = None) -> None:
        self._mask_host = None if mask is None else _host(mask).astype(np.float64)
        self._mask_dev: Any = None

    def _masked(self, theta: Any, grad: Any) -> Any:
        _check_shapes(theta, grad)
        if self._mask_host is None:
            return grad
        if self._mask_host.size != math.prod(theta.shape):
            raise ValueError(
                f"mask has {self._mask_host.size} entries; θ has shape {tuple(theta.shape)}"
            )
        if self._mask_dev is None or self._mask_dev.dtype != theta.dtype:
            self._mask_dev = _like(self._mask_host.reshape(tuple(theta.shape)), theta)
        return grad * self._mask_dev


class Adam(_Masked):
    """Adam (Kingma & Ba 2015) with bias correction:

    m ← β₁m + (1−β₁)g,  v ← β₂v + (1−β₂)g²,  θ ← θ − lr · m̂ / (√v̂ + eps),
    m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ).
    """

    def __init__(
        self,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        mask: Any = None,
    ) -> None:
        super().__init__(mask)
        if not lr > 0:
            raise ValueError(f"lr must be positive; got lr={lr!r}")
        b1, b2 = (float(b) for b in betas)
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"betas must lie in [0, 1); got betas={tuple(betas)!r}")
        if not eps > 0:
            raise ValueError(f"eps must be positive; got eps={eps!r}")
        self.lr, self.beta1, self.beta2, self.eps = float(lr), b1, b2, float(eps)
        self.t = 0
        self._m: Any = None
        self._v: Any = None

    def step(
        self,
        theta: Any,
        grad: Any,
        *,
        loss: float | None = None,
        loss_fn: Callable[[Any], float] | None = None,
    ) -> OuterStep:
        """One Adam update of θ with gradient ``grad`` (``loss``/``loss_fn`` are unused)."""
        del loss, loss_fn
        xp = array_api_compat.array_namespace(theta, grad)
        g = self._masked(theta, grad)
        if isinstance(self._m, np.ndarray):  # restored from a checkpoint
            self._m, self._v = _like(self._m, theta), _like(self._v, theta)
        if self._m is None:
            self._m, self._v = xp.zeros_like(theta), xp.zeros_like(theta)
        self.t += 1
        self._m = self.beta1 * self._m + (1.0 - self.beta1) * g
        self._v = self.beta2 * self._v + (1.0 - self.beta2) * (g * g)
        m_hat = self._m / (1.0 - self.beta1**self.t)
        v_hat = self._v / (1.0 - self.beta2**self.t)
        new = theta - self.lr * m_hat / (xp.sqrt(v_hat) + self.eps)
        return OuterStep(new, self.lr, 0, True, 0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": Optimizer.adam.value,
            "lr": self.lr,
            "betas": [self.beta1, self.beta2],
            "eps": self.eps,
            "t": self.t,
            "m": _host(self._m),
            "v": _host(self._v),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != Optimizer.adam:
            raise ValueError(f"state of optimiser {state.get('name')!r} given to Adam")
        self.lr = float(state["lr"])
        self.beta1, self.beta2 = (float(b) for b in state["betas"])
        self.eps = float(state["eps"])
        self.t = int(state["t"])
        self._m = None if state["m"] is None else np.array(state["m"])
        self._v = None if state["v"] is None else np.array(state["v"])


class GradientDescent(_Masked):
    """θ ← θ − α g with Armijo backtracking on the upper loss.

    Trials α = lr, lr·shrink, lr·shrink², …; accepted when
    loss_fn(θ − α g) ≤ loss + c1 α ‖g‖² (g the masked gradient).  After
    ``max_backtracks`` refused trials θ is returned unchanged (``accepted=False``).
    Without ``loss_fn`` (or with ``max_backtracks=0``) the plain step α = lr is taken.
    """

    def __init__(
        self,
        lr: float = 1.0,
        *,
        shrink: float = 0.5,
        c1: float = 1e-4,
        max_backtracks: int = 10,
        mask: Any = None,
    ) -> None:
        super().__init__(mask)
        if not lr > 0:
            raise ValueError(f"lr must be positive; got lr={lr!r}")
        if not 0 < shrink < 1:
            raise ValueError(f"shrink must be in (0, 1); got shrink={shrink!r}")
        if not 0 < c1 < 1:
            raise ValueError(f"c1 must be in (0, 1); got c1={c1!r}")
        if max_backtracks < 0:
            raise ValueError(f"max_backtracks must be non-negative; got {max_backtracks!r}")
        self.lr, self.shrink, self.c1 = float(lr), float(shrink), float(c1)
        self.max_backtracks = int(max_backtracks)
        self.t = 0

    def step(
        self,
        theta: Any,
        grad: Any,
        *,
        loss: float | None = None,
        loss_fn: Callable[[Any], float] | None = None,
    ) -> OuterStep:
        """One (backtracking) gradient step; ``loss`` is the upper loss at θ."""
        xp = array_api_compat.array_namespace(theta, grad)
        g = self._masked(theta, grad)
        self.t += 1
        if loss_fn is None or self.max_backtracks == 0:
            return OuterStep(theta - self.lr * g, self.lr, 0, True, 0)
        if loss is None:
            loss = float(loss_fn(theta))
        gg = float(xp.sum(g * g))
        alpha = self.lr
        for trial in range(self.max_backtracks + 1):
            candidate = theta - alpha * g
            value = float(loss_fn(candidate))
            if math.isfinite(value) and value <= loss - self.c1 * alpha * gg:
                return OuterStep(candidate, alpha, trial, True, trial + 1)
            if trial < self.max_backtracks:
                alpha *= self.shrink
        return OuterStep(theta, 0.0, self.max_backtracks, False, self.max_backtracks + 1)

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": Optimizer.gd.value,
            "lr": self.lr,
            "shrink": self.shrink,
            "c1": self.c1,
            "max_backtracks": self.max_backtracks,
            "t": self.t,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != Optimizer.gd:
            raise ValueError(f"state of optimiser {state.get('name')!r} given to GradientDescent")
        self.lr = float(state["lr"])
        self.shrink = float(state["shrink"])
        self.c1 = float(state["c1"])
        self.max_backtracks = int(state["max_backtracks"])
        self.t = int(state["t"])


OuterOptimizer = Adam | GradientDescent


def make_optimizer(cfg: Any, mask: Any = None) -> OuterOptimizer:
    """Build the optimiser named ``cfg.name`` (``adam`` or ``gd``) from an ``OuterConfig``."""
    if Optimizer(cfg.name) == Optimizer.adam:
        return Adam(cfg.lr, tuple(cfg.betas), cfg.eps, mask=mask)
    return GradientDescent(
        cfg.lr, shrink=cfg.shrink, c1=cfg.c1, max_backtracks=cfg.max_backtracks, mask=mask
    )
