"""The bilevel engine for mini-batches, solving all samples of a batch together.

Per outer step and batch of B samples: one batched L-BFGS (per-sample line searches and
convergence masks), one linearisation of the B Hessians, one batched RMINRES (per-sample
Lanczos scalars, recycle spaces and freezing; residual or NSC rule per sample; host
checks every ``check_every`` iterations, by default every iteration on the CPU and
every 8 on a GPU) and one batched Jᵀ.  Per-sample state
(``SampleState``: warm starts and the recycle carry) is the same as in
``BilevelEngine``, so runs can switch engines and checkpoints are interchangeable.
Per-sample records count what the unbatched solver would have spent;
``StepResult.metrics`` adds what the batch really spent (passes, and applications
including frozen rows).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from array_api_compat import array_namespace

from backends.counting import Counter, Counts
from backends.host import host_check_needs_sync, to_host
from framework.bilevel.engine import BilevelEngine, EngineConfig, StepResult
from framework.bilevel.hypergradient import SampleRecord, SampleState, ShadowRecord
from framework.krylov.minres import rminres
from framework.krylov.recycle import ORACLES, RecycleCarry, stack_carries
from framework.optim import lbfgs


def batching_unsupported(problems: Sequence[Any], config: EngineConfig) -> str:
    """Why the batched path cannot run this configuration ('' when it can)."""
    kinds = {type(p) for p in problems}
    if len(kinds) > 1 or not all(hasattr(p, "concat") for p in problems):
        return "batched path needs samples of one batch-first problem type (with concat)"
    if config.lower_newton_steps:
        return "Newton polishing of the lower level runs on the unbatched path only"
    return ""


def default_check_every(like: Any) -> int:
    """Iterations between the batched solver's host checks for arrays like ``like``:
    every iteration on the CPU, where a check is free; every 8 on a GPU, where each check
    synchronises (the frozen samples' extra iterations are masked, results unchanged)."""
    return 8 if host_check_needs_sync(like) else 1


class BatchedBilevelEngine(BilevelEngine):
    """``BilevelEngine`` whose ``evaluate`` solves the selected samples as one batch."""

    def __init__(
        self,
        problems: Sequence[Any],
        config: EngineConfig | None = None,
        *,
        backend: Any = None,
        check_every: int | None = None,
    ) -> None:
        super().__init__(problems, config, backend=backend)
        reason = batching_unsupported(self.problems, self.config)
        if reason:
            raise ValueError(reason)
        if check_every is None:
            check_every = default_check_every(self.problems[0].y)
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every must be a positive integer; got {check_every!r}")
        self.check_every = check_every
        self.counter = Counter()
        self._batch_cache: tuple[tuple[int, ...], Any] | None = None

    def _batch(self, indices: tuple[int, ...]) -> Any:
        """The samples ``indices`` as one batch-first problem counting in ``self.counter``."""
        if self._batch_cache is None or self._batch_cache[0] != indices:
            batch = type(self.problems[0]).concat(
                [self.problems[i] for i in indices], counter=self.counter
            )
            self._batch_cache = (indices, batch)
        return self._batch_cache[1]

    def _stack(self, xp: Any, name: str, indices: tuple[int, ...], fill: Any) -> Any:
        """Stack the samples' state ``name``; None when no sample has one yet, rows of
        ``fill`` for those that lack it."""
        rows = [getattr(self.states[i], name) for i in indices]
        if all(r is None for r in rows):
            return None
        return xp.stack([fill[j, ...] if r is None else r for j, r in enumerate(rows)])

    def _carry_after(self, res: Any, space: Any, j: int) -> RecycleCarry | None:
        """Sample j's carry after the batched solve (``Recycler.carry_after`` per row)."""
        if res.harvest is not None:
            carry = res.harvest.sample(j)
            return carry if carry.basis.shape[-1] > 0 else None
        if space is not None and self.config.recycle.strategy not in ORACLES:
            carry = RecycleCarry(space.U, selected=True).sample(j)
            return carry if carry.basis.shape[-1] > 0 else None
        return None

    def _setup_counts(self, carry: Any, space: Any, j: int, n: int) -> tuple[int, int]:
        """What sample j alone spends on its recycle space: H applications (C = HU, HW
        for outer selection, H·I for the oracles) and Jᵀ applications of the selection."""
        rc = self.config.recycle
        if space is None:
            return 0, 0
        if rc.strategy in ORACLES:
            return n, n if rc.needs_jacobian else 0
        width = carry.sample(j).basis.shape[-1]
        return width, width if (rc.needs_jacobian and not carry.selected) else 0

    def evaluate(self, theta: Any, indices: Sequence[int] | None = None) -> StepResult:
        indices = tuple(range(len(self.problems))) if indices is None else tuple(indices)
        if not indices:
            raise ValueError("indices must name at least one sample")
        cfg = self.config
        batch = self._batch(indices)
        xp = array_namespace(theta)
        B, n = len(indices), batch.n
        t0 = time.perf_counter()
        guess = batch.Y if batch.Y.shape == batch.X_true.shape else xp.zeros_like(batch.X_true)
        X0 = self._stack(xp, "x", indices, guess) if cfg.warm_start else None
        X0 = guess if X0 is None else X0
        lower = lbfgs(
            lambda X: batch.lower_objective(X, theta),
            lambda X: batch.lower_grad(X, theta),
            X0,
            gtol=cfg.lower_gtol,
            rtol=cfg.lower_rtol,
            maxiter=cfg.lower_maxiter,
            memory=cfg.lower_memory,
            rows_value_and_grad=lambda X, rows: batch.subset(rows).lower_value_and_grad(
                X, theta),
        )
        X = lower.x
        t1 = time.perf_counter()
        after_lower = self.counter.snapshot()
        lin = batch.linearize(X, theta)
        G = batch.upper_grad(X)
        W0 = self._stack(xp, "w", indices, xp.zeros_like(G)) if cfg.warm_start else None
        carry_in = stack_carries([self.states[i].carry for i in indices], G[0, ...])
        space = self.recycler.prepare(carry_in, lin.hvp, lin.jac_t, like=G)
        stop = cfg.stop
        rule = None
        if stop.kind == "hypergradient" and space is not None:
            # NSC; without a recycle space yet the residual rule applies (as unbatched)
            rule = stop.rule(space, lin.jac_t, G)
        t2 = time.perf_counter()
        res = rminres(
            lin.hvp,
            G,
            x0=W0,
            recycle=space,
            rtol=stop.rtol,
            atol=stop.atol,
            maxiter=cfg.krylov_maxiter,
            check_every=self.check_every,
            harvest=self.recycler.harvester(lin.jac_t),
            stop=rule,
            true_residual=False,
        )
        t3 = time.perf_counter()
        grads = -lin.jac_t(res.x)
        t4 = time.perf_counter()
        spent = self.counter.snapshot() - after_lower

        shadows: list[ShadowRecord | None] = [None] * B
        W_shadow = None
        syncs = lower.host_reads + res.host_syncs
        if cfg.shadow_baseline:
            base = rminres(
                lin.hvp, G,
                x0=self._stack(xp, "w_shadow", indices, xp.zeros_like(G))
                if cfg.warm_start else None,
                rtol=stop.rtol, atol=stop.atol, maxiter=cfg.krylov_maxiter,
                check_every=self.check_every, true_residual=False,
            )
            W_shadow = base.x
            syncs += base.host_syncs
            shadows = [ShadowRecord(base.iterations[j], base.matvecs[j], base.matvecs[j])
                       for j in range(B)]

        losses = batch.upper_loss(X)
        loss_h = to_host(losses)
        k_space = None if space is None else space.dims
        estimates = active = None
        if rule is not None:
            estimates = to_host(xp.stack(rule.estimates, axis=1))
            active = to_host(rule.active)
        records = []
        for j, i in enumerate(indices):
            kj = 0 if k_space is None else k_space[j]
            estimate = float("nan")
            if estimates is not None and active[j]:
                estimate = float(estimates[j, res.iterations[j]])
            # what the unbatched solver would spend on this sample: iterations (+1 for
            # the initial residual), the recycle set-up, 1 for −Jᵀw and, for inner RGen,
            # JᵀW on the sample's own W = [U, V]; the batch's real spend is in batch_counts
            setup_h, setup_jt = self._setup_counts(carry_in, space, j, n)
            inner_rgen = cfg.recycle.needs_jacobian and cfg.recycle.selection == "inner" and (
                cfg.recycle.strategy not in ORACLES)
            selection_jt = setup_jt + (kj + res.iterations[j] if inner_rgen else 0)
            if rule is not None:
                selection_jt += kj  # JᵀU for the NSC estimator
            counts = Counts(
                hvp=res.matvecs[j] + setup_h,
                hvp_passes=res.matvecs[j] + (1 if setup_h else 0),
                jac_t=1 + selection_jt,
                jac_t_passes=1 + (1 if selection_jt else 0),
            )
            lower_counts = Counts(f_evals=lower.f_evals[j], grad_evals=lower.grad_evals[j])
            records.append(SampleRecord(
                upper_loss=float(loss_h[j]),
                lower_iterations=lower.iterations[j],
                lower_converged=lower.converged[j],
                krylov_iterations=res.iterations[j],
                krylov_converged=res.converged[j],
                krylov_status=res.status[j].value,
                recycle_dim=kj,
                counts=counts,
                lower_counts=lower_counts,
                hg_error_estimate=estimate,
                time_lower=(t1 - t0) / B,
                time_recycle=(t2 - t1) / B,
                time_krylov=(t3 - t2) / B,
                time_jac=(t4 - t3) / B,
                shadow=shadows[j],
            ))
            self.states[i] = SampleState(
                x=X[j, ...], w=res.x[j, ...], carry=self._carry_after(res, space, j),
                w_shadow=None if W_shadow is None else W_shadow[j, ...],
            )
        grad = xp.reshape(xp.sum(grads, axis=0) / B, self.theta_shape)
        return StepResult(float(sum(loss_h)) / B, grad, indices, tuple(records),
                          batch_counts=spent, host_syncs=syncs)


def create_engine(
    problems: Sequence[Any], config: EngineConfig, *, backend: Any = None, batched: bool = True,
    check_every: int | None = None,
) -> BilevelEngine:
    """The batched engine when ``batched`` and the configuration allows it, else the
    per-sample ``BilevelEngine``."""
    if batched and len(problems) > 0 and not batching_unsupported(problems, config):
        return BatchedBilevelEngine(problems, config, backend=backend, check_every=check_every)
    return BilevelEngine(problems, config, backend=backend)


__all__ = ["BatchedBilevelEngine", "batching_unsupported", "create_engine", "default_check_every"]
