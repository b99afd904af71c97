"""Outer (upper-level) optimisers on θ: Adam, gradient descent with Armijo backtracking,
and L-BFGS with Armijo backtracking (deterministic, full-batch objectives).

Adam and gradient descent keep their state in θ's namespace, on its device; L-BFGS keeps
its pairs on the host (one transfer of θ and g per step: θ is small).  ``mask`` (θ's
shape, 1 = learned, 0 = frozen) zeroes the gradient of frozen entries.  ``lr_decay``
d ∈ (0, 1] decays the step size exponentially: step t (1, 2, …) uses lr · dᵗ⁻¹ (d = 1:
constant).  ``state_dict()`` gives host NumPy arrays and Python scalars;
``load_state_dict`` restores them (arrays move back to θ's device at the next step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import array_api_compat
import numpy as np

from backends.choice import Choice
from backends.host import to_host
from framework.optim.outcome import require

Optimizer = Choice("Optimizer", "adam gd lbfgs")  # config ``outer.name``


@dataclass(frozen=True)
class OuterStep:
    """One outer update: the new θ, the step length used, backtracking trials, whether the
    step was accepted (gradient descent refuses one that never satisfies Armijo) and the
    upper-loss evaluations spent."""

    theta: Any
    step_size: float
    backtracks: int
    accepted: bool
    loss_evals: int


def _host(a: Any) -> np.ndarray | None:
    return None if a is None else to_host(a)


def _like(host: np.ndarray, theta: Any) -> Any:
    xp = array_api_compat.array_namespace(theta)
    return xp.asarray(host, dtype=theta.dtype, device=array_api_compat.device(theta))


class _Outer:
    """The mask (kept on the host, moved to θ's device) and the checkpoint state: ``STATE``
    maps each saved attribute to its type (``_host``: an array, saved as a host copy)."""

    name: Any
    STATE: ClassVar[dict[str, Callable[[Any], Any]]]

    def __init__(self, lr: float, mask: Any, lr_decay: float) -> None:
        require(lr > 0, "lr > 0", lr=lr)
        require(0 < lr_decay <= 1, "0 < lr_decay <= 1", lr_decay=lr_decay)
        self.lr, self.lr_decay, self.t = float(lr), float(lr_decay), 0
        self._mask_host = None if mask is None else to_host(mask).astype(np.float64)
        self._mask_dev: Any = None

    def step(self, theta: Any, grad: Any, *, loss: float | None = None,
             loss_fn: Callable[[Any], float] | None = None) -> OuterStep:
        """One update of θ with gradient ``grad`` (masked); ``loss`` is the upper loss at θ
        and ``loss_fn`` evaluates it (gradient descent's backtracking; Adam uses neither)."""
        xp, shape = array_api_compat.array_namespace(theta, grad), tuple(theta.shape)
        require(tuple(grad.shape) == shape, "grad of θ's shape", grad_shape=tuple(grad.shape),
                theta_shape=shape)
        if self._mask_host is not None:
            require(self._mask_host.size == math.prod(shape), "a mask entry per entry of θ",
                    mask_size=self._mask_host.size, theta_shape=shape)
            if self._mask_dev is None or self._mask_dev.dtype != theta.dtype:
                self._mask_dev = _like(self._mask_host.reshape(shape), theta)
            grad = grad * self._mask_dev
        self.t += 1
        return self._update(xp, theta, grad, loss, loss_fn)

    @property
    def step_lr(self) -> float:
        """The step size of the current step t: lr · lr_decayᵗ⁻¹."""
        return self.lr * self.lr_decay ** (self.t - 1)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name.value,
                **{key: kind(getattr(self, key)) for key, kind in self.STATE.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        require(state.get("name") == self.name, f"the state of a {self.name.value!r} optimiser",
                name=state.get("name"))
        for key, kind in self.STATE.items():
            setattr(self, key, kind(state[key]))


class Adam(_Outer):
    """Adam (Kingma & Ba 2015) with bias correction:

    m ← β₁m + (1−β₁)g,  v ← β₂v + (1−β₂)g²,  θ ← θ − lr · m̂ / (√v̂ + eps),
    m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ)  (lr decayed by ``lr_decay`` per step).
    """

    name = Optimizer.adam
    STATE: ClassVar = {"lr": float, "betas": lambda b: tuple(float(x) for x in b), "eps": float,
             "t": int, "m": _host, "v": _host}

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, *, mask: Any = None, lr_decay: float = 1.0) -> None:
        super().__init__(lr, mask, lr_decay)
        self.betas = tuple(float(b) for b in betas)
        require(all(0 <= b < 1 for b in self.betas), "0 <= betas < 1", betas=tuple(betas))
        require(eps > 0, "eps > 0", eps=eps)
        self.eps = float(eps)
        self.m = self.v = None

    def _update(self, xp: Any, theta: Any, g: Any, loss: Any, loss_fn: Any) -> OuterStep:
        b1, b2 = self.betas
        if isinstance(self.m, np.ndarray):  # restored from a checkpoint
            self.m, self.v = _like(self.m, theta), _like(self.v, theta)
        if self.m is None:
            self.m, self.v = xp.zeros_like(theta), xp.zeros_like(theta)
        self.m = b1 * self.m + (1.0 - b1) * g
        self.v = b2 * self.v + (1.0 - b2) * (g * g)
        m_hat = self.m / (1.0 - b1**self.t)
        v_hat = self.v / (1.0 - b2**self.t)
        lr = self.step_lr
        new = theta - lr * m_hat / (xp.sqrt(v_hat) + self.eps)
        return OuterStep(new, lr, 0, True, 0)


class GradientDescent(_Outer):
    """θ ← θ − α g with Armijo backtracking on the upper loss: trials α = lr, lr·shrink,
    lr·shrink², … until loss_fn(θ − α g) ≤ loss − c1 α ‖g‖² (g the masked gradient); after
    ``max_backtracks`` refused trials θ stays (``accepted=False``).  Without ``loss_fn``
    (or with ``max_backtracks=0``) the plain step α = lr is taken; with it, ``loss`` is
    needed too."""

    name = Optimizer.gd
    STATE: ClassVar = {"lr": float, "shrink": float, "c1": float, "max_backtracks": int, "t": int}

    def __init__(self, lr: float = 1.0, *, shrink: float = 0.5, c1: float = 1e-4,
                 max_backtracks: int = 10, mask: Any = None, lr_decay: float = 1.0) -> None:
        super().__init__(lr, mask, lr_decay)
        require(0 < shrink < 1, "0 < shrink < 1", shrink=shrink)
        require(0 < c1 < 1, "0 < c1 < 1", c1=c1)
        require(max_backtracks >= 0, "max_backtracks >= 0", max_backtracks=max_backtracks)
        self.shrink, self.c1, self.max_backtracks = float(shrink), float(c1), int(max_backtracks)

    def _update(self, xp: Any, theta: Any, g: Any, loss: Any, loss_fn: Any) -> OuterStep:
        if loss_fn is None or self.max_backtracks == 0:
            return OuterStep(theta - self.step_lr * g, self.step_lr, 0, True, 0)
        gg, alpha = float(xp.sum(g * g)), self.step_lr
        for trial in range(self.max_backtracks + 1):
            candidate = theta - alpha * g
            value = float(loss_fn(candidate))
            if math.isfinite(value) and value <= loss - self.c1 * alpha * gg:
                return OuterStep(candidate, alpha, trial, True, trial + 1)
            alpha *= self.shrink
        return OuterStep(theta, 0.0, self.max_backtracks, False, self.max_backtracks + 1)


class LBFGS(GradientDescent):
    """L-BFGS (Nocedal & Wright, *Numerical Optimization*, Alg. 7.4–7.5) on the upper loss:
    the direction d = −H g from the two-loop recursion over the last ``memory`` pairs
    (s, y) = (θ_{t+1} − θ_t, g_{t+1} − g_t) with sᵀy > 0 (others are skipped), initial
    matrix (sᵀy/yᵀy) I; Armijo backtracking from α = 1 (α = lr/‖g‖ before any pair,
    decayed by ``lr_decay``) until loss_fn(θ + αd) ≤ loss + c1 α gᵀd.  A direction that is
    not a descent one, or whose backtracking fails, is replaced once by the plain
    gradient-descent trial of step lr and the memory is cleared.  The loss, gradient and
    pairs must come from one deterministic objective (a full batch: with mini-batches the
    pairs mix different functions); ``loss_fn`` is required."""

    name = Optimizer.lbfgs
    STATE: ClassVar = {**GradientDescent.STATE, "memory": int, "pairs": list,
                       "last": lambda v: None if v is None else (to_host(v[0]), to_host(v[1]))}

    def __init__(self, lr: float = 1.0, *, memory: int = 10, shrink: float = 0.5,
                 c1: float = 1e-4, max_backtracks: int = 10, mask: Any = None,
                 lr_decay: float = 1.0) -> None:
        super().__init__(lr, shrink=shrink, c1=c1, max_backtracks=max_backtracks, mask=mask,
                         lr_decay=lr_decay)
        require(memory >= 1, "memory >= 1", memory=memory)
        require(max_backtracks >= 1, "max_backtracks >= 1 (L-BFGS needs a line search)",
                max_backtracks=max_backtracks)
        self.memory = int(memory)
        self.pairs: list[tuple[np.ndarray, np.ndarray]] = []  # host (s, y), oldest first
        self.last: tuple[Any, Any] | None = None  # host (θ, masked g) of the previous call

    def _direction(self, g: np.ndarray) -> np.ndarray:
        q = g.copy()
        alphas = []
        for s, y in reversed(self.pairs):
            a = float(s @ q) / float(s @ y)
            q -= a * y
            alphas.append(a)
        s, y = self.pairs[-1]
        q *= float(s @ y) / float(y @ y)
        for (s, y), a in zip(self.pairs, reversed(alphas), strict=True):
            q += (a - float(y @ q) / float(s @ y)) * s
        return -q

    def _update(self, xp: Any, theta: Any, g: Any, loss: Any, loss_fn: Any) -> OuterStep:
        require(loss_fn is not None and loss is not None,
                "the batch's loss and loss function (L-BFGS backtracks on them)")
        th, gh = to_host(theta).reshape(-1), to_host(g).reshape(-1)
        if self.last is not None:
            s = th - np.asarray(self.last[0]).reshape(-1)
            y = gh - np.asarray(self.last[1]).reshape(-1)
            if float(s @ y) > 1e-12 * float(np.linalg.norm(s) * np.linalg.norm(y)):
                self.pairs = [*self.pairs, (s, y)][-self.memory :]
        self.last = (th, gh)
        gnorm = float(np.linalg.norm(gh))
        trials = 0
        if self.pairs:
            d = self._direction(gh)
            slope = float(gh @ d)
            if slope < 0:
                alpha = 1.0
                for _ in range(self.max_backtracks):
                    candidate = theta + alpha * _like(d.reshape(theta.shape), theta)
                    value = float(loss_fn(candidate))
                    trials += 1
                    if math.isfinite(value) and value <= loss + self.c1 * alpha * slope:
                        return OuterStep(candidate, alpha, trials - 1, True, trials)
                    alpha *= self.shrink
            self.pairs = []  # no descent along d: start the memory again from the gradient
        if gnorm == 0:
            return OuterStep(theta, 0.0, 0, False, trials)
        alpha = self.step_lr / gnorm
        for _ in range(self.max_backtracks):
            candidate = theta - alpha * g
            value = float(loss_fn(candidate))
            trials += 1
            if math.isfinite(value) and value <= loss - self.c1 * alpha * gnorm**2:
                return OuterStep(candidate, alpha, trials - 1, True, trials)
            alpha *= self.shrink
        return OuterStep(theta, 0.0, trials, False, trials)


def make_optimizer(cfg: Any, mask: Any = None) -> Adam | GradientDescent:
    """Build the optimiser named ``cfg.name`` (``adam``, ``gd`` or ``lbfgs``) from an
    ``OuterConfig``."""
    if Optimizer(cfg.name) == Optimizer.adam:
        return Adam(cfg.lr, tuple(cfg.betas), cfg.eps, mask=mask, lr_decay=cfg.lr_decay)
    if Optimizer(cfg.name) == Optimizer.lbfgs:
        return LBFGS(cfg.lr, memory=cfg.memory, shrink=cfg.shrink, c1=cfg.c1,
                     max_backtracks=cfg.max_backtracks, mask=mask, lr_decay=cfg.lr_decay)
    return GradientDescent(cfg.lr, shrink=cfg.shrink, c1=cfg.c1,
                           max_backtracks=cfg.max_backtracks, mask=mask, lr_decay=cfg.lr_decay)
