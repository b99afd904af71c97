"""MINRES with an optional recycle space (RMINRES), batch-first, against the array API.

B symmetric systems A_i x_i = b_i are solved together as rows of (B, n) arrays (one *pass*
of the operator maps (B, n) → (B, n)); a 1-D ``b`` is a batch of one.  Given per-sample
recycle spaces (U_i, C_i = A_i U_i, C_iᵀC_i = I on the non-zero columns; zero columns are
padding) the start is projected (x₀ ← x₀ + U Cᵀr₀, r₀ ← (I − CCᵀ) r₀), Lanczos runs on
(I − CCᵀ)A: (I − CCᵀ)AV_m = V_{m+1}T̄_m with B_m = CᵀAV_m, and the minimal-residual
iterate x_m = x₀ + V_m y − U B_m y, y = argmin ‖β₁e₁ − T̄_m y‖, follows by short
recurrences (``framework.krylov.givens``): no basis is stored.  With a preconditioner
M = LLᵀ ≈ A⁻¹ the method runs on LᵀAL in the M-norm, the space carrying MC (one M per
iteration; README, "Preconditioned recycling").  A sample that meets its stopping rule
freezes at exactly the iteration where it would stop alone.
"""

from __future__ import annotations

import enum
import numbers
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

from backends.host import host_check_needs_sync, host_list, to_host
from framework.krylov.compaction import Retired, host_entries, restrictable, take
from framework.krylov.givens import DeviceScalars, HostScalars
from framework.krylov.operators import RowOperator, batch_operator, check_symmetric, shifted
from framework.krylov.recycle_space import RecycleSpace, bmtv, bmv
from framework.krylov.stopping import (
    IterationState,
    ResidualRule,
    SingleSampleRule,
    check_tolerances,
)


class Status(enum.Enum):
    """Why a solve ended: its value names it, ``message`` says it in words."""

    CONVERGED = "converged", "the stopping rule was satisfied"
    EXACT = "exact", "Lanczos found an invariant subspace: the iterate solves the system"
    MAXITER = "maxiter", "reached maxiter before the stopping rule was satisfied"
    BREAKDOWN = "breakdown", ("A is singular (to rounding) on the Krylov space and b is "
                              "not in its range: no x meets the tolerance; x is the last "
                              "iterate, a least-squares solution (by the recurrence, "
                              "‖A r‖ ≤ (10ε)^½·‖A‖·‖r‖)")
    NONFINITE = "nonfinite", ("a non-finite value appeared (the operator returned NaN or "
                              "inf, or the preconditioner is not positive definite)")
    DRIFTED = "drifted", ("the residual estimate met the tolerance but the true residual "
                          "‖b − Ax‖ does not (the recurrence drifted by rounding on an "
                          "ill-conditioned system); restart with x0=result.x or loosen "
                          "the tolerance")

    def __new__(cls, value: str, message: str) -> Status:
        member = object.__new__(cls)
        member._value_, member.message = value, message
        return member


# status codes of framework.krylov.givens, in order
_CODES = (Status.MAXITER, Status.CONVERGED, Status.EXACT, Status.MAXITER, Status.BREAKDOWN,
          Status.NONFINITE)


