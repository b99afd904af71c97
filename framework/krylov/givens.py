"""The per-sample scalar step of MINRES: Lanczos scalars → Givens rotation → coefficients.

Every iteration each sample i contributes a new column (β_k, α_k, β_{k+1}) of its
tridiagonal T̄; the two previous rotations and a new one reduce it, giving the direction
recurrence d_k = (v_k − δ d_{k−1} − ε d_{k−2}) / γ and the step φ along d_k.  This module
does that small dense step once, written against an ``ops`` table, for two homes of the
scalars:

* ``HostScalars`` (the CPU, where a host read costs nothing): the scalars are Python
  floats, one ``rotate`` call per sample — a documented small dense step of a few
  microseconds, so a batch of one costs what the classic single-vector solver costs;
* ``DeviceScalars`` (a GPU, where a host read synchronises): the scalars are (B,) device
  arrays and ``rotate`` runs once for the batch; nothing is read on the host except one
  "is any sample running?" flag every ``check_every`` iterations.

Both hand the vector kernels one (B, len(COEFFICIENTS)) device array per iteration.  A
sample that is not updated (frozen: converged, exact, broken down, non-finite) gets the
identity rotation and zero step, so its iterate no longer changes.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

from backends.host import to_host

RUNNING, CONVERGED, EXACT, MAXITER, BREAKDOWN, NONFINITE = range(6)
# columns of the per-iteration coefficient array handed to the vector kernels
COEFFICIENTS = ("gamma", "delta", "epsilon", "phi", "beta_div", "res_keep", "res_add",
                "harvest_beta", "update")


class FloatOps:
    """Scalar operations on one sample's Python floats and bools."""

    where = staticmethod(lambda cond, a, b: a if cond else b)
    hypot = staticmethod(math.hypot)
    maximum = staticmethod(max)
    abs = staticmethod(abs)
    isfinite = staticmethod(math.isfinite)
    not_ = staticmethod(operator.not_)
    count = staticmethod(int)


class ArrayOps:
    """The same operations on (B,) arrays of namespace ``xp``."""

    def __init__(self, xp: Any, like: Any) -> None:
        self.xp, self.dtype, self.device = xp, like.dtype, device_of(like)
        self.maximum, self.abs, self.isfinite = xp.maximum, xp.abs, xp.isfinite
        self.not_ = xp.logical_not

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        xp = self.xp
        a, b = (v if hasattr(v, "shape") else
                xp.full(cond.shape, v, dtype=self.dtype, device=self.device) for v in (a, b))
        return xp.where(cond, a, b)

    def hypot(self, a: Any, b: Any) -> Any:
        return self.xp.sqrt(a * a + b * b)

    def count(self, mask: Any) -> Any:
        return self.xp.astype(mask, self.xp.int64)


@dataclass(frozen=True)
class Rotation:
    """One sample's (or, as arrays, every sample's) running scalars: the previous
    sub-diagonal β_k, the last two rotations (c, s), φ̄, the ‖T̄‖ estimate, the status
    code, the iteration count and whether the sample is still running."""

    beta: Any
    c: Any
    c_prev: Any
    s: Any
    s_prev: Any
    phibar: Any
    anorm: Any
    status: Any
    iterations: Any
    live: Any


def rotate(ops: Any, st: Rotation, alpha: Any, beta_next: Any, tol: float) -> tuple:
    """Rotate the new column (β_k, α_k, β_{k+1}) of T̄ by the previous two rotations,
    form the new one, and return (the updated scalars, the coefficients in the order of
    ``COEFFICIENTS``, the residual estimate |φ̄|, and the events (update, exact))."""
    sub = st.beta
    epsilon = st.s_prev * sub
    delta_bar = st.c_prev * sub
    delta = st.c * delta_bar + st.s * alpha
    gamma_bar = -st.s * delta_bar + st.c * alpha
    gamma = ops.hypot(gamma_bar, beta_next)
    anorm = ops.where(st.live, ops.maximum(st.anorm, ops.abs(alpha) + sub + beta_next),
                      st.anorm)
    finite = ops.isfinite(alpha) & ops.isfinite(beta_next)
    singular = gamma <= tol * anorm  # T_k singular: keep the last iterate
    update = st.live & finite & ops.not_(singular)
    status = ops.where(st.live & ops.not_(finite), NONFINITE, st.status)
    status = ops.where(st.live & finite & singular, BREAKDOWN, status)
    gamma_safe = ops.where(update, gamma, 1.0)
    c = ops.where(update, gamma_bar / gamma_safe, 1.0)
    s = ops.where(update, beta_next / gamma_safe, 0.0)
    phi = ops.where(update, c * st.phibar, 0.0)
    phibar = ops.where(update, -s * st.phibar, st.phibar)
    exact = update & (beta_next <= tol * anorm)  # invariant subspace: the iterate solves
    coefficients = (
        gamma_safe,
        ops.where(update, delta, 0.0),
        ops.where(update, epsilon, 0.0),
        phi,
        ops.where(finite & (beta_next > 0), beta_next, 1.0),
        ops.where(update, s * s, 1.0),
        ops.where(update, phibar * c, 0.0),
        ops.where(exact, 0.0, beta_next),
        ops.where(update, 1.0, 0.0),
    )
    new = Rotation(beta_next, c, st.c, s, st.s, phibar, anorm, status,
                   st.iterations + ops.count(update), update & ops.not_(exact))
    return new, coefficients, ops.abs(phibar), (update, exact)


