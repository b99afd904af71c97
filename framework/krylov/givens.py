"""The per-sample scalar step of MINRES: Lanczos scalars → Givens rotation → coefficients.

Each iteration adds a column (β_k, α_k, β_{k+1}) to sample i's T̄; the two previous
rotations and a new one reduce it to the recurrence d_k = (v_k − δ d_{k−1} − ε d_{k−2}) / γ
and the step φ along d_k.  ``rotate`` is written once against an ``ops`` table, called per
sample on Python floats (``HostScalars``) or once on (B,) device arrays (``DeviceScalars``,
the host reading one "any sample running?" flag every ``check_every`` iterations).  A
frozen sample (converged, exact, broken down, non-finite) gets the identity rotation.
"""

from __future__ import annotations

import math
import operator
from collections import namedtuple
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

from backends.host import host_list, to_host
from framework.krylov.compaction import take

RUNNING, CONVERGED, EXACT, MAXITER, BREAKDOWN, NONFINITE = range(6)

# The per-iteration coefficients handed to the vector kernels, each a (B, 1) row scale
# (a Python float for B = 1 on the host).
Columns = namedtuple(
    "Columns", "gamma delta epsilon phi beta_div res_keep res_add harvest_beta update")


class FloatOps:
    """Scalar operations on one sample's Python floats and bools."""

    where = staticmethod(lambda cond, a, b: a if cond else b)
    hypot = staticmethod(math.hypot)
    maximum = staticmethod(max)
    abs = staticmethod(abs)
    isfinite = staticmethod(math.isfinite)
    not_ = staticmethod(operator.not_)
    count = staticmethod(int)
    every = staticmethod(bool)  # one sample: its flag is known on the host


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

    @staticmethod
    def every(mask: Any) -> bool:
        """Unknown without a host read: always mask (no synchronisation)."""
        return False


# One sample's (or, as arrays, every sample's) running scalars: the previous sub-diagonal
# β_k, the last two rotations (c, s), φ̄, the ‖T̄‖ estimate, the status code, the iteration
# count and whether the sample is still running.
Rotation = namedtuple("Rotation", "beta c c_prev s s_prev phibar anorm status iterations live")


def rotate(ops: Any, st: Rotation, alpha: Any, beta_next: Any, tol: float) -> tuple:
    """Rotate the new column (β_k, α_k, β_{k+1}) of T̄ by the previous two rotations, form
    the new one; return the updated scalars, the ``Columns``, the residual estimate |φ̄| and
    the events (update, exact).  Samples not updated get the idle coefficients (identity
    rotation, zero step); a running sample on the host skips the masking."""
    sub = st.beta
    epsilon = st.s_prev * sub
    delta_bar = st.c_prev * sub
    delta = st.c * delta_bar + st.s * alpha
    gamma_bar = -st.s * delta_bar + st.c * alpha
    gamma = ops.hypot(gamma_bar, beta_next)
    anorm = ops.maximum(st.anorm, ops.abs(alpha) + sub + beta_next)
    finite = ops.isfinite(alpha) & ops.isfinite(beta_next)
    # T_k (numerically) singular: the last iterate is a least-squares solution of a
    # singular inconsistent system, ‖A r_{k−1}‖ / ‖r_{k−1}‖ = hypot(γ̄_k, c_{k−1}β_{k+1})
    # ≤ √tol·‖A‖ (SciPy's minres "test2", MINRES-QLP), and is kept
    singular = ops.hypot(gamma_bar, st.c * beta_next) <= tol ** 0.5 * anorm
    update = st.live & finite & ops.not_(singular)
    every = ops.every(update)
    status = st.status
    if not every:
        anorm = ops.where(st.live, anorm, st.anorm)
        status = ops.where(st.live & ops.not_(finite), NONFINITE, status)
        status = ops.where(st.live & finite & singular, BREAKDOWN, status)
        gamma = ops.where(update, gamma, 1.0)
    c, s = gamma_bar / gamma, beta_next / gamma
    phi, phibar = c * st.phibar, -s * st.phibar
    exact = update & (beta_next <= tol * anorm)  # invariant subspace: the iterate solves
    beta_div = ops.where(finite & (beta_next > 0), beta_next, 1.0)
    harvest_beta = ops.where(exact, 0.0, beta_next)
    stepped = (delta, epsilon, phi, s * s, phibar * c, 1.0)
    if not every:
        c, s, phibar = (ops.where(update, v, idle) for v, idle in
                        ((c, 1.0), (s, 0.0), (phibar, st.phibar)))
        stepped = tuple(ops.where(update, v, idle) for v, idle in
                        zip(stepped, (0.0, 0.0, 0.0, 1.0, 0.0, 0.0), strict=True))
    delta, epsilon, phi, res_keep, res_add, updated = stepped
    coefficients = Columns(gamma, delta, epsilon, phi, beta_div, res_keep, res_add,
                           harvest_beta, updated)
    new = Rotation(beta_next, c, st.c, s, st.s, phibar, anorm, status,
                   st.iterations + ops.count(update), update & ops.not_(exact))
    return new, coefficients, ops.abs(phibar), (update, exact)