@dataclass(frozen=True)
class KrylovResult:
    """Outcome of a solve: per-sample tuples for a batch, plain values for a 1-D ``b``.
    ``matvecs``: each sample's operator applications (one per iteration, one more for the
    initial residual when ``x0`` is given), ``check_matvecs`` the final true-residual
    check's; ``residual_norm``: the true ‖b − Ax‖ at exit when that check ran (else the
    estimate); ``residual_history``: the estimates from iteration 0 on; ``passes``: the
    batched operator calls (frozen samples and the symmetry check included, the true-residual
    check not), ``preconditioner_passes`` those of M; ``host_syncs``: host reads of scalars.
    """

    x: Any
    converged: Any
    status: Any
    iterations: Any
    matvecs: Any
    check_matvecs: Any
    residual_norm: Any
    residual_history: Any
    passes: int
    host_syncs: int
    harvest: Any = None
    preconditioner_passes: int = 0

    @property
    def message(self) -> Any:
        if isinstance(self.status, Status):
            return self.status.message
        return tuple(s.message for s in self.status)

    def sample(self, i: int) -> KrylovResult:
        """Sample i's result, unwrapped (its x a 1-D row)."""
        harvest = self.harvest.sample(i) if hasattr(self.harvest, "sample") else self.harvest
        return replace(self, x=self.x[i, ...], harvest=harvest,
                       **{name: getattr(self, name)[i] for name in _PER_SAMPLE})


_PER_SAMPLE = ("converged", "status", "iterations", "matvecs", "check_matvecs",
               "residual_norm", "residual_history")


def _check_rows(xp: Any, name: str, v: Any, shape: tuple[int, ...], dtype: Any = None) -> None:
    if not xp.isdtype(v.dtype, "real floating"):
        raise ValueError(f"{name} must be a real floating-point array, got dtype {v.dtype}; "
                         "convert it (e.g. to float64)")
    if dtype is not None and v.dtype != dtype:
        raise ValueError(f"{name} has dtype {v.dtype} but b has {dtype}; pass both in one dtype")
    if tuple(v.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(v.shape)}")
    if not bool(xp.all(xp.isfinite(v))):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")


