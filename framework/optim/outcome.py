"""What the batch minimisers (``lbfgs``, ``newton_krylov``) report per sample, the host
bookkeeping that records it, and the one-line refusal of bad arguments."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeAlias, TypeVar

import numpy as np

from framework.optim.rows import RowEvaluator, choose

T = TypeVar("T")
PerSample: TypeAlias = T | tuple[T, ...]  # one value for a 1-D x0, one per sample for (B, n)


def require(ok: bool, need: str, **given: Any) -> None:
    """Refuse bad input in one line: what is needed and the values given."""
    if not ok:
        raise ValueError(f"need {need}; got " + ", ".join(f"{k}={v!r}" for k, v in given.items()))


class MinimizeStatus(Enum):
    CONVERGED = "converged"
    MAXITER = "maxiter"
    LINESEARCH_FAILED = "linesearch_failed"
    NONFINITE = "nonfinite"


@dataclass(frozen=True)
class MinimizeResult:
    """Outcome of a batch minimiser; per-sample fields are tuples of length B for a (B, n)
    x0 and single values for a 1-D x0.  ``f_evals`` counts evaluations of f and ∇f
    (always together), ``hvp`` Hessian-vector products (0 for L-BFGS), ``f_history`` f at
    every accepted iterate, ``evaluation_rounds`` the calls of the evaluation (each on the
    rows then searching), ``host_reads`` the minimiser's own transfers to the host."""

    x: Any
    status: PerSample[MinimizeStatus]
    message: PerSample[str]
    iterations: PerSample[int]
    f_evals: PerSample[int]
    hvp: PerSample[int]
    grad_norm: PerSample[float]
    f: PerSample[float]
    f_history: PerSample[tuple[float, ...]]
    evaluation_rounds: int
    host_reads: int

    @property
    def converged(self) -> PerSample[bool]:
        if isinstance(self.status, tuple):
            return tuple(s is MinimizeStatus.CONVERGED for s in self.status)
        return self.status is MinimizeStatus.CONVERGED

    @property
    def all_converged(self) -> bool:
        return bool(np.all(self.converged))

    @property
    def grad_evals(self) -> PerSample[int]:  # each evaluation gives f and ∇f
        return self.f_evals


class SampleLog:
    """Host bookkeeping per sample: f and ‖∇f‖ at the iterate, status, message, iterations,
    f history and tolerance max(gtol, rtol·‖∇f(x0)‖); f or ∇f not finite at x0: NONFINITE."""

    def __init__(self, F: np.ndarray, gnorm: np.ndarray, gtol: float, rtol: float) -> None:
        bsz = len(F)
        self.F, self.gnorm = F, gnorm
        self.running = np.ones(bsz, dtype=bool)
        self.status: list[MinimizeStatus | None] = [None] * bsz
        self.message = [""] * bsz
        self.iterations = np.zeros(bsz, dtype=np.int64)
        self.history = [[float(f)] for f in F]
        self.tol = np.maximum(gtol, rtol * gnorm)
        self.stop(~(np.isfinite(F) & np.isfinite(gnorm)), MinimizeStatus.NONFINITE, 0,
                  "f or ∇f is not finite at x0 (f={f})")

    def stop(self, which: np.ndarray, status: MinimizeStatus, k: int, message: str) -> None:
        """Stop the running samples ``which`` at iteration k (``message`` formatted with k,
        f, g = ‖∇f‖ and tol)."""
        if not np.count_nonzero(which):
            return
        for i in (which & self.running).nonzero()[0].tolist():
            self.status[i], self.iterations[i], self.running[i] = status, k, False
            self.message[i] = message.format(k=k, f=self.F[i], g=self.gnorm[i], tol=self.tol[i])

    def iterate(self, maxiter: int) -> Iterator[tuple[int, np.ndarray]]:
        """(k, mask of the samples iterating) for k = 0, 1, …; before each, the samples
        with ‖∇f‖ ≤ tol stop (CONVERGED); ends at k = maxiter or when none is left."""
        for k in range(maxiter + 1):
            self.stop(self.gnorm <= self.tol, MinimizeStatus.CONVERGED, k,
                      "‖∇f‖ = {g:.3e} ≤ {tol:.3e}")
            iterating = self.running.copy()
            if k == maxiter or not np.count_nonzero(iterating):
                return
            yield k, iterating

    def record(self, ok: np.ndarray, F: np.ndarray, gnorm: np.ndarray) -> tuple[np.ndarray, ...]:
        """Take f and ‖∇f‖ of the samples ``ok`` (that accepted a step); (f, ‖∇f‖) of all."""
        self.F, self.gnorm = choose(ok, F, self.F), choose(ok, gnorm, self.gnorm)
        for i in ok.nonzero()[0].tolist():
            self.history[i].append(float(self.F[i]))
        return self.F, self.gnorm

    def result(self, maxiter: int, X: Any, ev: RowEvaluator, hvp: np.ndarray) -> MinimizeResult:
        """The result of a run that ended at rows X (unwrapped for a 1-D x0); the samples
        still running stop at ``maxiter`` (MAXITER)."""
        self.stop(self.running, MinimizeStatus.MAXITER, maxiter,
                  "reached maxiter={k} with ‖∇f‖ = {g:.3e} > {tol:.3e}")
        per_sample = dict(
            status=tuple(self.status), message=tuple(self.message),
            iterations=tuple(self.iterations.tolist()),
            f_evals=tuple(ev.sample_evaluations.tolist()), hvp=tuple(hvp.tolist()),
            grad_norm=tuple(self.gnorm.tolist()), f=tuple(self.F.tolist()),
            f_history=tuple(tuple(h) for h in self.history))
        if ev.single:
            X, per_sample = X[0, :], {name: value[0] for name, value in per_sample.items()}
        return MinimizeResult(X, **per_sample, evaluation_rounds=ev.evaluations,
                              host_reads=ev.host_reads)
