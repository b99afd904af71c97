"""Stopping rules for Krylov solves, per sample of a batch: called before the first and
after every iteration with the batch's ``IterationState``, a rule returns a (B,) boolean
mask (True: the sample stops).  With ``needs_residual`` it also gets the residual rows
(kept by recurrence, no extra applications).  A rule for one system (floats in, a bool
out) serves a 1-D right-hand side through ``SingleSampleRule``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

from backends.choice import Choice
from backends.host import to_host
from framework.krylov.dense import diag_embed, gsvd, orthonormal_coordinates, symmetrize


@dataclass(frozen=True)
class IterationState:
    """What a rule sees: the iteration, the residual-norm estimates and ‖b‖ ((B,) arrays;
    floats for a single-system rule), and the residual rows and iterate rows when it asked
    for them (``needs_residual``, ``needs_iterate``)."""

    iteration: int
    residual_norm: Any
    b_norm: Any
    residual: Any = None
    iterate: Any = None


def check_tolerances(rtol: float, atol: float) -> None:
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class ResidualRule:
    """Stop when ‖r_k‖ ≤ max(rtol·‖b‖, atol) (the residual norm is the MINRES estimate);
    ``rtol`` is one value for every row or a tuple of one per row of a batch."""

    rtol: float | tuple[float, ...] = 1e-5
    atol: float = 0.0

    def __post_init__(self) -> None:
        for rtol in self._rtols(1):
            check_tolerances(rtol, self.atol)

    def _rtols(self, rows: int) -> tuple[float, ...]:
        return self.rtol if isinstance(self.rtol, tuple) else (self.rtol,) * rows

    def thresholds(self, b_norms: list[float]) -> list[float]:
        rtols = self._rtols(len(b_norms))
        return [max(r * b, self.atol) for r, b in zip(rtols, b_norms, strict=True)]

    def __call__(self, state: IterationState) -> Any:
        xp = array_namespace(state.b_norm)
        rtol = self.rtol
        if isinstance(rtol, tuple):
            rtol = xp.asarray(rtol, dtype=state.b_norm.dtype, device=device_of(state.b_norm))
        limit = xp.maximum(rtol * state.b_norm, xp.full_like(state.b_norm, self.atol))
        return state.residual_norm <= limit


class SingleSampleRule:
    """A rule for one system used on a batch of one."""

    def __init__(self, rule: Any) -> None:
        self.rule = rule
        self.needs_residual = bool(getattr(rule, "needs_residual", False))

    def __call__(self, state: IterationState) -> Any:
        xp = array_namespace(state.b_norm)
        one = IterationState(state.iteration, float(to_host(state.residual_norm)[0]),
                             float(to_host(state.b_norm)[0]),
                             None if state.residual is None else state.residual[0, :])
        return xp.asarray([bool(self.rule(one))])


@dataclass(frozen=True)
class HypergradientErrorEstimator:
    """The Galerkin estimate of the hypergradient error from recycle spaces (U, C = HU) per
    sample, Jᵀ(w_k − w*) = −JᵀH⁻¹r_k ≈ −JᵀU (UᵀHU)⁻¹ Uᵀ r_k: with the GSVD of (JᵀU S, SᵀUᵀHUS)
    (S orthonormal coordinates of U), ‖JᵀU(UᵀHU)⁻¹Uᵀr‖ = ‖M r‖ with M = diag(σ)[sel]
    V_H[:, sel]ᵀ Sᵀ Uᵀ, σ = c/s, (B, sel, n); ``zero_block`` (B,) marks samples with JᵀU = 0."""

    M: Any
    zero_block: Any

    def estimate(self, R: Any) -> Any:
        """‖M_i r_i‖ for the rows r_i of R (B, n): a (B,) array."""
        xp = array_namespace(R)
        v = (self.M @ R[..., None])[..., 0]
        return xp.sqrt(xp.sum(v * v, axis=-1))

    @classmethod
    def from_space(cls, U: Any, C: Any, JU: Any, *,
                   keep: int | None = None) -> HypergradientErrorEstimator:
        """Build M from U, C = HU (B, n, k) and JᵀU (B, p, k); ``keep`` largest σ (all by
        default).  Padding (zero) columns of U get σ = 0 and contribute nothing."""
        xp = array_namespace(U, C, JU)
        Ut = xp.matrix_transpose(U)
        S, kept = orthonormal_coordinates(Ut @ U)
        St = xp.matrix_transpose(S)
        G = symmetrize(St @ (Ut @ C) @ S) + diag_embed(xp.astype(~kept, U.dtype))
        dec = gsvd(JU @ S, G)
        sel = dec.sigma.shape[-1] if keep is None else min(keep, dec.sigma.shape[-1])
        rows = xp.matrix_transpose(dec.left[..., :sel]) * dec.sigma[..., :sel, None]
        zero = ~xp.any(xp.reshape(JU != 0, (JU.shape[0], -1)), axis=1)
        return cls(M=rows @ St @ Ut, zero_block=zero)


class HypergradientErrorRule:
    """The new stopping criterion (NSC): stop sample i when safety·‖M_i r_k‖ ≤
    max(rtol·‖M_i b_i‖, atol), ‖M b‖ estimating the hypergradient norm (``rtol`` is a
    relative hypergradient error).  Samples with a zero estimator (no recycle space yet,
    JᵀU = 0) use ``fallback`` (``active`` False, ``reason`` says why).  ``estimates``
    records safety·‖M r_k‖ / ‖M b‖, the estimated relative error, at every check."""

    needs_residual = True
    batch = True

    def __init__(self, estimator: HypergradientErrorEstimator | None, b: Any, *, rtol: float,
                 atol: float, safety: float, fallback: ResidualRule) -> None:
        xp = array_namespace(b)
        self.estimator, self.safety, self.fallback = estimator, safety, fallback
        self.estimates: list[Any] = []
        if estimator is None:
            self.scale = xp.zeros(b.shape[:1], dtype=b.dtype, device=device_of(b))
            self.active = self.scale > 0
            self.reason = "no recycle space yet: residual rule used"
        else:
            self.scale = estimator.estimate(b)
            self.active = ~estimator.zero_block & (self.scale > 0)
            self.reason = "" if bool(xp.all(self.active)) else (
                "JᵀU (UᵀHU)⁻¹Uᵀ b is zero (kept block is zero): residual rule used")
        self.threshold = xp.maximum(rtol * self.scale, xp.full_like(self.scale, atol))

    def __call__(self, state: IterationState) -> Any:
        fallback = self.fallback(state)
        if self.estimator is None:
            return fallback
        xp = array_namespace(state.residual)
        est = self.safety * self.estimator.estimate(state.residual)
        self.estimates.append(est / xp.where(self.scale > 0, self.scale,
                                             xp.ones_like(self.scale)))
        return xp.where(self.active, est <= self.threshold, fallback)


class HypergradientChangeRule:
    """Stop sample i at iteration k ≥ window + 1 when safety·E_k ≤ max(rtol·‖Jᵀw_k‖, atol),
    E_k = max(‖M_i r_k‖, q_k/(1 − q_k)·Δ_k), Δ_k = ‖Jᵀ(w_k − w_{k−1})‖ and q_k the largest
    of ‖r_j‖/‖r_{j−1}‖ and Δ_j/Δ_{j−1} over the last ``window`` steps (q_k ≥ 1 never stops;
    before k = window + 1 only r = 0 stops).  One Jᵀ application per call to the rows still
    running; ``estimates`` records safety·E_k/‖Jᵀw_k‖ (README, "A hypergradient-error rule
    that holds")."""

    needs_residual = True
    needs_iterate = True
    batch = True

    def __init__(self, estimator: HypergradientErrorEstimator | None, jac_t: Any, b: Any, *,
                 rtol: float, atol: float, safety: float, window: int) -> None:
        xp = array_namespace(b)
        self.estimator, self.jac_t, self.rtol, self.atol = estimator, jac_t, rtol, atol
        self.safety, self.window = safety, window
        self.active = xp.ones(b.shape[:1], dtype=xp.bool, device=device_of(b))
        self.done = ~self.active
        self.estimates: list[Any] = []
        self.rates: list[Any] = []  # the last ``window`` contraction ratios (k ≥ 2)
        self.previous: tuple[Any, Any, Any] | None = None  # Jᵀw, ‖r‖, Δ of k − 1

    def __call__(self, state: IterationState) -> Any:
        xp = array_namespace(state.iterate)
        w, rnorm = state.iterate, state.residual_norm
        if self.previous is None and not bool(xp.any(w != 0)):
            h = 0 * w[..., :1]  # x₀ = 0: Jᵀx₀ = 0 without an application (one sync)
        else:  # stopped rows are zero (not applied, not counted)
            h = self.jac_t(xp.where(self.done[:, None], xp.zeros_like(w), w))
        h_norm = xp.sqrt(xp.sum(h * h, axis=-1))
        step = xp.full_like(rnorm, math.inf)
        est = xp.where(rnorm > 0, step, 0 * rnorm)  # k = 0: only r = 0 stops
        if self.previous is not None:
            h_prev, r_prev, step_prev = self.previous
            step = xp.sqrt(xp.sum((h - h_prev) ** 2, axis=-1))
            if len(self.estimates) >= 2:  # k ≥ 2: Δ_{k−1} exists
                self.rates = [*self.rates, xp.maximum(
                    rnorm / xp.where(r_prev > 0, r_prev, xp.ones_like(r_prev)),
                    step / xp.where(step_prev > 0, step_prev, xp.ones_like(step_prev)))
                ][-self.window:]
            q = xp.ones_like(rnorm)  # no stop before ``window`` ratios exist
            if len(self.rates) == self.window:
                q = reduce(xp.maximum, self.rates)
                q = xp.where(q < 1, q, xp.ones_like(q))
            tail = xp.where(q < 1, step * q / xp.where(q < 1, 1 - q, xp.ones_like(q)),
                            xp.full_like(q, math.inf))
            if self.estimator is not None:
                tail = xp.maximum(tail, self.estimator.estimate(state.residual))
            est = xp.where(rnorm > 0, self.safety * tail, est)
        self.previous = (h, rnorm, step)
        self.estimates.append(est / xp.where(h_norm > 0, h_norm, xp.ones_like(h_norm)))
        self.done = self.done | (est <= xp.maximum(self.rtol * h_norm,
                                                   xp.full_like(h_norm, self.atol)))
        return self.done


# Stopping rules (config ``stop.kind``).
StopKind = Choice("StopKind", "residual hypergradient hypergradient_change")


@dataclass
class StopConfig:
    """The stopping rule of a recycled solve (schema of the config group ``stop``):
    ``residual``, ‖r‖ ≤ max(rtol·‖b‖, atol); ``hypergradient``, the NSC with relative
    tolerance ``hg_rtol`` (default rtol), ``safety`` and ``keep`` generalised singular
    values (all when None); ``hypergradient_change``, the NSC and the tail of the
    hypergradient's changes at the slowest of the last ``window`` contraction ratios
    (``HypergradientChangeRule``, tolerance hg_rtol or rtol)."""

    kind: StopKind = StopKind.residual
    rtol: float = 1e-5
    atol: float = 0.0
    hg_rtol: float | None = None
    safety: float = 1.0
    keep: int | None = None
    window: int = 2

    def __post_init__(self) -> None:
        self.kind = StopKind(self.kind)
        if not (isinstance(self.window, int) and self.window >= 1):
            raise ValueError(f"window must be an integer >= 1, got {self.window!r}")
        if not (math.isfinite(self.safety) and self.safety > 0):
            raise ValueError(f"safety must be a finite number > 0, got {self.safety!r}")
        check_tolerances(self.rtol, self.atol)
        if self.hg_rtol is not None:
            check_tolerances(self.hg_rtol, 0.0)

    def rule(self, space: Any, jac_t: Any, b: Any) -> Any:
        """The rule for right-hand sides ``b`` (B, n) with recycle space ``space`` (B, n, k)
        or None; ``jac_t`` maps (B, n, k) → (B, p, k)."""
        if self.kind == StopKind.residual:
            return ResidualRule(self.rtol, self.atol)
        if jac_t is None:
            raise ValueError(f"the {self.kind.value} stopping rule needs a jac_t operator")
        estimator = None if space is None else HypergradientErrorEstimator.from_space(
            space.U, space.C, jac_t(space.U), keep=self.keep)
        hg_rtol = self.rtol if self.hg_rtol is None else self.hg_rtol
        if self.kind == StopKind.hypergradient_change:
            return HypergradientChangeRule(estimator, jac_t, b, rtol=hg_rtol, atol=self.atol,
                                           safety=self.safety, window=self.window)
        return HypergradientErrorRule(
            estimator, b, rtol=hg_rtol, atol=self.atol, safety=self.safety,
            fallback=ResidualRule(self.rtol, self.atol))
