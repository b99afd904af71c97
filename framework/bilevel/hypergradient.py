"""One hypergradient of one sample: lower solve → Hessian solve (recycled) → −Jᵀw.

    x* = argmin_x f(x, θ)           (L-BFGS, warm-started from the previous x*)
    H(x*, θ) w = ∇ℓ(x*)             (RMINRES, warm-started from the previous w, recycling)
    ∇θ ℓ(x(θ)) = −J(x*, θ)ᵀ w

Per-sample state (warm starts and the recycle carry) travels in and out explicitly as a
frozen ``SampleState``; nothing is mutated in place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

from array_api_compat import array_namespace

from backends.counting import Counts
from framework.krylov.minres import rminres
from framework.krylov.recycle import RecycleCarry, RecycleConfig, Recycler
from framework.krylov.sequence import recycled_solve
from framework.krylov.stopping import StopConfig
from framework.optim import lbfgs


@dataclass(frozen=True)
class HypergradientSettings:
    """Tolerances of the two inner solves and the recycling/stopping choices.

    ``lower_newton_steps`` > 0 polishes the L-BFGS solution with up to that many Newton
    steps (each a tight MINRES solve with the Hessian; its HVPs are counted): L-BFGS
    stalls at ‖∇f‖ ≈ 1e-9 where f no longer changes in floating point, Newton does not.
    """

    recycle: RecycleConfig = field(default_factory=RecycleConfig)
    stop: StopConfig = field(default_factory=lambda: StopConfig(rtol=1e-3))
    krylov_maxiter: int | None = None
    lower_gtol: float = 1e-6
    lower_rtol: float = 0.0
    lower_maxiter: int = 500
    lower_memory: int = 10
    lower_newton_steps: int = 0
    warm_start: bool = True
    shadow_baseline: bool = False


@dataclass(frozen=True)
class SampleState:
    """Warm starts (x*, w), the recycle carry, and the shadow baseline's own warm start."""

    x: Any = None
    w: Any = None
    carry: RecycleCarry | None = None
    w_shadow: Any = None


@dataclass(frozen=True)
class ShadowRecord:
    """The same Hessian system solved without recycling (warm-started from its own
    previous solution): what recycling is compared against."""

    iterations: int
    hvp: int
    hvp_passes: int


@dataclass(frozen=True)
class SampleRecord:
    """Figures of one sample's hypergradient.  ``counts``: the Hessian solve (recycle
    set-up included) and Jᵀ products; ``lower_counts``: the lower-level solve (f and ∇f
    evaluations, HVPs of a Newton polish); neither includes the shadow baseline."""

    upper_loss: float
    lower_iterations: int
    lower_converged: bool
    krylov_iterations: int
    krylov_converged: bool
    krylov_status: str
    recycle_dim: int
    counts: Counts
    lower_counts: Counts
    hg_error_estimate: float
    time_lower: float
    time_recycle: float
    time_krylov: float
    time_jac: float
    shadow: ShadowRecord | None = None


class _Bound:
    """x and θ bound into an n × n operator (the problem counts the applications)."""

    def __init__(self, fn: Any, x: Any, theta: Any, n: int) -> None:
        self._fn, self._x, self._theta = fn, x, theta
        self.shape = (n, n)

    def __call__(self, v: Any) -> Any:
        return self._fn(self._x, self._theta, v)


def _fused(problem: Any, theta: Any) -> Any:
    """x ↦ (f, ∇ₓf) when the problem can share their work, else None."""
    fused = getattr(problem, "lower_value_and_grad", None)
    return None if fused is None else (lambda x: fused(x, theta))


def hessian_operators(problem: Any, x: Any, theta: Any) -> tuple[Any, Any]:
    """H(x, θ) and Jᵀ(x, θ) as operators: the problem's ``linearize`` when it has one
    (x-dependent work done once per system), else its ``hvp``/``jac_t`` bound to (x, θ)."""
    linearize = getattr(problem, "linearize", None)
    if linearize is not None:
        lin = linearize(x, theta)
        return lin, lin.jac_t
    return _Bound(problem.hvp, x, theta, problem.n), _Bound(problem.jac_t, x, theta, problem.n)


