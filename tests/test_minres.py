"""rminres against SciPy's MINRES, dense solves and the theory of deflation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse.linalg as spla
from array_api_compat import device as device_of

from backends.counting import CountingOperator
from framework.krylov import (
    IterationState,
    LanczosRecorder,
    RecycleSpace,
    ResidualRule,
    Status,
    rminres,
)


def symmetric_matrix(n: int, eigenvalues: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = (Q * eigenvalues) @ Q.T
    return (A + A.T) / 2, Q


def spd(n: int, cond: float, seed: int = 0) -> np.ndarray:
    return symmetric_matrix(n, np.logspace(0, np.log10(cond), n), seed)[0]


def indefinite(n: int, cond: float, seed: int = 0) -> np.ndarray:
    half = n // 2
    magnitudes = np.logspace(0, np.log10(cond), n)
    ev = np.concatenate([-magnitudes[::2][:half], magnitudes[1::2][: n - half]])
    return symmetric_matrix(n, ev, seed)[0]


def counted(be, A: np.ndarray) -> CountingOperator:
    Ad = be.asarray(A)
    return CountingOperator(lambda v: Ad @ v, A.shape[0])


MATRICES = {
    "spd-1e2": lambda: spd(500, 1e2),
    "spd-1e4": lambda: spd(500, 1e4, seed=1),
    "indef-1e2": lambda: indefinite(500, 1e2, seed=2),
    "indef-1e3": lambda: indefinite(500, 1e3, seed=3),
}


@pytest.mark.parametrize("name", sorted(MATRICES))
@pytest.mark.parametrize("k", [1, 3, 10, 25])
def test_iterate_after_k_steps_matches_scipy(backend, name, k):
    A = MATRICES[name]()
    rng = np.random.default_rng(10 + k)
    b, x0 = rng.standard_normal(500), rng.standard_normal(500)
    reference, _ = spla.minres(A, b, x0=x0, maxiter=k, rtol=1e-300)
    op = counted(backend, A)
    res = rminres(op, backend.asarray(b), x0=backend.asarray(x0), rtol=0.0, maxiter=k)
    x = backend.to_numpy(res.x)
    assert res.iterations == k
    assert res.status is Status.MAXITER and not res.converged
    assert np.linalg.norm(x - reference) <= 1e-8 * np.linalg.norm(reference)
    assert device_of(res.x) == backend.device
    # the reported residual is the true one, recomputed independently
    assert res.residual_norm == pytest.approx(np.linalg.norm(b - A @ x), rel=1e-12)
    # counts: one application per iteration + one for the initial residual, + the check
    assert res.matvecs == k + 1 and res.check_matvecs == 1
    assert op.applications == res.matvecs + res.check_matvecs


@pytest.mark.parametrize("name", ["spd-1e2", "spd-1e4", "indef-1e2"])
def test_converged_solution_matches_dense_solve(backend, name):
    A = MATRICES[name]()
    b = np.random.default_rng(5).standard_normal(500)
    op = counted(backend, A)
    res = rminres(op, backend.asarray(b), rtol=1e-10, maxiter=5000)
    exact = np.linalg.solve(A, b)
    assert res.converged and res.status is Status.CONVERGED
    cond = np.linalg.cond(A)
    err = np.linalg.norm(backend.to_numpy(res.x) - exact) / np.linalg.norm(exact)
    assert err <= 1e-10 * cond * 10
    assert res.residual_norm <= 1e-9 * np.linalg.norm(b) * 10
    # x0 omitted: r0 = b costs no application
    assert res.matvecs == res.iterations
    assert res.residual_history[-1] <= 1e-10 * np.linalg.norm(b)


def test_residual_estimate_tracks_true_residual():
    A = indefinite(200, 1e2, seed=7)
    b = np.random.default_rng(1).standard_normal(200)
    estimates, trues = [], []

    def record(xk):
        trues.append(np.linalg.norm(b - A @ xk))

    res = rminres(lambda v: A @ v, b, rtol=1e-8, callback=record)
    estimates = res.residual_history[1:]
    np.testing.assert_allclose(estimates, trues, rtol=1e-6, atol=1e-12 * np.linalg.norm(b))


def test_residual_vector_recurrence_matches_true_residual(backend):
    A = spd(300, 1e3, seed=4)
    rng = np.random.default_rng(2)
    b, x0 = rng.standard_normal(300), rng.standard_normal(300)
    seen = []

    class Keep:
        needs_residual = True

        def __call__(self, state: IterationState) -> bool:
            seen.append((state.iteration, backend.to_numpy(state.residual)))
            return state.iteration >= 30

    iterates = []
    res = rminres(
        counted(backend, A),
        backend.asarray(b),
        x0=backend.asarray(x0),
        stop=Keep(),
        callback=lambda xk: iterates.append(np.array(backend.to_numpy(xk), copy=True)),
    )
    assert res.iterations == 30
    for (it, r), xk in zip(seen[1:], iterates, strict=True):
        true = b - A @ xk
        assert np.linalg.norm(r - true) <= 1e-10 * np.linalg.norm(b), it


def test_recycling_an_invariant_subspace_deflates(backend):
    n, k = 400, 8
    ev = np.concatenate([np.logspace(-4, -3, k), np.linspace(1.0, 10.0, n - k)])
    A, Q = symmetric_matrix(n, ev, seed=11)
    rng = np.random.default_rng(3)
    b, x0 = rng.standard_normal(n), rng.standard_normal(n)
    exact = np.linalg.solve(A, b)
    op = counted(backend, A)
    plain = rminres(op, backend.asarray(b), x0=backend.asarray(x0), rtol=1e-10)
    space = RecycleSpace.from_basis(op, backend.asarray(Q[:, :k]))
    before = op.applications
    rec = rminres(
        op, backend.asarray(b), x0=backend.asarray(x0), rtol=1e-10, recycle=space
    )
    assert op.applications - before == rec.iterations + 2  # initial residual + check
    # without deflation (κ = 1e5) the recurrence estimate meets 1e-10 but the true residual
    # drifts above it (8.8e-10‖b‖): reported as DRIFTED, not converged
    assert rec.converged and plain.status in (Status.CONVERGED, Status.DRIFTED)
    x = backend.to_numpy(rec.x)
    assert np.linalg.norm(b - A @ x) <= 1e-9 * np.linalg.norm(b)
    assert np.linalg.norm(x - exact) <= 1e-7 * np.linalg.norm(exact)
    # Theory: the deflated operator has condition 10 instead of 1e5, so MINRES needs
    # about sqrt(10)/2·ln(2/tol) ≈ 39 iterations (CG-type bound) instead of hundreds.
    kappa = 10.0
    bound = int(np.ceil(np.sqrt(kappa) / 2 * np.log(2 / 1e-10))) + 5
    assert rec.iterations <= bound < plain.iterations / 3


def test_recycle_space_from_basis_properties(backend):
    n, k = 120, 6
    A = spd(n, 1e3, seed=8)
    Y = np.random.default_rng(0).standard_normal((n, k))
    op = counted(backend, A)
    space = RecycleSpace.from_basis(op, backend.asarray(Y))
    assert op.applications == k and op.passes == 1  # one block application
    U, C = backend.to_numpy(space.U), backend.to_numpy(space.C)
    np.testing.assert_allclose(A @ U, C, atol=1e-10)
    np.testing.assert_allclose(C.T @ C, np.eye(k), atol=1e-12)
    assert device_of(space.U) == backend.device


def test_recycle_space_drops_dependent_columns():
    n = 50
    A = spd(n, 10.0)
    Y = np.random.default_rng(0).standard_normal((n, 3))
    Y = np.column_stack([Y, Y[:, 0] + Y[:, 1]])
    space = RecycleSpace.from_basis(lambda v: A @ v, Y)
    assert space.k == 3
    np.testing.assert_allclose(A @ space.U, space.C, atol=1e-10)
    with pytest.raises(ValueError, match="non-finite"):
        RecycleSpace.from_basis(lambda v: A @ v, np.full((n, 2), np.nan))


def test_harvest_satisfies_the_lanczos_relation(backend):
    n, k = 200, 5
    A = indefinite(n, 50.0, seed=9)
    rng = np.random.default_rng(4)
    op = counted(backend, A)
    space = RecycleSpace.from_basis(op, backend.asarray(rng.standard_normal((n, k))))
    res = rminres(
        op,
        backend.asarray(rng.standard_normal(n)),
        x0=backend.asarray(rng.standard_normal(n)),
        recycle=space,
        rtol=0.0,
        maxiter=40,
        harvest=LanczosRecorder(),
    )
    h = res.harvest
    m = h.steps
    assert m == res.iterations == 40 and h.stored == m + 1
    V = backend.to_numpy(h.V)
    C = backend.to_numpy(space.C)
    T = backend.to_numpy(h.tridiagonal(backend.xp, device=backend.device))
    P = np.eye(n) - C @ C.T
    np.testing.assert_allclose(P @ A @ V[:, :m], V @ T, atol=1e-10)
    np.testing.assert_allclose(C.T @ A @ V[:, :m], backend.to_numpy(h.B), atol=1e-10)
    np.testing.assert_allclose(C.T @ V, 0.0, atol=1e-12)
    # no reorthogonalisation: orthogonality is only lost once Ritz values converge
    assert np.abs(V.T @ V - np.eye(m + 1)).max() < 1e-6


def test_recorder_cap_bounds_memory():
    A = spd(100, 1e2)
    b = np.ones(100)
    res = rminres(lambda v: A @ v, b, rtol=1e-8, harvest=LanczosRecorder(max_vectors=7))
    assert res.harvest.stored == 7 and res.harvest.steps == res.iterations > 7


def test_lanczos_breakdown_gives_exact_solution(backend):
    # b lies in a 3-dimensional invariant subspace: Lanczos stops after 3 steps.
    n = 60
    ev = np.linspace(1.0, 5.0, n)
    A, Q = symmetric_matrix(n, ev, seed=2)
    b = Q[:, [0, 30, 59]] @ np.array([1.0, -2.0, 0.5])  # well-separated eigenvalues
    res = rminres(counted(backend, A), backend.asarray(b), rtol=0.0, maxiter=50)
    assert res.status is Status.EXACT and res.converged
    assert res.iterations == 3
    np.testing.assert_allclose(backend.to_numpy(res.x), np.linalg.solve(A, b), atol=1e-12)


def test_zero_rhs_and_converged_start():
    A = spd(20, 10.0)
    res = rminres(lambda v: A @ v, np.zeros(20))
    assert res.converged and res.iterations == 0 and res.status is Status.EXACT
    x = np.linalg.solve(A, np.ones(20))
    res = rminres(lambda v: A @ v, np.ones(20), x0=x, rtol=1e-8)
    assert res.converged and res.iterations == 0 and res.matvecs == 1


def test_singular_indefinite_reports_breakdown_or_nonconvergence():
    A = np.diag([1.0, -1.0, 0.0, 2.0])
    b = np.array([1.0, 1.0, 1.0, 1.0])  # inconsistent: b has a null-space component
    res = rminres(lambda v: A @ v, b, rtol=1e-12, maxiter=20)
    assert not res.converged
    assert res.status is Status.BREAKDOWN
    assert np.all(np.abs(res.x) < 10.0)
    assert res.message
    # the least-squares residual (null-space component of b) remains
    assert res.residual_norm == pytest.approx(1.0, rel=1e-8)


def test_nonconvergence_is_reported():
    A = spd(300, 1e6)
    res = rminres(lambda v: A @ v, np.ones(300), rtol=1e-12, maxiter=5)
    assert not res.converged and res.status is Status.MAXITER
    assert "maxiter" in res.message


def test_nonfinite_operator_output_is_reported():
    res = rminres(lambda v: v * np.nan, np.ones(5), maxiter=3)
    assert res.status is Status.NONFINITE and not res.converged


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rtol": -1.0}, "rtol"),
        ({"atol": float("nan")}, "atol"),
        ({"maxiter": 0}, "maxiter"),
        ({"maxiter": 2.5}, "maxiter"),
        ({"x0": np.ones(3)}, "x0"),
        ({"x0": np.array([np.nan] * 4)}, "x0"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    A = np.eye(4)
    with pytest.raises(ValueError, match=match):
        rminres(lambda v: A @ v, np.ones(4), **kwargs)


def test_bad_rhs_and_operator_shape():
    op = CountingOperator(lambda v: v, 4)
    with pytest.raises(ValueError, match="b must"):
        rminres(op, np.ones((4, 1)))
    with pytest.raises(ValueError, match="b contains non-finite"):
        rminres(op, np.array([1.0, np.inf, 0.0, 0.0]))
    with pytest.raises(ValueError, match="operator shape"):
        rminres(op, np.ones(5))
    with pytest.raises(ValueError, match="operator returned shape"):
        rminres(lambda v: v[:2], np.ones(4))


def test_unreachable_tolerance_is_refused():
    A = np.eye(4)
    with pytest.raises(ValueError, match="rtol=1e-20 is below the machine epsilon"):
        rminres(lambda v: A @ v, np.ones(4), rtol=1e-20)
    with pytest.raises(ValueError, match="machine epsilon"):
        rminres(lambda v: A @ v, np.ones(4, dtype=np.float32), rtol=1e-9)
    # rtol = 0 (run to maxiter) and a tiny rtol with an atol stay allowed
    assert rminres(lambda v: A @ v, np.ones(4), rtol=0.0, maxiter=2).converged
    assert rminres(lambda v: A @ v, np.ones(4), rtol=1e-20, atol=1e-12).converged


def test_residual_rule_threshold():
    rule = ResidualRule(rtol=1e-3, atol=1e-2)
    low, high = rule.thresholds([1.0, 100.0])
    assert low == 1e-2 and high == pytest.approx(0.1)
    with pytest.raises(ValueError, match="rtol"):
        ResidualRule(rtol=-1)
    with pytest.raises(ValueError, match="rtol"):
        ResidualRule(rtol=(1e-3, math.nan))


def test_per_row_relative_tolerances_equal_each_row_alone():
    # a rule with one rtol per row stops each row where a solve of that row alone with
    # its own scalar rtol stops (the same iterations, the same iterate bitwise)
    rng = np.random.default_rng(3)
    Q = np.linalg.qr(rng.standard_normal((2, 40, 40)))[0]
    A = Q @ (np.linspace(-3.0, 5.0, 40)[None, :, None] * np.swapaxes(Q, 1, 2))
    b = rng.standard_normal((2, 40))
    rtols = (1e-2, 1e-8)
    def rows_of(A):
        return lambda V: np.einsum("bij,bj->bi", A, V)

    batch = rminres(rows_of(A), b, stop=ResidualRule(rtols), true_residual=False)
    for i, rtol in enumerate(rtols):
        alone = rminres(rows_of(A[i : i + 1]), b[i : i + 1], rtol=rtol, true_residual=False)
        assert batch.iterations[i] == alone.iterations[0] and batch.converged[i]
        np.testing.assert_array_equal(batch.x[i], alone.x[0])
    assert batch.iterations[0] < batch.iterations[1]


def test_identity_operator_returning_its_input_is_safe():
    # an operator that returns its argument must not be modified in place
    res = rminres(lambda v: v, np.arange(1.0, 6.0), rtol=1e-12)
    np.testing.assert_allclose(res.x, np.arange(1.0, 6.0))
