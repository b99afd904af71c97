"""What rminres reports is true of what it returns: ``converged`` only when the true
residual of x meets the tolerance, b = 0 answered at once, bad recycle spaces and dtypes
refused before any work with a message naming the defect."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from framework.krylov import RecycleSpace, Status, rminres
from framework.krylov.recycle import RecycleConfig, RecycleHarvester

# HYPERKRYLOV_PROPERTY_EXAMPLES=N runs N examples with fresh random draws each time (the
# nightly runner, .ci/nightly); by default 2,000 derandomised examples (CI).
NIGHTLY = os.environ.get("HYPERKRYLOV_PROPERTY_EXAMPLES")
PROPERTY = settings(max_examples=int(NIGHTLY or 2000), deadline=None, derandomize=not NIGHTLY,
                    suppress_health_check=[HealthCheck.too_slow], print_blob=True)
EPS = float(np.finfo(np.float64).eps)
KINDS = ("spd", "indefinite", "singular_spd", "singular_indefinite")


def system(n: int, log_cond: float, indefinite: bool, seed: int, rank: int | None = None
           ) -> np.ndarray:
    """Q diag(λ) Qᵀ with |λ| log-spaced over [1, 10^log_cond] (alternate signs when
    ``indefinite``), the last n − rank eigenvalues zero."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    ev = np.logspace(0, log_cond, n)
    if indefinite:
        ev[::2] *= -1
    if rank is not None:
        ev[rank:] = 0.0
    A = (Q * ev) @ Q.T
    return (A + A.T) / 2


@st.composite
def batches(draw):
    """B ∈ 1..4 systems of one size n, each of its own kind, κ up to 1e10, seed and
    right-hand side; optional x0 (of any scale), a recycle space (k ≤ 3 random
    directions) and a capped harvest; rtol, atol, maxiter."""
    B, n = draw(st.integers(1, 4)), draw(st.integers(2, 12))
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=B, max_size=B))
    seed = draw(st.integers(0, 10**6))
    rng = np.random.default_rng(seed)
    matrices = []
    for kind in kinds:
        rank = draw(st.integers(1, n - 1)) if kind.startswith("singular") and n > 1 else None
        matrices.append(system(n, draw(st.floats(0, 10)), kind.endswith("indefinite"),
                               int(rng.integers(2**31)), rank))
    A = np.stack(matrices)
    b = rng.standard_normal((B, n))
    if draw(st.booleans()):  # consistent right-hand sides (also for the singular ones)
        b = (A @ rng.standard_normal((B, n, 1)))[..., 0]
    x0 = (rng.standard_normal((B, n)) * 10.0 ** rng.uniform(-3, 3)
          if draw(st.booleans()) else None)
    k = draw(st.integers(0, 3))
    Y = rng.standard_normal((B, n, k)) if k else None
    return dict(A=A, b=b, x0=x0, Y=Y, one=B == 1 and draw(st.booleans()),
                harvest=draw(st.sampled_from([None, 2, 5])),
                rtol=10.0 ** draw(st.floats(-10, -1)),
                atol=draw(st.sampled_from([0.0, 1e-12, 1e-6])),
                maxiter=draw(st.integers(1, 40)))