def conclude(ops: Any, st: Rotation, update: Any, exact: Any, met: Any) -> Rotation:
    """Statuses after the stopping test: exact, converged (``met`` on an updated sample),
    or still running."""
    converged = update & ops.not_(exact) & met
    if ops.every(ops.not_(converged | exact)):
        return st
    status = ops.where(exact, EXACT, st.status)
    status = ops.where(converged, CONVERGED, status)
    return st._replace(status=status, live=st.live & ops.not_(converged))


def start(ops: Any, beta1: Any, met: Any, finite: Any, zero: Any) -> Rotation:
    """The scalars before the first iteration: a start that already satisfies the rule
    is converged (exact when r₀ = 0); a non-finite start is reported."""
    status = ops.where(met, ops.where(beta1 > 0, CONVERGED, EXACT), RUNNING)
    status = ops.where(finite, status, NONFINITE)
    live = finite & ops.not_(met)
    one = zero + 1.0
    return Rotation(zero, one, one, zero, zero, beta1, zero, status, ops.count(live) * 0, live)


class HostScalars:
    """Per-sample scalars as Python floats (B ``Rotation``s); host reads are free.  With
    ``thresholds`` (the default rule ‖r_i‖ ≤ t_i) the rule is tested in ``rotate``;
    otherwise the caller tests its rule and hands the result to ``conclude``."""

    syncs_per_iteration = 2  # α and ‖p‖² are read each iteration

    def __init__(self, like: Any, beta1: Any, met: Any, thresholds: Any = None) -> None:
        self.xp = array_namespace(like)
        self.dtype, self.device = like.dtype, device_of(like)
        b1 = host_list(beta1)
        if met is None:  # the default rule
            met = [v <= t for v, t in zip(b1, thresholds, strict=True)]
        self.rows = [start(FloatOps, v, bool(m), math.isfinite(v), 0.0)
                     for v, m in zip(b1, met, strict=True)]
        self.thresholds = thresholds  # a list of floats
        self.rnorms = b1
        self.nonfinite = False
        self.live = any(r.live for r in self.rows)

    def running(self) -> bool:
        return self.live

    def live_rows(self) -> list[bool]:
        return [bool(r.live) for r in self.rows]

    def restrict(self, keep: list[int]) -> None:
        """Keep rows ``keep`` only (between iterations)."""
        self.rows = [self.rows[r] for r in keep]
        self.rnorms = [self.rnorms[r] for r in keep]
        if self.thresholds is not None:
            self.thresholds = [self.thresholds[r] for r in keep]

    def alpha(self, values: Any) -> Any:
        """Record α_k; returns it as a row scale (a float for B = 1, else (B, 1))."""
        self.alphas = host_list(values)
        return self.alphas[0] if len(self.rows) == 1 else values[:, None]

    def rotate(self, beta_squared: Any, tol: float) -> Columns:
        """β_{k+1} = √‖p‖², the rotation of every sample (and the default rule)."""
        self.betas = betas = [math.sqrt(v) for v in host_list(beta_squared)]
        rows, coefficients, rnorms, self.events = zip(*(
            rotate(FloatOps, row, alpha, beta, tol)
            for row, alpha, beta in zip(self.rows, self.alphas, betas, strict=True)), strict=True)
        self.rows, self.coefficients, self.rnorms = rows, coefficients, list(rnorms)
        self.nonfinite = not all(math.isfinite(b) for b in betas)
        if self.thresholds is None:
            self.live = any(r.live for r in rows)
        else:
            self.conclude([r <= t for r, t in zip(rnorms, self.thresholds, strict=True)])
        if len(coefficients) == 1:
            return coefficients[0]
        table = self.xp.asarray(coefficients, dtype=self.dtype, device=self.device)
        return Columns(*(table[:, j:j + 1] for j in range(len(Columns._fields))))

    def finite_rows(self) -> Any:
        """(B,) mask of the samples whose β_{k+1} is finite."""
        return self.xp.asarray([math.isfinite(b) for b in self.betas], device=self.device)

    def harvest_inputs(self) -> tuple[Any, Any]:
        """(B,) arrays of the last step's harvested β_{k+1} and its update mask."""
        xp, rows = self.xp, self.coefficients
        return (xp.asarray([c.harvest_beta for c in rows], dtype=self.dtype, device=self.device),
                xp.asarray([c.update > 0 for c in rows], device=self.device))

    def conclude(self, met: Any) -> None:
        self.rows = [conclude(FloatOps, r, u, e, bool(m))
                     for r, (u, e), m in zip(self.rows, self.events, met, strict=True)]
        self.live = any(r.live for r in self.rows)

    def summary(self) -> tuple[list[int], list[int]]:
        return [r.status for r in self.rows], [r.iterations for r in self.rows]


