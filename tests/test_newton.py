"""Inexact Newton–Krylov (``newton_krylov``): closed-form and dense references, a
non-convex problem whose Newton direction points uphill, FoE to ‖∇f‖ ≤ 1e-10 with f
never increasing, B samples together = each alone, and the engine's hypergradients with
the Newton lower level against L-BFGS's and finite differences."""

from __future__ import annotations

import array_api_compat
import numpy as np
import pytest
from test_engine import THETA, assert_together_equals_alone, mnist_problems
from test_hypergradient import TIGHT, hypergradient, small_foe_problem, upper_loss_at

from backends import get_backend
from framework.bilevel.engine import BilevelEngine, EngineConfig
from framework.krylov import rminres
from framework.krylov.stopping import ResidualRule, StopConfig
from framework.optim import MinimizeStatus, newton_krylov
from problems import QuadraticProblem, dct_filters
from problems.foe import initial_theta


class RowLorentzian:
    """f_i(x) = ½ Σ_j c_i (x_j − a_ij)² + s Σ_j log(1 + (x_{j+1} − x_j)²), row-wise: a
    Lorentzian expert on first differences (non-convex: indefinite Hessians where the
    differences exceed 1); every operation acts on rows independently."""

    def __init__(self, backend, c, *, n=20, s=1.0, seed=0) -> None:
        self.xp, self.s, self.be = backend.xp, s, backend
        self.c = backend.asarray(np.asarray(c, dtype=float)[:, None])
        self.a = backend.asarray(np.random.default_rng(seed).standard_normal((len(c), n)))

    def _diff(self, X):
        return X[:, 1:] - X[:, :-1]

    def _diff_t(self, Z):  # Dᵀz for rows z of length n − 1
        zero = self.xp.zeros((Z.shape[0], 1), dtype=Z.dtype, device=Z.device)
        return self.xp.concat([zero, Z], axis=1) - self.xp.concat([Z, zero], axis=1)

    def fun(self, X):
        d = self._diff(X)
        r = X - self.a
        return 0.5 * self.xp.sum(self.c * r * r, axis=1) + self.s * self.xp.sum(
            self.xp.log(1.0 + d * d), axis=1)

    def grad(self, X):
        d = self._diff(X)
        return self.c * (X - self.a) + self.s * self._diff_t(2.0 * d / (1.0 + d * d))

    def hvp(self, X, V):
        d = self._diff(X)
        curvature = 2.0 * (1.0 - d * d) / (1.0 + d * d) ** 2
        return self.c * V + self.s * self._diff_t(curvature * self._diff(V))

    def dense_hessian(self, x, i):
        """Sample i's Hessian at x (n,) column by column, on the host."""
        n = x.shape[0]
        X = self.be.asarray(np.tile(self.be.to_numpy(x), (n, 1)))
        rows = RowLorentzian.__new__(RowLorentzian)
        rows.xp, rows.s, rows.be = self.xp, self.s, self.be
        rows.c = self.c[i : i + 1, :]
        return self.be.to_numpy(rows.hvp(X, self.be.asarray(np.eye(n))))

    def single(self, i):
        rows = RowLorentzian.__new__(RowLorentzian)
        rows.xp, rows.s, rows.be = self.xp, self.s, self.be
        rows.c, rows.a = self.c[i : i + 1, :], self.a[i : i + 1, :]
        return rows


class MinresSolve:
    """The injected inner solve (rows or one sample): MINRES on the Hessian to the forcing
    terms; records each call's iterations and the slope ∇fᵀp of the step it returns."""

    def __init__(self, hvp) -> None:
        self.hvp, self.matvecs, self.slopes = hvp, [], []

    def __call__(self, X, G, eta, rows=None):
        if rows is None:  # one sample (a 1-D x0)
            res = rminres(lambda v: self.hvp(X[None, :], v[None, :])[0, :], -G, rtol=eta,
                          true_residual=False)
            self.matvecs.append(np.array([res.matvecs]))
            self.slopes.append(float(G @ res.x))
            return res.x, res.matvecs
        res = rminres(lambda V: self.hvp(X, V), -G, stop=ResidualRule(tuple(eta.tolist())),
                      true_residual=False)
        counts = np.where(rows, res.matvecs, 0)
        self.matvecs.append(counts)
        xp = array_api_compat.array_namespace(X)
        mask = xp.asarray(rows[:, None], device=array_api_compat.device(X))
        return xp.where(mask, res.x, xp.zeros_like(res.x)), counts