@PROPERTY
@given(case=batches())
def test_converged_means_the_true_residual_meets_the_tolerance(case):
    """On SPD, indefinite and singular (consistent or not) systems up to κ = 1e10, with
    and without recycling and harvesting, B = 1..4 (B = 1 also as 1-D arrays): what a
    sample reports is true of its returned x — checked with a dense matvec per sample —
    and the counts agree with the operator calls counted here."""
    A, b, x0, one = case["A"], case["b"], case["x0"], case["one"]
    calls = []

    def op(V):
        calls.append(V.shape)
        return A[0] @ V if one else (A @ V[..., None])[..., 0]

    space = None
    if case["Y"] is not None:
        space = RecycleSpace.from_basis(lambda Y: A[0] @ Y if one else A @ Y,
                                        case["Y"][0] if one else case["Y"])
    harvest = None
    if case["harvest"] is not None and space is not None:
        harvest = RecycleHarvester(RecycleConfig("ritz", 2, max_vectors=case["harvest"]))
    rtol, atol, maxiter = case["rtol"], case["atol"], case["maxiter"]
    res = rminres(op, b[0] if one else b, x0=None if x0 is None else (x0[0] if one else x0),
                  recycle=space, harvest=harvest, rtol=rtol, atol=atol, maxiter=maxiter)
    results = [res] if one else [res.sample(i) for i in range(len(b))]
    initial = x0 is not None
    steps = 0
    for i, r in enumerate(results):
        x = np.asarray(r.x)
        true = np.linalg.norm(b[i] - A[i] @ x)
        assert np.all(np.isfinite(x))
        assert r.residual_norm == pytest.approx(true, rel=1e-12, abs=1e-300)
        if r.converged:
            assert true <= max(rtol * np.linalg.norm(b[i]), atol)
        if r.status is Status.BREAKDOWN:
            # a least-squares solution: the recurrence stopped at ‖A r‖ ≤ 4.7e-8·‖A‖‖r‖
            # (with ‖A‖ estimated to a factor 3), to the rounding floor of b − Ax itself
            residual, norm_a = b[i] - A[i] @ x, np.linalg.norm(A[i], 2)
            start = 0.0 if x0 is None else np.linalg.norm(x0[i])
            floor = 1e3 * EPS * norm_a * (np.linalg.norm(b[i])
                                          + norm_a * (np.linalg.norm(x) + start))
            assert (np.linalg.norm(A[i] @ residual)
                    <= 1e-6 * norm_a * np.linalg.norm(residual) + norm_a * floor)
        assert r.converged == (r.status in (Status.CONVERGED, Status.EXACT))
        assert 0 <= r.iterations <= maxiter
        assert r.matvecs == r.iterations + initial and r.check_matvecs == 1
        assert len(r.residual_history) == r.iterations + 1
        # a sample that stopped without updating (breakdown) made one pass more
        steps = max(steps, r.iterations + (r.status is Status.BREAKDOWN))
    assert res.passes == initial + steps and len(calls) == res.passes + 1  # + the check
    if harvest is not None and res.harvest is not None:
        assert np.all(np.isfinite(np.asarray(res.harvest.basis)))


@pytest.mark.parametrize("indefinite", [False, True])
def test_singular_inconsistent_systems_end_with_a_least_squares_solution(backend, indefinite):
    """A singular symmetric A (rank r < n) and b outside its range: no x meets the
    tolerance; the solve stops with BREAKDOWN (not maxiter, ‖x‖ bounded) and x is a
    least-squares solution — its residual is the dense oracle's b − A A⁺b and A r ≈ 0 —
    per sample in a batch that also holds a consistent singular and a regular system,
    which converge as usual."""
    n, rank = 20, 14
    singular = system(n, 3, indefinite, 7, rank)
    regular = system(n, 3, indefinite, 8)
    A = np.stack([singular, singular, regular])
    rng = np.random.default_rng(0)
    b = rng.standard_normal((3, n))
    b[1] = singular @ rng.standard_normal(n)  # consistent
    xp = backend.xp
    Ad = backend.asarray(A)
    res = rminres(lambda V: (Ad @ V[..., None])[..., 0], backend.asarray(b), rtol=1e-10,
                  maxiter=10 * n)
    x = backend.to_numpy(res.x)
    assert res.status == (Status.BREAKDOWN, Status.CONVERGED, Status.CONVERGED)
    assert res.converged == (False, True, True)
    assert "least-squares" in res.message[0]
    assert res.iterations[0] <= rank + 5  # soon after the Krylov space holds range(A)
    r = b[0] - singular @ x[0]
    r_ls = b[0] - singular @ (np.linalg.pinv(singular) @ b[0])
    norm_a = np.linalg.norm(singular, 2)
    assert np.linalg.norm(r - r_ls) <= 1e-6 * np.linalg.norm(b[0])
    assert np.linalg.norm(singular @ r) <= 1e-6 * norm_a * np.linalg.norm(r)
    assert np.linalg.norm(x[0]) <= 1e3 * np.linalg.norm(np.linalg.pinv(singular) @ b[0])
    assert res.residual_norm[0] == pytest.approx(np.linalg.norm(r_ls), rel=1e-6)
    for i in (1, 2):
        assert np.linalg.norm(b[i] - A[i] @ x[i]) <= 1e-10 * np.linalg.norm(b[i])
    assert xp.isdtype(res.x.dtype, "real floating")
    # one system: the same least-squares stop
    one = rminres(lambda v: Ad[0, ...] @ v, backend.asarray(b[0]), rtol=1e-10, maxiter=10 * n)
    assert one.status is Status.BREAKDOWN and one.iterations == res.iterations[0]
    np.testing.assert_array_equal(backend.to_numpy(one.x), x[0])