def _check_count(name: str, value: Any, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    return int(value)


def _check_inputs(xp: Any, A: Any, b: Any, x0: Any, recycle: RecycleSpace | None, M: Any,
                  stop: Any, rtol: float, atol: float) -> None:
    """b (n,) or (B, n), the shapes of a matrix A, x0 and the recycle space, M against the
    rule and the space, the tolerances (0 < rtol < eps with atol = 0 is unreachable)."""
    if b.ndim not in (1, 2):
        raise ValueError(f"b must have shape (n,) or (B, n), got {tuple(b.shape)}")
    n, rows = int(b.shape[-1]), tuple(b.shape)
    shape = getattr(A, "shape", None)
    if shape is not None and (tuple(shape)[-2:] != (n, n) or len(shape) > b.ndim + 1):
        raise ValueError(f"operator shape {tuple(shape)} does not match b of shape {rows}: "
                         f"b must have {shape[-1]} entries per row")
    _check_rows(xp, "b", b, rows)
    if x0 is not None:
        _check_rows(xp, "x0", x0, rows, b.dtype)
    if recycle is not None and (recycle.U.shape != recycle.C.shape or recycle.U.ndim != b.ndim + 1
                                or tuple(recycle.U.shape[:-1]) != rows):
        raise ValueError(f"recycle space U {tuple(recycle.U.shape)} and C "
                         f"{tuple(recycle.C.shape)} must both be ({', '.join(map(str, rows))}, k)")
    if M is not None and getattr(stop, "needs_residual", False):
        raise ValueError("a preconditioner M cannot be combined with a stopping rule that "
                         "needs the residual (NSC) yet; drop M or use the residual rule")
    if recycle is not None and recycle.preconditioned != (M is not None):
        raise ValueError("the recycle space was built " + (
            "for a preconditioner but no M is given; pass M= or build it without M"
            if M is None else "without the preconditioner; build it with "
            "RecycleSpace.from_basis(A, Y, M=M)"))
    check_tolerances(rtol, atol)
    eps = float(xp.finfo(b.dtype).eps)
    if stop is None and atol == 0 and 0 < rtol < eps:
        raise ValueError(f"rtol={rtol!r} is below the machine epsilon {eps:.2g} of the data's "
                         "dtype and cannot be reached; use a larger rtol, an atol, or rtol=0 "
                         "to run to maxiter")


def rminres(
    A: Callable[[Any], Any],
    b: Any,
    *,
    x0: Any = None,
    recycle: RecycleSpace | None = None,
    rtol: float = 1e-5,
    atol: float = 0.0,
    maxiter: int | None = None,
    stop: Any = None,
    callback: Callable[[Any], None] | None = None,
    harvest: Any = None,
    true_residual: bool = True,
    check_every: int = 1,
    scalars: str | None = None,
    M: Any = None,
    shift: float = 0.0,
    check: bool = False,
    compact_rows: int = 1,
) -> KrylovResult:
    """Solve A x = b for symmetric A by (recycled) MINRES, for one or B systems.

    A : callable, (B, n) → (B, n) for a 2-D ``b`` (and (B, n, k) → (B, n, k) for
        recycle-space set-up), (n,) → (n,) for a 1-D ``b``; or a dense array ((n, n), or
        (B, n, n) per sample), sparse matrix or ``LinearOperator``, applied by ``@``.
    b : array (B, n) or (n,);  x0 : same shape, optional (zero saves one pass).
    recycle : RecycleSpace with U, C of shape (B, n, k) (or (n, k)), C = AU.
    rtol, atol : the default rule ‖r_i‖ ≤ max(rtol·‖b_i‖, atol), ignored with ``stop``.
    maxiter : iteration limit (default 5n).
    stop : a rule replacing rtol/atol (``framework.krylov.stopping``).
    callback : ``callback(xk)`` after every iteration (forms the iterate).
    harvest : a harvester (``LanczosRecorder``, ``RecycleHarvester``): ``result.harvest``.
    true_residual : compute ‖b − Ax‖ at exit (one pass, ``check_matvecs``).
    check_every : iterations between host checks when the scalars live on a GPU.
    scalars : "host" or "device" (default: device when a host read synchronises).
    M : symmetric positive definite preconditioner M ≈ A⁻¹ (an operator like A), as
        SciPy's; residual estimates and the default rule are then in the M-norm
        ‖r‖_M = (rᵀMr)^½; a recycle space must be M-orthonormal (``from_basis(M=M)``).
    shift : solve (A − shift·I) x = b.
    check : test A (and M) for symmetry first, as SciPy's ``check=True`` (two passes).
    compact_rows : once at most half of the rows still iterate and at least this many
        have finished, go on with the unfinished rows alone (``framework.krylov.compaction``:
        the same iterates and counts, fewer row applications); 0 never.  Only where A (and
        M) are restrictable, with the default rule and without a harvester (matrices are
        restrictable, a shift keeps it).
    """
    xp = array_namespace(b)
    _check_inputs(xp, A, b, x0, recycle, M, stop, rtol, atol)
    maxiter = _check_count("maxiter", 5 * int(b.shape[-1]) if maxiter is None else maxiter)
    check_every = _check_count("check_every", check_every)
    compact_rows = _check_count("compact_rows", compact_rows, 0)
    if scalars is None:
        scalars = "device" if host_check_needs_sync(b) else "host"
    if scalars not in ("host", "device"):
        raise ValueError(f"scalars must be 'host' or 'device', got {scalars!r}")
    single = b.ndim == 1
    rule = stop if stop is not None else ResidualRule(rtol, atol)
    if single:  # one system: a batch of one with the user's 1-D operators and rule
        if not (isinstance(rule, ResidualRule) or getattr(rule, "batch", False)):
            rule = SingleSampleRule(rule)
        A, b = RowOperator(A), b[None, :]
        x0 = None if x0 is None else x0[None, :]
        recycle = None if recycle is None else recycle.promoted()
        M = None if M is None else RowOperator(M)
        callback = None if callback is None else (lambda X, f=callback: f(X[0, :]))
    A = batch_operator(A)
    if shift:
        A = shifted(A, shift)
    M = None if M is None else batch_operator(M)
    if recycle is not None:
        recycle.validate(A if check else None)
    if check:
        check_symmetric(A, b, "A")
        if M is not None:
            check_symmetric(M, b, "the preconditioner M")
    result = _Solve(A, b, recycle, rule, harvest, callback, scalars, M, check).run(
        x0, maxiter, check_every, true_residual, compact_rows)
    return result.sample(0) if single else result


class _Solve:
    """State of one batched solve; ``run`` is the algorithm."""

    def __init__(self, A: Any, b: Any, recycle: Any, rule: Any, harvest: Any,
                 callback: Any, scalars: str, M: Any, checked: bool) -> None:
        self.xp = array_namespace(b)
        self.A, self.b, self.rule, self.harvest, self.callback = A, b, rule, harvest, callback
        self.M, self.space = M, recycle
        self.full = (A, b, M)  # the operator, b and M of every row (rows may be dropped)
        self.retired: Retired | None = None
        self.U, self.C = (None, None) if recycle is None else (recycle.U, recycle.C)
        # the projector is I − C(MC)ᵀ; MC is C itself without a preconditioner
        self.MC = self.C if recycle is None or recycle.MC is None else recycle.MC
        self.scalar_kind = scalars
        self.tol = 10.0 * float(self.xp.finfo(b.dtype).eps)  # breakdown/exactness scale
        self.keep_residual = bool(getattr(rule, "needs_residual", False))
        self.show_iterate = bool(getattr(rule, "needs_iterate", False))
        self.passes = 2 if checked else 0  # the symmetry check's passes
        self.preconditioner_passes = 2 if checked and M is not None else 0

    def _norms(self, R: Any, Z: Any = None) -> Any:
        """Row norms (rᵀr)^½, or the M-norms (rᵀMr)^½ given Z = MR."""
        return self.xp.sqrt(self.xp.vecdot(R, R if Z is None else Z))

    def _precondition(self, R: Any) -> Any:
        if self.M is None:
            return R
        self.preconditioner_passes += 1
        return self.M(R)

    def run(self, x0: Any, maxiter: int, check_every: int, true_residual: bool,
            compact_rows: int = 1) -> KrylovResult:
        xp = self.xp
        r = self._start(x0)
        z = self._precondition(r)
        beta1 = self._norms(r, z)
        self.b_norm = self._norms(self.b, None if self.M is None else self._precondition(self.b))
        host = self.scalar_kind == "host"
        self.thresholds = limits = None
        if isinstance(self.rule, ResidualRule):  # the default rule is tested in the scalars
            self.thresholds = limits = self.rule.thresholds(host_list(self.b_norm))
            if not host:
                limits = xp.asarray(limits, dtype=self.b.dtype, device=device_of(self.b))
        met = self._met(0, beta1, r) if limits is None else None
        self.scalars = (HostScalars if host else DeviceScalars)(self.b, beta1, met, limits)
        self.history = [self.scalars.rnorms]
        self.residual = r if self.keep_residual else None
        safe = xp.where(beta1 > 0, beta1, xp.ones_like(beta1))[:, None]
        self.u = r / safe  # residual space; with M the Lanczos vectors are v = M u
        v = self.u if self.M is None else z / safe
        if self.harvest is not None:
            self.harvest.begin(self.space, v, None if self.M is None else self.u, beta1)
        r = z = None  # the loop keeps u (and the residual when the rule needs it) only
        self.u_prev = self.beta = None
        self.d, self.e = [None, None], [None, None]  # the last two directions (x, U parts)
        compact = (compact_rows > 0 and self.b.shape[0] > 1 and limits is not None
                   and self.harvest is None and restrictable(self.A)
                   and (self.M is None or restrictable(self.M)))
        syncs, step = 1, 0
        running = self.scalars.running()
        while running and step < maxiter:
            step += 1
            v = self._iteration(step, v)
            syncs += self.scalars.syncs_per_iteration
            if host or step % check_every == 0:
                syncs += not host
                if not compact:
                    running = self.scalars.running()
                    continue
                live = self.scalars.live_rows()  # the same one read as ``running``
                running = any(live)
                finished = len(live) - sum(live)
                if running and finished >= max(compact_rows, sum(live)):
                    v = self._compact([r for r, flag in enumerate(live) if flag], v)
        return self._finish(true_residual, syncs)

    def _compact(self, keep: list[int], v: Any) -> Any:
        """Go on with rows ``keep`` alone (the others retired with their iterates, statuses
        and histories); returns their rows of the next Lanczos vector ``v``."""
        if self.retired is None:
            self.retired = Retired(self.b.shape[0])
        self.retired.retire(keep, self._iterate(), *self.scalars.summary(), self.history)
        self.history = []
        self.A = self.A.restrict(keep)
        self.M = None if self.M is None else self.M.restrict(keep)
        for name in ("b", "b_norm", "x", "u", "u_prev", "beta", "z", "U", "C", "MC",
                     "residual"):
            setattr(self, name, take(keep, getattr(self, name)))
        self.d = [take(keep, a) for a in self.d]
        self.e = [take(keep, a) for a in self.e]
        self.scalars.restrict(keep)
        return take(keep, v)

    def _start(self, x0: Any) -> Any:
        """x₀ and the projected initial residual r₀ = (I − CCᵀ)(b − Ax₀)."""
        xp = self.xp
        self.initial = 0 if x0 is None else 1
        if x0 is None:
            self.x = xp.zeros_like(self.b)
            r = xp.asarray(self.b, copy=True)
        else:  # a zero right-hand side has the solution 0, whatever x0
            self.x = xp.where(self._norms(self.b)[:, None] > 0, x0, 0.0)
            r = self.b - self.A(self.x)
            self.passes += 1
        self.z = None  # coefficients of −U in the iterate: x = x_V − U z
        if self.C is not None:
            coef = bmtv(self.MC, r)
            self.x = self.x + bmv(self.U, coef)
            r = r - bmv(self.C, coef)
            self.z = xp.zeros_like(coef)
        return r

    def _iteration(self, step: int, v: Any) -> Any:
        """One Lanczos step, one rotation, one update of the iterate; returns v_{k+1}."""
        xp = self.xp
        p = self.A(v)
        self.passes += 1
        bcol = None
        if self.C is not None:  # (I − C(MC)ᵀ)Av, with b_k = (MC)ᵀAv_k for the U-part
            bcol = bmtv(self.MC, p)
            p = p - bmv(self.C, bcol)
            if self.u_prev is not None:
                p -= self.beta * self.u_prev
        elif self.u_prev is not None:  # a new array: A may return a buffer it owns
            p = p - self.beta * self.u_prev
        else:
            p = xp.asarray(p, copy=True)
        alpha = xp.vecdot(v, p)
        p -= self.scalars.alpha(alpha) * self.u
        if self.C is not None:  # second projection keeps V ⟂ C to working precision
            p -= bmv(self.C, bmtv(self.MC, p))
        q = self._precondition(p)
        col = self.scalars.rotate(xp.vecdot(p, q), self.tol)  # (and the default rule)
        self.x += col.phi * _direction(self.d, v, col)
        if bcol is not None:
            self.z += col.phi * _direction(self.e, bcol, col)
        p /= col.beta_div  # p is this solve's own array: it becomes u_{k+1}
        if self.M is not None:
            q = q / col.beta_div
        if self.scalars.nonfinite:
            finite = self.scalars.finite_rows()[:, None]
            p, q = xp.where(finite, p, 0.0), xp.where(finite, q, 0.0)
        if self.M is None:
            q = p
        if self.harvest is not None:
            beta_kept, updated = self.scalars.harvest_inputs()
            self.harvest.step(alpha, beta_kept, bcol, q, None if self.M is None else p,
                              updated)
        if self.keep_residual:
            self.residual = col.res_keep * self.residual + col.res_add * p
        self.history.append(self.scalars.rnorms)
        if self.callback is not None:
            x = self._iterate()
            self.callback(x if self.retired is None else self.retired.rows(x))
        if self.thresholds is None:
            self.scalars.conclude(self._met(step, self.scalars.rnorms, self.residual))
        self.u_prev, self.u, self.beta = self.u, p, col.beta_div
        return q

    def _met(self, iteration: int, rnorms: Any, residual: Any) -> Any:
        """The stopping rule per sample: host bools, or a device mask."""
        if isinstance(rnorms, list):
            rnorms = self.xp.asarray(rnorms, dtype=self.b.dtype, device=device_of(self.b))
        met = self.rule(IterationState(iteration, rnorms, self.b_norm, residual,
                                       self._iterate() if self.show_iterate else None))
        return met if self.scalar_kind == "device" else [bool(m) for m in to_host(met)]

    def _iterate(self) -> Any:
        return self.x if self.z is None else self.x - bmv(self.U, self.z)

    def _finish(self, true_residual: bool, syncs: int) -> KrylovResult:
        # the harvest first, the directions dropped: its memory and the final steps' don't add
        harvest = self.harvest.finish() if self.harvest is not None else None
        self.d = self.e = self.u = self.u_prev = None
        codes, iterations = self.scalars.summary()
        x, history = self._iterate(), self.history
        if self.retired is not None:
            x, codes, iterations, series = self.retired.assemble(x, codes, iterations,
                                                                 history, host_entries)
            per_sample = tuple(tuple(series[i][: iterations[i] + 1])
                               for i in range(len(codes)))
        else:
            if self.scalar_kind == "device":
                history = [host_list(h) for h in history]
            per_sample = tuple(tuple(float(h[i]) for h in history[: iterations[i] + 1])
                               for i in range(len(codes)))
        statuses = [_CODES[int(c)] for c in codes]
        norms = [h[-1] for h in per_sample]
        checks = [0] * len(codes)
        if true_residual:
            A, b, M = self.full
            r = b - A(x)
            true = host_list(self._norms(r))
            ruled = true if M is None else host_list(self._norms(r, M(r)))
            for i, s in enumerate(statuses):
                if s is not Status.NONFINITE:
                    norms[i], checks[i] = float(true[i]), 1
                # EXACT with a zero tolerance (run to maxiter) means solved to rounding
                if (self.thresholds is not None and ruled[i] > self.thresholds[i]
                        and (s is Status.CONVERGED or (s is Status.EXACT
                                                       and self.thresholds[i] > 0))):
                    statuses[i] = Status.DRIFTED
        return KrylovResult(
            x=x,
            converged=tuple(s in (Status.CONVERGED, Status.EXACT) for s in statuses),
            status=tuple(statuses),
            iterations=tuple(iterations),
            matvecs=tuple(i + self.initial for i in iterations),
            check_matvecs=tuple(checks),
            residual_norm=tuple(norms),
            residual_history=per_sample,
            passes=self.passes,
            preconditioner_passes=self.preconditioner_passes,
            host_syncs=syncs + 1,
            harvest=harvest,
        )


def _direction(prev: list[Any], v: Any, col: Any) -> Any:
    """d_k = (v_k − δ d_{k−1} − ε d_{k−2}) / γ per row (absent terms skipped); ``prev``
    holds [d_{k−1}, d_{k−2}] and is shifted, d_k reusing d_{k−2}'s storage.  The same
    recurrence carries the recycle-space coefficients (v_k → b_k = CᵀAv_k)."""
    d1, d2 = prev
    if d2 is not None:
        d = d2
        d *= -col.epsilon
        d -= col.delta * d1
        d += v
        d /= col.gamma
    elif d1 is not None:
        d = v - col.delta * d1
        d /= col.gamma
    else:
        d = v / col.gamma
    prev[1], prev[0] = d1, d
    return d
