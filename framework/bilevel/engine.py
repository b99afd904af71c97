"""The bilevel engine: hypergradients of a mini-batch of samples at θ, solved as one batch.

``BilevelEngine.evaluate(θ, indices)`` takes the B samples ``indices`` through

    X* = argmin_X f(X, θ)    one L-BFGS or inexact Newton–Krylov over the rows, optionally
                             polished by Newton steps (MINRES)
    H(X*, θ) W = ∇ℓ(X*)      one RMINRES over the rows (per-sample Lanczos scalars, recycle
                             spaces, freezing; residual or NSC rule per row)
    ∇θ ℓ = mean_i −J_i(x_i*, θ)ᵀ w_i

and returns the mean upper loss and hypergradient with one record per sample.  Each
sample's warm starts and recycle carry (``SampleState``) live in the engine, so any subset
can be evaluated at any step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

from backends.choice import Choice
from backends.counting import Counter
from backends.host import host_check_needs_sync, to_host
from framework.bilevel.adaptive import Plan, RecyclePolicy
from framework.bilevel.records import (
    PhaseTimes,
    SampleRecord,
    SampleState,
    ShadowRecord,
    StepResult,
    mean_gradient,
)
from framework.krylov.compaction import Restrictable, restrictable
from framework.krylov.minres import rminres
from framework.krylov.recycle import (
    ORACLES,
    RecycleCarry,
    RecycleConfig,
    Recycler,
    Selection,
    stack_carries,
)
from framework.krylov.stopping import ResidualRule, StopConfig, StopKind
from framework.optim import MinimizeStatus, lbfgs, newton_krylov
from framework.optim.newton import ETA_MAX
from framework.optim.rows import scatter_rows, take_rows
from problems.foe import FieldsOfExperts
from problems.preconditioners import fft_preconditioner

LowerSolver = Choice("LowerSolver", "lbfgs newton_krylov")
Preconditioner = Choice("Preconditioner", "none fft auto")


class NonFiniteError(FloatingPointError):
    """θ makes the lower-level problem non-finite (e.g. overflowing expert weights)."""


@dataclass(frozen=True)
class EngineConfig:
    """Tolerances of the two inner solves and the recycling/stopping choices.

    ``lower_newton_steps`` > 0 polishes the lower solution with up to that many Newton
    steps (tight MINRES solves, HVPs counted).  ``preconditioner="fft"`` preconditions the
    Hessian solve with ``problems.preconditioners.fft_preconditioner`` (FoE imaging; a
    recycle space is prepared with M), ``lower_preconditioner="fft"`` Newton–Krylov's inner
    solves (it stops on ‖∇f‖, so its solution is unchanged); ``"auto"``: fft where it
    applies (``with_preconditioners``).
    """

    recycle: RecycleConfig = field(default_factory=RecycleConfig)
    stop: StopConfig = field(default_factory=lambda: StopConfig(rtol=1e-3))
    krylov_maxiter: int | None = None
    lower_gtol: float = 1e-6
    lower_maxiter: int = 500
    lower_memory: int = 10
    lower_newton_steps: int = 0
    lower_solver: LowerSolver = LowerSolver.lbfgs
    preconditioner: Preconditioner = Preconditioner.none
    lower_preconditioner: Preconditioner = Preconditioner.none
    warm_start: bool = True
    shadow_baseline: bool = False  # also solve without recycling (none when nothing recycles)
    compact_rows: int = 16  # Krylov solves' rows worth dropping (framework.krylov.compaction)


def with_preconditioners(config: EngineConfig, problem: Any) -> EngineConfig:
    """``config`` with its ``auto`` preconditioners made concrete for samples like
    ``problem``: fft for FoE imaging samples — on the Hessian solve unless a
    hypergradient-error rule needs the unpreconditioned residual (hypergradient_change, or
    hypergradient with recycling), on the lower level with Newton–Krylov — and none
    elsewhere."""
    foe = isinstance(getattr(problem, "regularizer", None), FieldsOfExperts)
    kind = config.stop.kind
    nsc = kind == StopKind.hypergradient_change or (
        kind == StopKind.hypergradient and config.recycle.enabled)
    fits = {"preconditioner": foe and not nsc,
            "lower_preconditioner": foe and config.lower_solver == LowerSolver.newton_krylov}
    return replace(config, **{
        name: (Preconditioner.fft if fits[name] else Preconditioner.none)
        for name in fits if getattr(config, name) == Preconditioner.auto})


NEWTON_RTOL = 1e-12  # MINRES tolerance of a Newton step of the lower-level polish
WARM_ETA = 1e-2  # Newton–Krylov's first forcing term from a warm start (README)
WARM_STARTS = ("x", "w", "w_shadow")  # the arrays of a ``SampleState`` besides its carry
LOWER_COUNTS = ("iterations", "converged", "grad_evals", "hvp", "preconditioner")  # per row


def default_check_every(like: Any) -> int:
    """Iterations between the Krylov solver's host checks: 1 on the CPU, where a check is
    free; 8 on a GPU, where each synchronises (frozen rows' extra iterations are masked)."""
    return 8 if host_check_needs_sync(like) else 1


def _preconditioner(kind: Preconditioner, batch: Any, X: Any, theta: Any, lin: Any) -> Any:
    return None if kind == Preconditioner.none else fft_preconditioner(batch, X, theta,
                                                                       frozen=lin.frozen)


class RowTally:
    """Counts per row of a batch the operator applications of blocks (B, n[, b]): the
    non-zero columns of each row (zero columns are padding), on the device until ``read``."""

    def __init__(self, like: Any) -> None:
        self.xp, self.rows = array_namespace(like), int(like.shape[0])
        zero = self.xp.zeros(like.shape[:1], dtype=self.xp.int64, device=device_of(like))
        self.tallies = {"hvp": zero, "jac_t": zero, "preconditioner": zero}

    def counted(self, op: Callable[[Any], Any], kind: str,
                rows: list[int] | None = None) -> Callable[[Any], Any]:
        """``op`` counting its applications; ``rows``: the tally's rows that ``op``'s rows
        are (an operator restricted to fewer rows), all when None."""
        xp = self.xp

        def apply(V: Any) -> Any:
            live = xp.any((V if V.ndim == 3 else V[..., None]) != 0, axis=-2)  # (r, b)
            counts = xp.sum(xp.astype(live, xp.int64), axis=-1)
            if rows is not None and len(rows) != self.rows:
                counts = scatter_rows(counts[:, None], rows, self.rows)[:, 0]
            self.tallies[kind] = self.tallies[kind] + counts
            return op(V)

        return apply

    def read(self) -> dict[str, list[int]]:
        table = to_host(self.xp.stack(list(self.tallies.values())))
        return {kind: row.tolist() for kind, row in zip(self.tallies, table, strict=True)}


@dataclass(frozen=True)
class LowerSolve:
    """The lower-level solutions of a batch and their per-row figures."""

    X: Any
    iterations: tuple[int, ...]
    converged: tuple[bool, ...]
    grad_evals: tuple[int, ...]
    hvp: tuple[int, ...]
    host_syncs: int
    preconditioner: tuple[int, ...]  # applications of the inner solves' preconditioner


class BilevelEngine:
    """Hypergradients over a dataset of ``problems`` (single-sample problems of one
    batch-first type, with ``concat``) with per-sample state.  ``backend`` (from
    ``backends.get_backend``) moves the state to and from the host for checkpoints;
    ``check_every``: the Krylov solver's host checks (default ``default_check_every``).
    """

    def __init__(self, problems: Sequence[Any], config: EngineConfig | None = None, *,
                 backend: Any = None, check_every: int | None = None) -> None:
        if not problems:
            raise ValueError("problems must hold at least one sample")
        shapes = {tuple(p.theta_shape) for p in problems}
        if len(shapes) != 1:
            raise ValueError(f"all samples must share one theta shape, got {sorted(shapes)}")
        if len({type(p) for p in problems}) > 1 or not hasattr(problems[0], "concat"):
            raise ValueError("the engine needs samples of one batch-first problem type "
                             "(with concat)")
        self.problems, self.backend = list(problems), backend
        self.config = with_preconditioners(config or EngineConfig(), self.problems[0])
        self.theta_shape = shapes.pop()
        if check_every is None:
            check_every = default_check_every(self.problems[0].y)
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every must be a positive integer; got {check_every!r}")
        self.check_every = check_every
        self.recycler, self.policy = Recycler(self.config.recycle), None
        rc = self.config.recycle
        if rc.adaptive and rc.enabled:  # (without recycling there is nothing to adapt)
            if rc.strategy in ORACLES or rc.selection != Selection.inner:
                raise ValueError("adaptive recycling needs a recycle strategy with inner "
                                 "selection (the oracles and outer selection cannot use "
                                 "fewer vectors than they carry)")
            self.policy = RecyclePolicy(rc.dim)
        self._recyclers: dict[int, Recycler] = {}
        self.states = [SampleState() for _ in self.problems]
        self.counter = Counter()
        self._batch_cache: tuple[tuple[int, ...], Any] | None = None
        self._last_linearization: tuple[Any, Any, Any, Any] | None = None

    def _batch(self, indices: Sequence[int] | None) -> tuple[tuple[int, ...], Any]:
        """The samples ``indices`` (all when None) and them as one batch-first problem
        counting in ``self.counter``."""
        indices = tuple(range(len(self.problems))) if indices is None else tuple(indices)
        if not indices:
            raise ValueError("indices must name at least one sample")
        if self._batch_cache is None or self._batch_cache[0] != indices:
            chosen = [self.problems[i] for i in indices]
            self._batch_cache = (indices, type(chosen[0]).concat(chosen, counter=self.counter))
        return self._batch_cache

    def _warm_start(self, xp: Any, name: str, indices: tuple[int, ...], fill: Any) -> Any:
        """Stack the samples' state ``name``; None when warm starts are off or no sample
        has one yet, rows of ``fill`` for those that lack it."""
        rows = [getattr(self.states[i], name) for i in indices]
        if not self.config.warm_start or all(r is None for r in rows):
            return None
        return xp.stack([fill[j, ...] if r is None else r for j, r in enumerate(rows)])

    # -- the lower level ------------------------------------------------------------------
    def _lower_start(self, xp: Any, batch: Any, indices: tuple[int, ...]) -> tuple[Any, list]:
        """X₀ of the rows (warm starts where the samples have one) and which rows are warm."""
        guess = batch.Y if batch.Y.shape == batch.X_true.shape else xp.zeros_like(batch.X_true)
        X0 = self._warm_start(xp, "x", indices, guess)
        warm = [X0 is not None and self.states[i].x is not None for i in indices]
        return (guess if X0 is None else X0), warm

    def _solve_lower(self, batch: Any, theta: Any, X0: Any, warm: Sequence[bool]) -> LowerSolve:
        """The lower-level solve from X₀; Newton's first forcing term is ``WARM_ETA`` on the
        ``warm`` rows (their start is the last solution at a nearby θ)."""
        cfg, self._last_linearization = self.config, None  # none from another call
        newton = cfg.lower_solver == LowerSolver.newton_krylov
        options = dict(gtol=cfg.lower_gtol, maxiter=cfg.lower_maxiter,
                       rows_value_and_grad=partial(self._evaluate, batch, theta, newton))
        fun, grad = (lambda X: batch.lower_objective(X, theta),
                     lambda X: batch.lower_grad(X, theta))
        solve_syncs: list[int] = []
        preconditioner = [0] * batch.batch_size
        if newton:
            step = self._newton_step(batch, theta, solve_syncs, preconditioner)
            lower = newton_krylov(fun, grad, X0, step,
                                  eta_first=[WARM_ETA if w else ETA_MAX for w in warm], **options)
        else:
            lower = lbfgs(fun, grad, X0, memory=cfg.lower_memory, **options)
        bad = [j for j, status in enumerate(lower.status) if status is MinimizeStatus.NONFINITE]
        if bad:  # nothing after this could be finite
            raise NonFiniteError(f"the lower-level f or ∇f is not finite at this θ (batch "
                                 f"rows {bad} of {batch.batch_size})")
        solved = LowerSolve(lower.x, lower.iterations, lower.converged, lower.grad_evals,
                            lower.hvp, lower.host_reads + sum(solve_syncs),
                            tuple(preconditioner))
        return self._newton_polish(batch, theta, solved) if cfg.lower_newton_steps else solved

    def _linearize(self, problem: Any, X: Any, theta: Any) -> Any:
        """``problem.linearize(X, θ)``, the one of Newton's last evaluation when that was at
        these very arrays (then the Newton step, or the Hessian phase, reuses its work)."""
        last = self._last_linearization
        if last is not None and last[0] is problem and last[1] is X and last[2] is theta:
            return last[3]
        lin = problem.linearize(X, theta)
        self._last_linearization = (problem, X, theta, lin)
        return lin

    def _operators(self, batch: Any, X: Any, theta: Any, lin: Any, kind: Preconditioner,
                   tally: RowTally | None, rows: list[int] | None = None,
                   M: Any = None) -> tuple[Any, Any]:
        """A Krylov solve's operators over the rows of ``batch`` at X: the Hessian (``lin``)
        and the preconditioner ``kind`` (``M`` if built already; None for none), its
        applications counted in ``tally`` at its rows ``rows`` (all when None); both
        restrictable to fewer rows unless ``compact_rows`` is 0: the Hessian re-linearised
        there, M restricted (or rebuilt)."""
        M = _preconditioner(kind, batch, X, theta, lin) if M is None else M
        counted = M if M is None or tally is None else tally.counted(M, "preconditioner", rows)
        if not self.config.compact_rows:
            return lin, counted
        rows = list(range(batch.batch_size)) if rows is None else rows
        made: dict[tuple[int, ...], tuple[Any, Any]] = {}

        def restricted(keep: list[int]) -> tuple[Any, Any]:
            if tuple(keep) not in made:
                made.clear()  # A and M are restricted to the same rows, one after the other
                sub = batch.subset(keep)
                (Xs,) = take_rows(keep, X)
                part = M.restrict(keep) if M is not None and restrictable(M) else None
                made[tuple(keep)] = self._operators(
                    sub, Xs, theta, sub.linearize(Xs, theta), kind, tally,
                    [rows[r] for r in keep], M=part)
            return made[tuple(keep)]

        return (Restrictable(lin, lambda keep: restricted(keep)[0]),
                None if M is None else Restrictable(counted, lambda keep: restricted(keep)[1]))

    def _evaluate(self, batch: Any, theta: Any, newton: bool, X: Any, rows: Any) -> Any:
        """f and ∇f of the rows ``rows``; for Newton from their linearization where the
        problem shares the work (the accepted point's Newton step then reuses it)."""
        sub = batch.subset(rows)
        lin = self._linearize(sub, X, theta) if newton else None
        return (sub.lower_value_and_grad(X, theta) if lin is None or lin.value_and_grad is None
                else lin.value_and_grad())

    def _newton_step(self, batch: Any, theta: Any, syncs: list[int],
                     preconditioner: list[int]) -> Callable[..., Any]:
        """The inner solve of ``newton_krylov``: MINRES on the Hessians of the rows still
        iterating, H_i p_i = −∇f_i to relative residual η_i; host reads go to ``syncs``,
        each row's applications of the preconditioner are added to ``preconditioner``."""

        def solve(X: Any, G: Any, eta: Any, rows: Any) -> tuple[Any, Any]:
            keep = rows.nonzero()[0].tolist()
            X, G = take_rows(keep, X, G)
            sub = batch.subset(keep)
            lin = self._linearize(sub, X, theta)
            tally = RowTally(G)
            A, M = self._operators(sub, X, theta, lin, self.config.lower_preconditioner, tally)
            res = rminres(A, -G, M=M,
                          stop=ResidualRule(tuple(float(e) for e in eta[keep])),
                          maxiter=self.config.krylov_maxiter, check_every=self.check_every,
                          true_residual=False, compact_rows=self.config.compact_rows)
            syncs.append(res.host_syncs)
            hvp = [0] * batch.batch_size
            applied = tally.read()["preconditioner"] if M is not None else [0] * len(keep)
            for r, j in enumerate(keep):
                hvp[j] = res.matvecs[r]
                preconditioner[j] += applied[r]
            return scatter_rows(res.x, keep, batch.batch_size), hvp

        return solve

    def _newton_polish(self, batch: Any, theta: Any, solved: LowerSolve) -> LowerSolve:
        """``solved`` after Newton steps x_i ← x_i − H_i⁻¹∇f_i on the rows with ‖∇f_i‖ >
        lower_gtol (one MINRES over those rows to ``NEWTON_RTOL`` per step), until every
        row meets gtol or ``lower_newton_steps`` steps are spent; its counts added."""
        xp, cfg, B = array_namespace(solved.X), self.config, batch.batch_size
        X, active, syncs = solved.X, list(range(B)), solved.host_syncs
        grad_evals, hvp, converged = list(solved.grad_evals), list(solved.hvp), [False] * B
        for step in range(cfg.lower_newton_steps + 1):
            (Xa,) = take_rows(active, X)
            G = batch.subset(active).lower_grad(Xa, theta)
            norms = to_host(xp.linalg.vector_norm(G, axis=1))
            syncs += 1
            for r, j in enumerate(active):
                grad_evals[j] += 1
                converged[j] = bool(norms[r] <= cfg.lower_gtol)
            still = [r for r, j in enumerate(active) if not converged[j]]
            if step == cfg.lower_newton_steps or not still:
                break
            active = [active[r] for r in still]
            Xs, Gs = take_rows(still, Xa, G)
            sub = batch.subset(active)
            A, _ = self._operators(sub, Xs, theta, sub.linearize(Xs, theta),
                                   Preconditioner.none, None)
            res = rminres(A, Gs, rtol=NEWTON_RTOL, true_residual=False,
                          compact_rows=cfg.compact_rows)
            syncs += res.host_syncs
            for r, j in enumerate(active):
                hvp[j] += res.matvecs[r]
            X = X - scatter_rows(res.x, active, B)
        return LowerSolve(X, solved.iterations, tuple(converged), tuple(grad_evals), tuple(hvp),
                          syncs, solved.preconditioner)

    def lower_solutions(self, theta: Any, indices: Sequence[int] | None = None, *,
                        x0: Any = None) -> Any:
        """x*(θ) of samples ``indices`` as rows (B, n), warm-started from ``x0`` (B, n) or
        the samples' states; the states are read, never changed."""
        indices, batch = self._batch(indices)
        X0, warm = (self._lower_start(array_namespace(theta), batch, indices) if x0 is None
                    else (x0, [True] * len(indices)))
        X, self._last_linearization = self._solve_lower(batch, theta, X0, warm).X, None
        return X

    def loss(self, theta: Any, indices: Sequence[int] | None = None) -> float:
        """The mean upper loss of samples ``indices`` at θ (lower solves warm-started from
        the states, which are not changed): for line searches of the outer optimiser."""
        indices, batch = self._batch(indices)
        losses = batch.upper_loss(self.lower_solutions(theta, indices))
        return float(array_namespace(losses).mean(losses))

    # -- one step ---------------------------------------------------------------------------
    def evaluate(self, theta: Any, indices: Sequence[int] | None = None) -> StepResult:
        """Solve samples ``indices`` (all when None) at θ as one batch; update their states."""
        indices, batch = self._batch(indices)
        cfg, xp, B = self.config, array_namespace(theta), len(indices)
        t0 = time.perf_counter()
        start = self.counter.snapshot()
        lower = self._solve_lower(batch, theta, *self._lower_start(xp, batch, indices))
        X = lower.X
        t1 = time.perf_counter()
        after_lower = self.counter.snapshot()
        lin = self._linearize(batch, X, theta)
        self._last_linearization = None
        G = batch.upper_grad(X)
        tally = RowTally(G)
        W0 = self._warm_start(xp, "w", indices, xp.zeros_like(G))
        H, J = tally.counted(lin.hvp, "hvp"), tally.counted(lin.jac_t, "jac_t")
        carry_in = stack_carries([self.states[i].carry for i in indices], G[0, ...])
        t_set = time.perf_counter()
        plan = None if self.policy is None else self.policy.plan()
        if plan is not None and carry_in is not None:  # the first k' ≤ k carried vectors
            carry_in = RecycleCarry(carry_in.basis[..., : plan.dim], selected=True)
        A, M = self._operators(batch, X, theta, lin, cfg.preconditioner, tally)
        space = self._recycler(plan, "dim").prepare(carry_in, H, J, like=G, M=M)
        stop = cfg.stop  # NSC without a recycle space: the residual rule
        nsc = stop.kind == StopKind.hypergradient_change or (
            stop.kind == StopKind.hypergradient and space is not None)
        rule = stop.rule(space, J, G) if nsc else None
        solve = partial(rminres, A, G, rtol=stop.rtol, atol=stop.atol,
                        maxiter=cfg.krylov_maxiter, check_every=self.check_every,
                        true_residual=False, M=M, compact_rows=cfg.compact_rows)
        t2 = time.perf_counter()
        res = solve(x0=W0, recycle=space, harvest=self._recycler(plan, "harvest").harvester(J),
                    stop=rule)
        t3 = time.perf_counter()
        grads = -J(res.x)
        t4 = time.perf_counter()
        after_hessian = self.counter.snapshot()
        applied = tally.read()
        syncs = lower.host_syncs + res.host_syncs + 1

        base = None  # without recycling or an NSC rule the shadow would be this very solve
        if cfg.shadow_baseline and (cfg.recycle.enabled or rule is not None):
            base = solve(x0=self._warm_start(xp, "w_shadow", indices, xp.zeros_like(G)))
            syncs += base.host_syncs
        t5 = time.perf_counter()
        if self.policy is not None:  # Hessian-phase seconds per system, set-up included
            self.policy.record(
                0 if space is None else max(space.dims), (t3 - t_set) / B,
                sum(res.iterations) / B,
                plain_seconds=None if base is None else (t5 - t4) / B,
                plain_iterations=None if base is None else sum(base.iterations) / B)

        losses = to_host(batch.upper_loss(X))
        dims = (0,) * B if space is None else space.dims
        estimates = [math.nan] * B
        if rule is not None:
            table, active = to_host(xp.stack(rule.estimates, axis=1)), to_host(rule.active)
            estimates = [float(table[j, res.iterations[j]]) if active[j] else math.nan
                         for j in range(B)]
        records = []
        for j, i in enumerate(indices):
            records.append(SampleRecord(
                upper_loss=float(losses[j]),
                **{f"lower_{name}": getattr(lower, name)[j] for name in LOWER_COUNTS},
                krylov_iterations=res.iterations[j],
                krylov_converged=res.converged[j],
                krylov_status=res.status[j].value,
                recycle_dim=dims[j],
                hvp=res.matvecs[j] + applied["hvp"][j],
                jac_t=applied["jac_t"][j],
                preconditioner=applied["preconditioner"][j],
                hg_error_estimate=estimates[j],
                shadow=None if base is None else ShadowRecord(base.iterations[j], base.matvecs[j]),
            ))
            self.states[i] = SampleState(
                x=X[j, ...], w=res.x[j, ...], w_shadow=None if base is None else base.x[j, ...],
                carry=self._carry_after(res, space, j, self.states[i].carry))
        return StepResult(
            float(sum(losses)) / B, mean_gradient(grads, self.theta_shape), indices,
            tuple(records),
            counts=after_hessian - after_lower, lower_counts=after_lower - start,
            times=PhaseTimes(t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), host_syncs=syncs,
            sample_grads=grads)

    def _recycler(self, plan: Plan | None, use: str) -> Recycler:
        """The configured recycler, or (adaptive) one with the plan's ``dim``/``harvest``
        vectors (dimension 0: no recycling)."""
        if plan is None:
            return self.recycler
        dim = getattr(plan, use)
        if dim not in self._recyclers:
            self._recyclers[dim] = Recycler(
                replace(self.config.recycle, dim=dim, adaptive=False) if dim else RecycleConfig())
        return self._recyclers[dim]

    def _carry_after(self, res: Any, space: Any, j: int, old: RecycleCarry | None
                     ) -> RecycleCarry | None:
        """Sample j's carry after the solve: its harvest, else its unchanged space (not for
        the oracles, which select afresh), else (adaptive recycling) its ``old`` carry."""
        if res.harvest is not None:
            carry = res.harvest.sample(j)
        elif space is not None and self.config.recycle.strategy not in ORACLES:
            carry = RecycleCarry(space.basis, selected=True).sample(j)
        else:
            return old if self.policy is not None else None
        return carry if carry.basis.shape[-1] > 0 else None

    # -- checkpoints ----------------------------------------------------------------------
    def _checkpoint_backend(self, use: str) -> Any:
        if self.backend is None:
            raise ValueError(f"{use} needs the engine's backend (pass backend=...)")
        return self.backend

    def state_dict(self) -> dict[str, Any]:
        """Per-sample warm starts and recycle carries as host NumPy arrays."""
        to_np = self._checkpoint_backend("state_dict").to_numpy
        samples = []
        for s in self.states:
            entry = {name: to_np(a) for name in WARM_STARTS if (a := getattr(s, name)) is not None}
            if s.carry is not None:
                entry.update(carry_basis=to_np(s.carry.basis), carry_selected=s.carry.selected)
            samples.append(entry)
        return {"samples": samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        put = self._checkpoint_backend("load_state_dict").asarray
        samples = state["samples"]
        if len(samples) != len(self.problems):
            raise ValueError(f"checkpoint holds {len(samples)} samples, the engine has "
                             f"{len(self.problems)}")
        self.states = [SampleState(
            **{name: put(entry[name]) for name in WARM_STARTS if name in entry},
            carry=RecycleCarry(put(entry["carry_basis"]), bool(entry["carry_selected"]))
            if "carry_basis" in entry else None) for entry in samples]