class DeviceScalars:
    """Per-sample scalars as (B,) device arrays; the host sees one flag per check."""

    syncs_per_iteration = 0
    nonfinite = True  # unknown without a sync: always zero non-finite rows (cheap on a GPU)

    def __init__(self, like: Any, beta1: Any, met: Any, thresholds: Any = None) -> None:
        self.xp = xp = array_namespace(like)
        self.ops = ArrayOps(xp, beta1)
        met = beta1 <= thresholds if met is None else met  # None: the default rule
        self.state = start(self.ops, beta1, met, xp.isfinite(beta1), xp.zeros_like(beta1))
        self.thresholds = thresholds
        self.rnorms = beta1

    def running(self) -> bool:
        return bool(self.xp.any(self.state.live))

    def live_rows(self) -> list[bool]:
        return [bool(v) for v in to_host(self.state.live)]

    def restrict(self, keep: list[int]) -> None:
        """Keep rows ``keep`` only (between iterations)."""
        self.state = Rotation(*(take(keep, v) for v in self.state))
        self.rnorms, self.thresholds = take(keep, self.rnorms), take(keep, self.thresholds)

    def alpha(self, values: Any) -> Any:
        self.alphas = values
        return values[:, None]

    def rotate(self, beta_squared: Any, tol: float) -> Columns:
        self.betas = self.xp.sqrt(beta_squared)
        self.state, coef, self.rnorms, self.events = rotate(self.ops, self.state, self.alphas,
                                                            self.betas, tol)
        if self.thresholds is not None:
            self.conclude(self.rnorms <= self.thresholds)
        self.coefficients = coef
        return Columns(*(c[:, None] for c in coef))

    def finite_rows(self) -> Any:
        return self.xp.isfinite(self.betas)

    def harvest_inputs(self) -> tuple[Any, Any]:
        return self.coefficients.harvest_beta, self.coefficients.update > 0

    def conclude(self, met: Any) -> None:
        self.state = conclude(self.ops, self.state, *self.events, met)

    def summary(self) -> tuple[list[int], list[int]]:
        st = self.state
        return [int(v) for v in to_host(st.status)], [int(v) for v in to_host(st.iterations)]
