"""rminres takes what SciPy's ``minres`` takes: matrices, sparse matrices and
``LinearOperator``s, a shift, a symmetry check and a preconditioner M ≈ A⁻¹; the
behaviours of SciPy's own minres tests, and preconditioned iterates equal to SciPy's."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from framework.krylov import Status, rminres
from tests.test_minres import indefinite, spd


def sample_problem(n: int = 10, seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
    """A random symmetric matrix (entries of M + Mᵀ with M uniform) and a right-hand side."""
    rng = np.random.default_rng(seed)
    A = rng.random((n, n))
    return A + A.T, rng.random(n)


def spd_preconditioner(A: np.ndarray, seed: int = 5) -> np.ndarray:
    """An SPD approximation of |A|⁻¹: the inverse of |A| (spectral absolute value)
    perturbed by a random SPD matrix, so M helps but is not exact."""
    w, Q = np.linalg.eigh(A)
    rng = np.random.default_rng(seed)
    E = rng.standard_normal(A.shape) * 0.1
    P = (Q * np.abs(w)) @ Q.T + E @ E.T
    M = np.linalg.inv(P)
    return (M + M.T) / 2


def test_dense_array_operator_on_any_namespace(backend):
    A, b = sample_problem(30)
    A += 30 * np.eye(30)  # definite: a well-posed solve to 1e-10
    res = rminres(backend.asarray(A), backend.asarray(b), rtol=1e-10)
    x = backend.to_numpy(res.x)
    # the recurrence estimate met 1e-10‖b‖; the true residual differs from it by rounding
    # (κ(A)·eps·‖b‖ ≈ 1e-15‖b‖ here), far inside the 1 % slack
    assert res.converged and np.linalg.norm(A @ x - b) <= 1e-10 * np.linalg.norm(b) * 1.01


@pytest.mark.parametrize("kind", ["sparse", "linear_operator"])
def test_sparse_and_linear_operator_inputs_match_the_dense_solve(kind):
    A, b = sample_problem(40)
    A += 40 * np.eye(40)
    op = sp.csr_matrix(A) if kind == "sparse" else spla.aslinearoperator(A)
    res = rminres(op, b, rtol=1e-12)
    dense = rminres(A, b, rtol=1e-12)
    assert res.converged and res.iterations == dense.iterations
    np.testing.assert_allclose(res.x, np.linalg.solve(A, b), rtol=1e-9)


@pytest.mark.parametrize("kind", ["shared", "per_sample", "sparse", "linear_operator"])
def test_matrices_on_a_batch(kind):
    """One matrix for every row (dense, sparse, LinearOperator) or one per sample."""
    A, _ = sample_problem(20)
    A += 20 * np.eye(20)
    b = np.random.default_rng(0).standard_normal((3, 20))
    mats = {"shared": A, "per_sample": np.stack([A + j * np.eye(20) for j in range(3)]),
            "sparse": sp.csr_matrix(A), "linear_operator": spla.aslinearoperator(A)}
    res = rminres(mats[kind], b, rtol=1e-12)
    for j in range(3):
        Aj = A + j * np.eye(20) if kind == "per_sample" else A
        np.testing.assert_allclose(res.x[j], np.linalg.solve(Aj, b[j]), rtol=1e-9)


def test_singular_system_with_zero_row_and_consistent_rhs():
    """SciPy's singular case: row 0 of A and b[0] zeroed; MINRES still reaches
    ‖Ax − b‖ ≤ 1e-5‖b‖ (A is then not symmetric, so this is MINRES's robustness)."""
    A, b = sample_problem()
    A[0, :] = 0
    b[0] = 0
    res = rminres(A, b, rtol=1e-5)
    assert np.linalg.norm(A @ res.x - b) <= 1e-5 * np.linalg.norm(b)


def test_x0_is_used():
    A, b = sample_problem()
    x0 = np.random.default_rng(12345).random(10)
    first = []
    rminres(A, b, x0=x0, callback=lambda xk: first.append(xk.copy()))
    plain = []
    rminres(A, b, callback=lambda xk: plain.append(xk.copy()))
    assert not np.array_equal(first[0], plain[0])


@pytest.mark.parametrize("shift", [0.5, -2.0])
def test_shift_solves_the_shifted_system(shift):
    A, b = sample_problem()
    As = A - shift * np.eye(10)
    res = rminres(A, b, shift=shift, rtol=1e-10)
    assert res.converged
    # ‖x − x*‖ ≤ κ(A − σI)·‖r‖/‖b‖·‖x*‖ with ‖r‖ ≤ 1e-10‖b‖ (the status checked the true
    # residual); the iteration count may differ by one from a solve with the explicit
    # matrix, whose products round differently
    exact = np.linalg.solve(As, b)
    bound = np.linalg.cond(As) * 1e-10 * np.linalg.norm(exact)
    assert np.linalg.norm(res.x - exact) <= bound
    assert np.linalg.norm(b - As @ res.x) <= 1e-10 * np.linalg.norm(b)


def test_asymmetric_operator_fails_the_check():
    A, b = sample_problem()
    A[1, 2], A[2, 1] = 1.0, 2.0
    with pytest.raises(ValueError, match="not symmetric"):
        rminres(A, b, check=True)
    rminres(A + A.T, b, check=True)  # a symmetric one passes


def test_asymmetric_preconditioner_fails_the_check():
    A, b = sample_problem()
    M = np.eye(10)
    M[0, 1] = 1.0
    with pytest.raises(ValueError, match="preconditioner M is not symmetric"):
        rminres(A, b, M=M, check=True)


def test_non_default_x0():
    A, b = sample_problem()
    x0 = np.random.default_rng(1).random(10)
    res = rminres(A, b, x0=x0, rtol=1e-10)
    assert np.linalg.norm(A @ res.x - b) <= 1e-10 * np.linalg.norm(b) * 1.01  # as above


def test_preconditioned_non_default_x0():
    A, b = sample_problem()
    M = spd_preconditioner(A)
    x0 = np.random.default_rng(2).random(10)
    res = rminres(A, b, x0=x0, M=M, rtol=1e-10)
    assert res.converged and res.preconditioner_passes == res.iterations + 2
    # the rule holds in the M-norm: ‖r‖_M ≤ 1e-10 ‖b‖_M (the true residual, rechecked)
    r = b - A @ res.x
    assert np.sqrt(r @ M @ r) <= 1e-10 * np.sqrt(b @ M @ b) * (1 + 1e-6)


def test_preconditioned_exact_x0_takes_no_iteration():
    A, b = sample_problem()
    x = np.linalg.solve(A, b)
    res = rminres(A, b, x0=x, M=spd_preconditioner(A), rtol=1e-8)
    assert res.iterations == 0 and res.converged
    np.testing.assert_array_equal(res.x, x)


@pytest.mark.parametrize("kind", ["spd", "indefinite"])
@pytest.mark.parametrize("k", [1, 5, 25])
def test_preconditioned_iterate_after_k_steps_matches_scipy(kind, k):
    n = 120
    A = spd(n, 1e3, seed=4) if kind == "spd" else indefinite(n, 1e3, seed=5)
    M = spd_preconditioner(A, seed=k)
    rng = np.random.default_rng(k)
    b, x0 = rng.standard_normal(n), rng.standard_normal(n)
    reference, _ = spla.minres(A, b, x0=x0, M=M, maxiter=k, rtol=1e-300)
    res = rminres(A, b, x0=x0, M=M, rtol=0.0, maxiter=k)
    assert res.iterations == k and res.status is Status.MAXITER
    assert np.linalg.norm(res.x - reference) <= 1e-8 * np.linalg.norm(reference)


def test_preconditioner_on_a_batch_equals_each_alone():
    A = spd(60, 1e3, seed=6)
    M = spd_preconditioner(A, seed=7)
    b = np.random.default_rng(8).standard_normal((3, 60))
    together = rminres(A, b, M=M, rtol=1e-8)
    for j in range(3):
        alone = rminres(A, b[j], M=M, rtol=1e-8)
        assert alone.iterations == together.iterations[j]
        np.testing.assert_allclose(together.x[j], alone.x, rtol=1e-10, atol=1e-12)