def assert_monotone(history):
    assert np.all(np.diff(np.asarray(history)) <= 0.0), history


def test_convex_quadratic_matches_dense_solve(backend) -> None:
    # f_i(x) = ½xᵀA_i x − b_iᵀx: x* = A_i⁻¹b_i; ‖∇f‖ ≤ gtol ⇒ ‖x − x*‖ ≤ gtol/λmin(A_i)
    rng = np.random.default_rng(0)
    n, B, gtol = 30, 3, 1e-10
    Q = np.linalg.qr(rng.standard_normal((B, n, n)))[0]
    lam = np.stack([np.logspace(0, k, n) for k in (1, 2, 3)])
    A_host = Q @ (lam[:, :, None] * np.swapaxes(Q, 1, 2))
    b_host = rng.standard_normal((B, n))
    A, b, xp = backend.asarray(A_host), backend.asarray(b_host), backend.xp

    def matvec(V):
        return xp.matmul(A, V[:, :, None])[:, :, 0]

    solve = MinresSolve(lambda X, V: matvec(V))
    res = newton_krylov(lambda X: 0.5 * xp.sum(X * matvec(X), axis=1) - xp.sum(b * X, axis=1),
                        lambda X: matvec(X) - b, backend.zeros((B, n)), solve, gtol=gtol)
    assert res.all_converged and res.status == (MinimizeStatus.CONVERGED,) * B
    for i in range(B):
        exact = np.linalg.solve(A_host[i], b_host[i])
        assert np.linalg.norm(backend.to_numpy(res.x)[i] - exact) <= gtol / lam[i, 0]
        assert_monotone(res.f_history[i])
    # counts: HVPs are the MINRES iterations of the sample's own solves; on a convex
    # quadratic the full step satisfies Armijo, so one evaluation per iteration (+ x0)
    assert list(res.hvp) == np.sum(solve.matvecs, axis=0).tolist()
    assert list(res.f_evals) == [k + 1 for k in res.iterations]
    assert res.host_reads == res.evaluation_rounds + max(res.iterations)


def test_uphill_newton_direction_falls_back_to_steepest_descent(backend) -> None:
    # alternating x0 = ±2: differences of 4, where the Lorentzian's curvature is negative:
    # the Hessian is indefinite and the MINRES step an ascent direction
    problem = RowLorentzian(backend, [0.05], s=1.0).single(0)
    x0 = backend.asarray(2.0 * (-1.0) ** np.arange(20))
    H0 = problem.dense_hessian(x0, 0)
    assert np.linalg.eigvalsh(H0)[0] < 0  # indefinite
    solve = MinresSolve(problem.hvp)
    res = newton_krylov(lambda x: problem.fun(x[None, :])[0],
                        lambda x: problem.grad(x[None, :])[0, :], x0, solve, gtol=1e-10)
    assert res.status is MinimizeStatus.CONVERGED, res.message
    assert solve.slopes[0] > 0  # the first Newton direction pointed uphill
    assert_monotone(res.f_history)
    assert len(res.f_history) == res.iterations + 1
    g = backend.to_numpy(problem.grad(res.x[None, :]))[0]
    assert np.linalg.norm(g) <= 1e-10 and res.grad_norm == pytest.approx(np.linalg.norm(g))
    # second-order condition: the point found is a local minimiser (dense Hessian ⪰ 0)
    assert np.linalg.eigvalsh(problem.dense_hessian(res.x, 0))[0] > 0
    assert res.hvp == sum(int(m[0]) for m in solve.matvecs)


def test_batch_together_equals_each_alone(backend) -> None:
    # row-wise kernels and MINRES with host scalars: the same arithmetic in a batch and
    # alone, so every count, status, f history and iterate is bitwise the same
    probs = RowLorentzian(backend, [0.05, 0.5, 5.0, 0.2], seed=3)
    X0 = backend.asarray(np.random.default_rng(5).standard_normal((4, 20)) * 2.0)
    res = newton_krylov(probs.fun, probs.grad, X0, MinresSolve(probs.hvp), gtol=1e-10)
    assert res.all_converged
    assert len(set(res.iterations)) > 1  # samples stop at different iterations
    for i in range(4):
        one = probs.single(i)
        alone = newton_krylov(lambda x, one=one: one.fun(x[None, :])[0],
                              lambda x, one=one: one.grad(x[None, :])[0, :], X0[i, :],
                              MinresSolve(one.hvp), gtol=1e-10)
        assert (res.status[i], res.iterations[i], res.f_evals[i], res.hvp[i]) == (
            alone.status, alone.iterations, alone.f_evals, alone.hvp)
        assert res.f_history[i] == alone.f_history
        np.testing.assert_array_equal(backend.to_numpy(res.x)[i], backend.to_numpy(alone.x))