def conclude(ops: Any, st: Rotation, update: Any, exact: Any, met: Any) -> Rotation:
    """Statuses after the stopping test: exact, converged (``met`` on an updated sample),
    or still running."""
    converged = update & ops.not_(exact) & met
    status = ops.where(exact, EXACT, st.status)
    status = ops.where(converged, CONVERGED, status)
    return replace(st, status=status, live=st.live & ops.not_(converged))


def start(ops: Any, beta1: Any, met: Any, finite: Any, zero: Any) -> Rotation:
    """The scalars before the first iteration: a start that already satisfies the rule
    is converged (exact when r₀ = 0); a non-finite start is reported."""
    status = ops.where(met, ops.where(beta1 > 0, CONVERGED, EXACT), RUNNING)
    status = ops.where(finite, status, NONFINITE)
    live = finite & ops.not_(met)
    one = zero + 1.0
    return Rotation(zero, one, one, zero, zero, beta1, zero, status, ops.count(live) * 0, live)


class HostScalars:
    """Per-sample scalars as Python floats (B ``Rotation``s); host reads are free."""

    syncs_per_iteration = 2  # α and β_{k+1} are read each iteration

    def __init__(self, like: Any, beta1: Any, met: Any) -> None:
        self.xp = array_namespace(like)
        self.dtype, self.device = like.dtype, device_of(like)
        b1 = [float(v) for v in to_host(beta1)]
        ok = [bool(v) for v in to_host(met)]
        self.rows = [start(FloatOps, v, m, math.isfinite(v), 0.0) for v, m in zip(b1, ok,
                                                                                strict=True)]
        self.events: list[tuple[bool, bool]] = []
        self.rnorms = b1

    def running(self) -> bool:
        return any(r.live for r in self.rows)

    def rotate(self, alpha: Any, beta_next: Any, tol: float) -> Any:
        alphas, betas = to_host(alpha).tolist(), to_host(beta_next).tolist()
        coefficients, self.events, self.rnorms = [], [], []
        for i, row in enumerate(self.rows):
            self.rows[i], coef, rnorm, events = rotate(FloatOps, row, alphas[i], betas[i], tol)
            coefficients.append(coef)
            self.events.append(events)
            self.rnorms.append(rnorm)
        return self.xp.asarray(coefficients, dtype=self.dtype, device=self.device)

    def conclude(self, met: Any) -> None:
        met = [bool(v) for v in met]
        self.rows = [conclude(FloatOps, r, u, e, m)
                     for r, (u, e), m in zip(self.rows, self.events, met, strict=True)]

    def nonfinite_rows(self, beta_next: Any) -> bool:
        """Whether some row's β_{k+1} is not finite (then its vectors need zeroing)."""
        return any(not math.isfinite(r.beta) for r in self.rows)

    def summary(self) -> tuple[list[int], list[int]]:
        return [r.status for r in self.rows], [r.iterations for r in self.rows]


class DeviceScalars:
    """Per-sample scalars as (B,) device arrays; the host sees one flag per check."""

    syncs_per_iteration = 0

    def __init__(self, like: Any, beta1: Any, met: Any) -> None:
        self.xp = xp = array_namespace(like)
        self.ops = ArrayOps(xp, beta1)
        zero = xp.zeros_like(beta1)
        self.state = start(self.ops, beta1, met, xp.isfinite(beta1), zero)
        self.state = replace(self.state, iterations=xp.zeros(beta1.shape, dtype=xp.int64,
                                                             device=device_of(beta1)))
        self.events = None
        self.rnorms = beta1

    def running(self) -> bool:
        return bool(self.xp.any(self.state.live))

    def rotate(self, alpha: Any, beta_next: Any, tol: float) -> Any:
        self.state, coef, self.rnorms, self.events = rotate(self.ops, self.state, alpha,
                                                            beta_next, tol)
        return self.xp.stack(coef, axis=1)

    def conclude(self, met: Any) -> None:
        self.state = conclude(self.ops, self.state, *self.events, met)

    def nonfinite_rows(self, beta_next: Any) -> bool:
        return True  # unknown without a sync: always zero non-finite rows (cheap on a GPU)

    def summary(self) -> tuple[list[int], list[int]]:
        st = self.state
        return [int(v) for v in to_host(st.status)], [int(v) for v in to_host(st.iterations)]
