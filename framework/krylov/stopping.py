"""Stopping rules for Krylov solves.

A rule is called once before the first iteration and after every iteration with an
:class:`IterationState`; it returns ``True`` to stop.  A rule that sets
``needs_residual = True`` receives the residual vector, which the solver then keeps by
recurrence (no extra operator applications).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class IterationState:
    """What a stopping rule sees: iteration count, residual-norm estimate (host float),
    ‖b‖, and the residual vector when the rule asked for it."""

    iteration: int
    residual_norm: float
    b_norm: float
    residual: Any = None


@runtime_checkable
class StopRule(Protocol):
    needs_residual: bool

    def __call__(self, state: IterationState) -> bool: ...


def check_tolerances(rtol: float, atol: float) -> None:
    """Raise ``ValueError`` naming the argument when a tolerance is negative or not finite."""
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class ResidualRule:
    """Stop when ‖r_k‖ ≤ max(rtol·‖b‖, atol) (the residual norm is the MINRES estimate)."""

    rtol: float = 1e-5
    atol: float = 0.0
    needs_residual: bool = False

    def __post_init__(self) -> None:
        check_tolerances(self.rtol, self.atol)

    def threshold(self, b_norm: float) -> float:
        return max(self.rtol * b_norm, self.atol)

    def __call__(self, state: IterationState) -> bool:
        return state.residual_norm <= self.threshold(state.b_norm)