def test_an_ill_conditioned_system_that_drifts_is_not_called_converged():
    """κ = 1e8: the recurrence estimate meets rtol 1e-3 while the true residual of the
    returned x does not; the status says so (and a restart from x fixes it)."""
    found = 0
    for seed in range(40):
        A = system(6, 8, False, seed)
        rng = np.random.default_rng(seed)
        b, x0 = rng.standard_normal(6), rng.standard_normal(6) * 1e3
        res = rminres(A, b, x0=x0, rtol=1e-3)
        true = np.linalg.norm(b - A @ res.x)
        if res.residual_history[-1] <= 1e-3 * np.linalg.norm(b) < true:
            found += 1
            assert res.status is Status.DRIFTED and not res.converged
            assert "drifted" in res.message
    assert found, "no drifting example in these seeds: the test would not test anything"


def test_zero_rhs_returns_zero_at_once_whatever_x0():
    A = system(50, 2, False, 0)
    res = rminres(lambda v: A @ v, np.zeros(50), x0=np.ones(50), rtol=1e-8)
    assert res.iterations == 0 and res.converged and res.passes == 1  # r0 (+ the check)
    np.testing.assert_array_equal(res.x, np.zeros(50))
    batch = rminres(lambda V: V @ A, np.stack([np.zeros(50), np.ones(50)]),
                    x0=np.ones((2, 50)), rtol=1e-8)
    assert batch.iterations[0] == 0 and batch.iterations[1] > 0 and all(batch.converged)
    np.testing.assert_array_equal(batch.x[0], np.zeros(50))


def _space(A: np.ndarray, k: int = 3) -> RecycleSpace:
    Y = np.random.default_rng(0).standard_normal((A.shape[0], k))
    return RecycleSpace.from_basis(lambda V: A @ V, Y)


def test_bad_recycle_spaces_are_named_before_any_work():
    A = system(30, 2, False, 1)
    b = np.ones(30)
    good = _space(A)
    calls = []

    def op(v):
        calls.append(1)
        return A @ v

    bad_u = good.U.copy()
    bad_u[0, 0] = np.nan
    with pytest.raises(ValueError, match="recycle space U contains NaN or inf"):
        rminres(op, b, recycle=RecycleSpace(bad_u, good.C))
    with pytest.raises(ValueError, match="C is not orthonormal"):
        rminres(op, b, recycle=RecycleSpace(good.U, 2.0 * good.C))
    assert not calls
    stale = _space(system(30, 2, False, 2))  # built for another matrix
    with pytest.raises(ValueError, match="C is not A U"):
        rminres(op, b, recycle=stale, check=True)
    res = rminres(op, b, recycle=good, check=True, rtol=1e-10)
    assert res.converged


@pytest.mark.parametrize("b, x0, message", [
    (np.ones(5, dtype=np.int64), None, "b must be a real floating-point array"),
    (np.ones(5, dtype=np.complex128), None, "b must be a real floating-point array"),
    (np.ones(5), np.ones(5, dtype=np.float32), "x0 has dtype float32 but b has float64"),
])
def test_dtypes_are_checked(b, x0, message):
    with pytest.raises(ValueError, match=message):
        rminres(lambda v: v, b, x0=x0)
