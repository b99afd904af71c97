"""What rminres reports is true of what it returns: ``converged`` only when the true
residual of x meets the tolerance, b = 0 answered at once, bad recycle spaces and dtypes
refused before any work with a message naming the defect."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from framework.krylov import RecycleSpace, Status, rminres


def system(n: int, log_cond: float, indefinite: bool, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    ev = np.logspace(0, log_cond, n)
    if indefinite:
        ev[::2] *= -1
    A = (Q * ev) @ Q.T
    return (A + A.T) / 2


@settings(max_examples=2000, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(2, 12), log_cond=st.floats(0, 10), indefinite=st.booleans(),
       seed=st.integers(0, 10**6), log_rtol=st.floats(-10, -1), with_x0=st.booleans(),
       maxiter=st.integers(1, 40))
def test_converged_means_the_true_residual_meets_the_tolerance(
        n, log_cond, indefinite, seed, log_rtol, with_x0, maxiter):
    A = system(n, log_cond, indefinite, seed)
    rng = np.random.default_rng(seed + 1)
    b = rng.standard_normal(n)
    x0 = rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3) if with_x0 else None
    rtol = 10.0 ** log_rtol
    res = rminres(lambda v: A @ v, b, x0=x0, rtol=rtol, maxiter=maxiter)
    true = np.linalg.norm(b - A @ res.x)
    assert res.residual_norm == pytest.approx(true, rel=1e-12, abs=1e-300)
    if res.converged:
        assert true <= rtol * np.linalg.norm(b)
    assert res.iterations <= maxiter
    assert res.matvecs == res.iterations + (x0 is not None)
    assert res.check_matvecs == 1


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