def _initial_guess(problem: Any) -> Any:
    xp = array_namespace(problem.x_true)
    y = problem.y
    if tuple(y.shape) == tuple(problem.x_true.shape):
        return xp.asarray(y, copy=True)
    return xp.zeros_like(problem.x_true)


def _newton_polish(
    problem: Any, theta: Any, x: Any, settings: HypergradientSettings
) -> tuple[Any, bool]:
    """Newton steps x ← x − H⁻¹∇f until ‖∇f‖ ≤ lower_gtol (MINRES to rtol 1e-12)."""
    xp = array_namespace(x)
    for _ in range(settings.lower_newton_steps):
        g = problem.lower_grad(x, theta)
        if float(xp.linalg.vector_norm(g)) <= settings.lower_gtol:
            return x, True
        step = rminres(hessian_operators(problem, x, theta)[0], g, rtol=1e-12)
        x = x - step.x
    g = problem.lower_grad(x, theta)
    return x, float(xp.linalg.vector_norm(g)) <= settings.lower_gtol


def hypergradient(
    problem: Any,
    theta: Any,
    state: SampleState,
    settings: HypergradientSettings,
    recycler: Recycler | None = None,
) -> tuple[Any, SampleState, SampleRecord]:
    """Return (−Jᵀw as a flat (p,) array, the new state, the record) for one sample."""
    recycler = recycler if recycler is not None else Recycler(settings.recycle)
    counter = problem.counter
    start = counter.snapshot()

    t0 = time.perf_counter()
    x0 = state.x if (settings.warm_start and state.x is not None) else _initial_guess(problem)
    lower = lbfgs(
        lambda x: problem.lower_objective(x, theta),
        lambda x: problem.lower_grad(x, theta),
        x0,
        gtol=settings.lower_gtol,
        rtol=settings.lower_rtol,
        maxiter=settings.lower_maxiter,
        memory=settings.lower_memory,
        value_and_grad=_fused(problem, theta),
    )
    x, lower_converged = lower.x, lower.converged
    if settings.lower_newton_steps:
        x, lower_converged = _newton_polish(problem, theta, x, settings)
    t1 = time.perf_counter()
    after_lower = counter.snapshot()

    H, J = hessian_operators(problem, x, theta)
    needs_j = settings.recycle.needs_jacobian or settings.stop.kind == "hypergradient"
    g = problem.upper_grad(x)
    solve = recycled_solve(
        H,
        g,
        recycler=recycler,
        carry=state.carry,
        x0=state.w if settings.warm_start else None,
        jac_t=J if needs_j else None,
        stop=settings.stop,
        maxiter=settings.krylov_maxiter,
    )
    w = solve.result.x
    t2 = time.perf_counter()
    grad = -J(w)
    t3 = time.perf_counter()
    counts = counter.snapshot() - after_lower

    shadow = None
    w_shadow = state.w_shadow
    if settings.shadow_baseline:
        before = counter.snapshot()
        base = recycled_solve(
            H,
            g,
            recycler=Recycler(RecycleConfig()),
            x0=w_shadow if settings.warm_start else None,
            stop=replace(settings.stop, kind="residual"),
            maxiter=settings.krylov_maxiter,
        )
        spent = counter.snapshot() - before
        shadow = ShadowRecord(base.result.iterations, spent.hvp, spent.hvp_passes)
        w_shadow = base.result.x

    record = SampleRecord(
        upper_loss=float(problem.upper_loss(x)),
        lower_iterations=lower.iterations,
        lower_converged=lower_converged,
        krylov_iterations=solve.result.iterations,
        krylov_converged=solve.result.converged,
        krylov_status=solve.result.status.value,
        recycle_dim=0 if solve.space is None else solve.space.k,
        counts=counts,
        lower_counts=after_lower - start,
        hg_error_estimate=solve.hg_error_estimate,
        time_lower=t1 - t0,
        time_recycle=solve.time_prepare,
        time_krylov=solve.time_solve,
        time_jac=t3 - t2,
        shadow=shadow,
    )
    new_state = SampleState(x=x, w=w, carry=solve.carry, w_shadow=w_shadow)
    return grad, new_state, record