def test_foe_reaches_1e_10_without_increasing_f(backend) -> None:
    problem = small_foe_problem("lorentzian", "inpainting", backend)
    theta = backend.asarray(initial_theta(dct_filters(3)[[0, 2, 4, 7]], -0.5))

    def hvp(X, V):
        return problem.hvp(X[0, :], theta, V[0, :])[None, :]

    solve = MinresSolve(hvp)
    res = newton_krylov(lambda x: problem.lower_objective(x, theta),
                        lambda x: problem.lower_grad(x, theta), problem.y, solve, gtol=1e-10)
    assert res.status is MinimizeStatus.CONVERGED, res.message
    true_norm = np.linalg.norm(backend.to_numpy(problem.lower_grad(res.x, theta)))
    assert true_norm <= 1e-10 and res.grad_norm == pytest.approx(true_norm, rel=1e-12)
    assert_monotone(res.f_history)
    assert len(res.f_history) == res.iterations + 1
    counts = problem.counter.snapshot()
    assert counts.hvp == res.hvp == sum(int(m[0]) for m in solve.matvecs)
    assert counts.f_evals == res.f_evals and counts.grad_evals == res.grad_evals + 1


def test_first_forcing_term_per_row(backend) -> None:
    # eta_first: the first inner solve of each row is asked for η₀ (a warm start's 1e-2,
    # a cold start's η_max); later ones follow Eisenstat–Walker; f never increases
    probs = RowLorentzian(backend, [0.05, 0.5, 5.0], seed=3)
    X0 = backend.asarray(np.random.default_rng(5).standard_normal((3, 20)) * 2.0)
    asked, inner = [], MinresSolve(probs.hvp)

    def solve(X, G, eta, rows):
        asked.append(np.array(eta))
        return inner(X, G, eta, rows)

    res = newton_krylov(probs.fun, probs.grad, X0, solve, gtol=1e-10,
                        eta_first=[1e-2, 0.5, 1e-2])
    assert res.all_converged
    gnorm0 = np.linalg.norm(backend.to_numpy(probs.grad(X0)), axis=1)
    # η₀ as given unless the last-step floor 0.5·gtol/‖g₀‖ is larger (it is not here)
    np.testing.assert_array_equal(asked[0], np.maximum([1e-2, 0.5, 1e-2], 0.5e-10 / gnorm0))
    for history in res.f_history:
        assert_monotone(history)
    with pytest.raises(ValueError, match="eta_first"):
        newton_krylov(probs.fun, probs.grad, X0, solve, eta_first=0.9)


def test_bad_options_and_nonfinite_start() -> None:
    be = get_backend("numpy")
    probs = RowLorentzian(be, [1.0])
    with pytest.raises(ValueError, match="eta_max"):
        newton_krylov(probs.fun, probs.grad, be.zeros((1, 20)), MinresSolve(probs.hvp),
                      eta_max=1.0)
    with pytest.raises(ValueError, match="Forcing"):
        newton_krylov(probs.fun, probs.grad, be.zeros((1, 20)), MinresSolve(probs.hvp),
                      forcing="choice3")
    res = newton_krylov(probs.fun, probs.grad, be.asarray(np.full((1, 20), np.nan)),
                        MinresSolve(probs.hvp))
    assert res.status == (MinimizeStatus.NONFINITE,) and res.hvp == (0,)
    res = newton_krylov(probs.fun, probs.grad, be.zeros((1, 20)), MinresSolve(probs.hvp),
                        gtol=1e-14, maxiter=1)
    assert res.status == (MinimizeStatus.MAXITER,) and res.iterations == (1,)


# -- the engine's Newton lower level ------------------------------------------------------
NEWTON = dict(lower_solver="newton_krylov")


def test_engine_batch_equals_each_alone_on_the_quadratic() -> None:
    be = get_backend("numpy")
    cfg = EngineConfig(stop=StopConfig(rtol=1e-6), lower_gtol=1e-8, shadow_baseline=True,
                       **NEWTON)
    problems = [QuadraticProblem(n=30, num_terms=3, seed=s, backend=be) for s in range(3)]
    assert_together_equals_alone(be, problems, cfg, [THETA + 0.1 * t for t in range(2)])
    # from a cold start the lower level takes Newton steps (a warm start may already meet
    # gtol, depending on round-off)
    result = BilevelEngine(problems, cfg, backend=be).evaluate(be.asarray(THETA))
    assert all(r.lower_hvp > 0 and r.lower_converged for r in result.samples)


