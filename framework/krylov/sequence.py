"""Solving a sequence of slowly changing systems H_t w = g_t with warm starts and
recycling — the unit that hypergradients, experiments and benchmarks share."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from backends.counting import Counter, CountingOperator, Counts
from framework.krylov.minres import KrylovResult, rminres
from framework.krylov.operators import Operator, RowOperator
from framework.krylov.recycle import RecycleCarry, RecycleConfig, Recycler
from framework.krylov.recycle_space import RecycleSpace
from framework.krylov.stopping import StopConfig


@dataclass(frozen=True)
class RecycledSolve:
    """One recycled solve: the Krylov result, the carry for the next system, the space
    and the stopping rule used (its ``estimates`` hold the NSC history)."""

    result: KrylovResult
    carry: RecycleCarry | None
    space: RecycleSpace | None
    rule: Any

    @property
    def hg_error_estimate(self) -> float:
        """Last estimate of the relative hypergradient error ‖Jᵀ(w_k − w*)‖/‖Jᵀw*‖ by a
        hypergradient rule (NaN when none was active)."""
        estimates = getattr(self.rule, "estimates", None)
        return float(estimates[-1][0]) if estimates and bool(self.rule.active[0]) else math.nan


def recycled_solve(H: Operator, g: Any, *, recycler: Recycler, carry: RecycleCarry | None = None,
                   x0: Any = None, jac_t: Operator | None = None, stop: StopConfig | None = None,
                   maxiter: int | None = None) -> RecycledSolve:
    """Prepare the recycle space for H from ``carry``, solve H w = g by RMINRES with the
    configured stopping rule, and harvest the carry for the next system."""
    stop = stop if stop is not None else StopConfig()
    space = recycler.prepare(carry, H, jac_t, like=g)
    rows_jac_t = None if jac_t is None else RowOperator(jac_t, check=False)
    rule = stop.rule(None if space is None else space.promoted(), rows_jac_t, g[None, :])
    result = rminres(H, g, x0=x0, recycle=space, stop=rule, maxiter=maxiter,
                     harvest=recycler.harvester(rows_jac_t), true_residual=False)
    return RecycledSolve(result, recycler.carry_after(result, space), space, rule)


@dataclass(frozen=True)
class LinearSystem:
    """H w = g, with the Jᵀ operator of the same point and optionally a reference
    hypergradient −Jᵀw* (for reporting the true hypergradient error)."""

    H: Operator
    g: Any
    jac_t: Operator | None = None
    reference: Any = None


@dataclass(frozen=True, kw_only=True)
class SystemRecord(Counts):
    """Per-system figures of a sequence solve: the operation counts (recycle-space set-up,
    the NSC set-up and the final −Jᵀw included) and the solve's outcome."""

    index: int
    iterations: int
    converged: bool
    status: str
    recycle_dim: int
    residual_norm: float
    hg_error_estimate: float
    hg_error: float
    hypergradient: Any
    seconds: float


@dataclass(frozen=True)
class SequenceResult:
    records: tuple[SystemRecord, ...]

    def total(self, field: str) -> float:
        return sum(getattr(r, field) for r in self.records)

    @property
    def iterations(self) -> int:
        return int(self.total("iterations"))

    @property
    def applications(self) -> int:
        return int(self.total("applications"))

    @property
    def passes(self) -> int:
        return int(self.total("passes"))


def _norm(v: Any) -> float:
    return math.sqrt(float(v @ v))


def solve_sequence(systems: Iterable[LinearSystem], *, recycle: RecycleConfig | None = None,
                   stop: StopConfig | None = None, maxiter: int | None = None) -> SequenceResult:
    """Walk ``systems`` with warm starts (w_{t−1} as x0) and recycling; when a system has
    ``jac_t`` its hypergradient −Jᵀw is formed (one application) and, given a
    ``reference``, its relative error reported."""
    recycler = Recycler(recycle if recycle is not None else RecycleConfig())
    carry = w = None
    records = []
    for index, system in enumerate(systems):
        counter = Counter()
        n = int(system.g.shape[0])
        H = CountingOperator(system.H, n, counter=counter, kind="hvp")
        J = None if system.jac_t is None else CountingOperator(system.jac_t, n, counter=counter,
                                                               kind="jac_t")
        t0 = time.perf_counter()
        solve = recycled_solve(H, system.g, recycler=recycler, carry=carry, x0=w, jac_t=J,
                               stop=stop, maxiter=maxiter)
        res, carry, w = solve.result, solve.carry, solve.result.x
        hypergradient, hg_error = None, math.nan
        if J is not None:
            hypergradient = -J(w)
            if system.reference is not None:
                hg_error = _norm(hypergradient - system.reference) / _norm(system.reference)
        records.append(
            SystemRecord(
                **asdict(counter.snapshot()),
                index=index,
                iterations=res.iterations,
                converged=res.converged,
                status=res.status.value,
                recycle_dim=0 if solve.space is None else solve.space.k,
                residual_norm=res.residual_norm,
                hg_error_estimate=solve.hg_error_estimate,
                hg_error=hg_error,
                hypergradient=hypergradient,
                seconds=time.perf_counter() - t0,
            )
        )
    return SequenceResult(tuple(records))