def test_engine_foe_batch_equals_each_alone() -> None:
    # FoE rows are convolved as one batch: summation orders may differ from a batch of
    # one at round-off, far from Newton's stopping margins (quadratic convergence jumps
    # over gtol), so iterations and statuses must agree; x within 2·gtol/λmin
    be = get_backend("numpy")
    gtol = 1e-10
    cfg = EngineConfig(stop=StopConfig(rtol=1e-8), lower_gtol=gtol, **NEWTON)
    problems = mnist_problems(be, 3, size=12)
    together = BilevelEngine(problems, cfg, backend=be)
    alone = BilevelEngine(problems, cfg, backend=be)
    th = be.asarray(initial_theta(dct_filters(3)[:8], -1.0))
    batch = together.evaluate(th)
    singles = [alone.evaluate(th, [j]) for j in range(3)]
    for j, (r, s) in enumerate(zip(batch.samples, singles, strict=True)):
        assert r.lower_converged and s.samples[0].lower_converged
        assert (r.lower_iterations, r.lower_grad_evals, r.lower_hvp) == (
            s.samples[0].lower_iterations, s.samples[0].lower_grad_evals,
            s.samples[0].lower_hvp)
        # a batch of one: the per-row lower counts are the problem counter's own
        assert (s.lower_counts.hvp, s.lower_counts.grad_evals) == (
            s.samples[0].lower_hvp, s.samples[0].lower_grad_evals)
        x = together.states[j].x
        H = be.to_numpy(problems[j].linearize(x, th).hvp(be.asarray(np.eye(problems[j].n))))
        lam_min = np.linalg.eigvalsh(0.5 * (H + H.T))[0]
        assert np.linalg.norm(be.to_numpy(x - alone.states[j].x)) <= 2 * gtol / lam_min


@pytest.mark.parametrize(("expert", "operator"), [("lorentzian", "inpainting"),
                                                  ("huber", "blur")])
def test_engine_hypergradient_equals_lbfgs_and_finite_differences(expert, operator):
    # both lower levels reach ‖∇f‖ ≤ 1e-10 (L-BFGS with the Newton polish), both adjoint
    # solves rtol 1e-12: to first order each −Jᵀw is within ‖J‖/λmin (rtol‖∇ℓ‖ +
    # gtol/λmin) of the exact hypergradient, so the two within twice that
    be = get_backend("numpy")
    problem = small_foe_problem(expert, operator, be)
    theta = initial_theta(dct_filters(3)[[0, 2, 4, 7]], -0.5)
    th = be.asarray(theta)
    newton_cfg = EngineConfig(stop=TIGHT.stop, lower_gtol=TIGHT.lower_gtol, warm_start=False,
                              **NEWTON)
    grad, state, record = hypergradient(problem, th, newton_cfg)
    reference, _, _ = hypergradient(problem, th, TIGHT)
    assert record.lower_converged and record.krylov_converged and record.lower_hvp > 0
    assert record.lower_iterations < 20
    lin = problem.linearize(state.x, th)
    eye = be.asarray(np.eye(problem.n))
    H, J = be.to_numpy(lin.hvp(eye)), be.to_numpy(lin.jac_t(eye))
    lam_min = np.linalg.eigvalsh(0.5 * (H + H.T))[0]
    g = np.linalg.norm(be.to_numpy(problem.upper_grad(state.x)))
    bound = 2 * np.linalg.norm(J, 2) / lam_min * (1e-12 * g + 1e-10 / lam_min)
    assert np.linalg.norm(be.to_numpy(grad) - be.to_numpy(reference)) <= bound
    # and against central finite differences of ℓ(x(θ)), as the L-BFGS path is tested
    direction = np.random.default_rng(0).standard_normal(theta.shape)
    direction /= np.linalg.norm(direction)
    h = 1e-4
    plus, _ = upper_loss_at(problem, theta + h * direction, state.x)
    minus, _ = upper_loss_at(problem, theta - h * direction, state.x)
    fd = (plus - minus) / (2 * h)
    analytic = float(np.dot(be.to_numpy(grad).ravel(), direction.ravel()))
    assert abs(analytic - fd) <= 1e-5 * max(abs(fd), 1e-3 * np.linalg.norm(be.to_numpy(grad)))
