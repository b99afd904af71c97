"""Recycled MINRES in the preconditioned inner product (M = LLᵀ ≈ A⁻¹) against dense
computations of the same method on Â = LᵀAL: iterates, the harvest's projected matrices,
counts, the M-orthonormal recycle space and the M-norm residual a converged solve claims."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sla

from backends import get_backend
from backends.counting import Counter, CountingOperator
from framework.krylov import RecycleSpace, rminres
from framework.krylov.recycle import RecycleConfig, RecycleHarvester, Recycler
from problems.datasets import load_embedded_mnist
from problems.foe import dct_filters, initial_theta
from problems.preconditioners import fft_preconditioner
from tests.test_preconditioner import mnist_deblurring


def system(n: int, seed: int, *, indefinite: bool, missed: int = 0
           ) -> tuple[np.ndarray, np.ndarray]:
    """A symmetric A (eigenvalues ±[1e-2, 10]) and an SPD M ≈ |A|⁻¹ that helps but is not
    exact (|A| plus a random SPD perturbation, inverted); M misses the ``missed`` smallest
    eigenvalues (takes them as 1), which Â = LᵀAL then keeps near 1e-2."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    ev = np.logspace(-2, 1, n)
    if indefinite:
        ev[::3] *= -1
    E = rng.standard_normal((n, n)) * 0.1 / np.sqrt(n)
    seen = np.abs(ev)
    seen[:missed] = 1.0
    P = (Q * seen) @ Q.T + E @ E.T
    M = np.linalg.inv(P)
    return (Q * ev) @ Q.T, (M + M.T) / 2


def operators(backend, A: np.ndarray, M: np.ndarray, counter: Counter):
    """Counted 1-D operators (also on (n, k) blocks) for A and M on ``backend``."""
    n = A.shape[0]
    Ad, Md = backend.asarray(A), backend.asarray(M)
    Aop = CountingOperator(lambda v: Ad @ v, n, counter=counter, kind="hvp")
    Mop = CountingOperator(lambda v: Md @ v, n, counter=counter, kind="jac_t")  # M's tally
    return Aop, Mop


def dense_rminres(A, M, b, x0, Y, k):
    """The preconditioned RMINRES iterate after k steps, densely: on Â = LᵀAL the minimal
    residual over x̂₀ + span(Û) + K_k((I − ĈĈᵀ)Â, (I − ĈĈᵀ)r̂₀) with Û = L⁻¹MY = LᵀY,
    Ĉ = ÂÛ (an orthonormal Krylov basis by twice-repeated Gram–Schmidt, a least-squares
    solve), mapped back by x = L x̂."""
    L = np.linalg.cholesky(M)
    Ah, bh, xh0 = L.T @ A @ L, L.T @ b, np.linalg.solve(L, x0)
    Uh = L.T @ Y
    Ch = np.linalg.qr(Ah @ Uh)[0]
    P = np.eye(len(b)) - Ch @ Ch.T
    r0 = bh - Ah @ xh0
    basis = [P @ r0 / np.linalg.norm(P @ r0)]
    for _ in range(k - 1):
        w = P @ Ah @ basis[-1]
        for _ in range(2):
            for q in basis:
                w -= (q @ w) * q
        basis.append(w / np.linalg.norm(w))
    W = np.column_stack([Uh, *basis])
    coef = np.linalg.lstsq(Ah @ W, r0, rcond=None)[0]
    return L @ (xh0 + W @ coef)


@pytest.mark.parametrize("indefinite", [False, True])
@pytest.mark.parametrize("k", [1, 5, 12])
def test_iterate_after_k_steps_equals_the_dense_method(backend, indefinite, k):
    n, dim = 60, 4
    A, M = system(n, 1, indefinite=indefinite)
    rng = np.random.default_rng(2)
    b, x0, Y = rng.standard_normal(n), rng.standard_normal(n), rng.standard_normal((n, dim))
    counter = Counter()
    Aop, Mop = operators(backend, A, M, counter)
    space = RecycleSpace.from_basis(Aop, backend.asarray(Y), M=Mop)
    res = rminres(Aop, backend.asarray(b), x0=backend.asarray(x0), recycle=space,
                  M=backend.asarray(M), rtol=0.0, maxiter=k, true_residual=False)
    assert res.iterations == k
    reference = dense_rminres(A, M, b, x0, Y, k)
    x = backend.to_numpy(res.x)
    # k ≤ 12 steps of short recurrences on κ(Â) ≲ 1e2 lose ~kκε ≈ 1e-13 of x
    np.testing.assert_allclose(x, reference, rtol=0, atol=1e-10 * np.linalg.norm(reference))
    # the estimate is the M-norm residual of the iterate (its minimum over the space)
    r = b - A @ x
    assert res.residual_norm == pytest.approx(np.sqrt(r @ M @ r), rel=1e-8)


def test_recycle_space_is_m_orthonormal_and_spans_my(backend):
    n, dim = 50, 5
    A, M = system(n, 3, indefinite=True)
    Y = np.random.default_rng(4).standard_normal((n, dim))
    counter = Counter()
    Aop, Mop = operators(backend, A, M, counter)
    space = RecycleSpace.from_basis(Aop, backend.asarray(Y), M=Mop)
    assert (counter.snapshot().hvp, counter.snapshot().jac_t) == (dim, 2 * dim)  # k A, 2k M
    U, C = backend.to_numpy(space.U), backend.to_numpy(space.C)
    MC, MinvU = backend.to_numpy(space.MC), backend.to_numpy(space.MinvU)
    np.testing.assert_allclose(C.T @ M @ C, np.eye(dim), atol=1e-12)  # two passes: to ε
    np.testing.assert_allclose(C, A @ U, atol=1e-12 * np.abs(C).max())
    np.testing.assert_allclose(MC, M @ C, atol=1e-12 * np.abs(MC).max())
    np.testing.assert_allclose(M @ MinvU, U, atol=1e-12 * np.abs(U).max())
    assert np.max(sla.subspace_angles(U, M @ Y)) < 1e-10
    space.validate(lambda V: V @ backend.asarray(A))  # rows (1, n): A symmetric
    np.testing.assert_array_equal(backend.to_numpy(space.basis), MinvU)


def test_spaces_and_preconditioners_must_match_before_any_work(backend):
    n = 20
    A, M = system(n, 5, indefinite=False)
    Y = backend.asarray(np.random.default_rng(6).standard_normal((n, 2)))
    Ad, Md, b = backend.asarray(A), backend.asarray(M), backend.asarray(np.ones(n))
    calls = []

    def op(v):
        calls.append(1)
        return Ad @ v

    plain = RecycleSpace.from_basis(lambda V: Ad @ V, Y)
    preconditioned = RecycleSpace.from_basis(lambda V: Ad @ V, Y, M=lambda V: Md @ V)
    with pytest.raises(ValueError, match="without the preconditioner"):
        rminres(op, b, M=Md, recycle=plain)
    with pytest.raises(ValueError, match="no M is given"):
        rminres(op, b, recycle=preconditioned)
    assert not calls


def harvested_projection(backend, *, indefinite: bool, max_vectors=None, m=20):
    """One preconditioned recycled solve with a harvester that captures W and its
    projected matrices before the final selection, and the counts around that capture."""
    n, dim = 90, 5
    A, M = system(n, 7, indefinite=indefinite)
    rng = np.random.default_rng(8)
    counter = Counter()
    Aop, Mop = operators(backend, A, M, counter)
    space = RecycleSpace.from_basis(Aop, backend.asarray(rng.standard_normal((n, dim))), M=Mop)
    harvester = RecycleHarvester(RecycleConfig("ritz", dim, max_vectors=max_vectors))
    captured = {}
    finish = harvester.finish

    def capture_then_finish():
        before = counter.snapshot()
        captured["projection"] = harvester.projection()
        captured["counts"] = before, counter.snapshot()
        return finish()

    harvester.finish = capture_then_finish
    start = counter.snapshot()
    res = rminres(Aop, backend.asarray(rng.standard_normal(n)), recycle=space, M=Mop,
                  rtol=0.0, maxiter=m, harvest=harvester, true_residual=False)
    W, proj = captured["projection"]
    return A, M, res, backend.to_numpy(W[0, ...]), proj, captured["counts"], start, counter


@pytest.mark.parametrize("indefinite", [False, True])
def test_projected_matrices_equal_the_dense_computation(backend, indefinite):
    A, M, res, W, proj, (before, after), start, counter = harvested_projection(
        backend, indefinite=indefinite)
    assert after == before  # the projection costs no application of A or M
    assert W.shape == (90, 5 + 20)
    Minv = np.linalg.inv(M)
    # those of Â = LᵀAL on Ŵ = L⁻¹W: ŴᵀŴ = WᵀM⁻¹W, ŴᵀÂŴ = WᵀAW, (ÂŴ)ᵀ(ÂŴ) = (AW)ᵀM(AW)
    for name, dense in (("gram", W.T @ Minv @ W), ("G", W.T @ A @ W),
                        ("F", (A @ W).T @ M @ (A @ W))):
        got = backend.to_numpy(getattr(proj, name))[0]
        np.testing.assert_allclose(got, dense, rtol=0, atol=1e-10 * np.abs(dense).max(),
                                   err_msg=name)
    # the whole solve, harvest and selection included: one A and one M per iteration
    # beyond the start (M: ‖b‖_M and the start residual)
    total = counter.snapshot()
    assert total.hvp - start.hvp == res.iterations
    assert total.jac_t - start.jac_t == res.preconditioner_passes == res.iterations + 2


def test_compressed_harvest_selects_the_dense_ritz_vectors(backend):
    """With a cap s = 8 the harvest compresses [Z, V] every 8 steps; the final projected
    matrices still equal the dense ones on the compressed W, and the carried space is the
    dense Ritz choice of Â on that W (residual form: U = M · carry)."""
    A, M, res, W, proj, (before, after), start, counter = harvested_projection(
        backend, indefinite=True, max_vectors=8, m=20)
    assert after == before
    total = counter.snapshot()
    assert total.hvp - start.hvp == res.iterations  # compressions cost no application
    Minv = np.linalg.inv(M)
    gram, G = W.T @ Minv @ W, W.T @ A @ W
    np.testing.assert_allclose(backend.to_numpy(proj.gram)[0], gram, rtol=0,
                               atol=1e-10 * np.abs(gram).max())
    np.testing.assert_allclose(backend.to_numpy(proj.G)[0], G, rtol=0,
                               atol=1e-10 * np.abs(G).max())
    theta, Yd = sla.eigh(G, gram)
    chosen = W @ Yd[:, np.argsort(np.abs(theta))[:5]]
    carried = M @ backend.to_numpy(res.harvest.basis)
    assert np.max(sla.subspace_angles(carried, chosen)) < 1e-8


@pytest.mark.parametrize("selection", ["inner", "outer"])
def test_sequence_converges_in_the_m_norm_and_recycling_pays(backend, selection):
    """Slowly changing systems, fixed M that misses 6 small eigenvalues: every converged
    solve meets ‖r‖_M ≤ rtol‖b‖_M (checked on the returned x), and recycling 6 Ritz
    vectors (deflating what M leaves behind) saves iterations."""
    n, steps, rtol = 120, 4, 1e-8
    A, M = system(n, 9, indefinite=True, missed=6)
    b = np.random.default_rng(10).standard_normal(n)
    Md = backend.asarray(M)
    totals = {}
    for strategy in ("none", "ritz"):
        recycler = Recycler(RecycleConfig(strategy, 6 if strategy == "ritz" else 0,
                                          max_vectors=30, selection=selection))
        carry, total = None, 0
        for t in range(steps):
            At = A + 1e-3 * t * np.diag(np.cos(np.arange(n)))
            Ad = backend.asarray(At)
            space = recycler.prepare(carry, lambda V, Ad=Ad: Ad @ V,
                                     M=lambda V: Md @ V, like=backend.asarray(b))
            res = rminres(Ad, backend.asarray(b), M=Md, recycle=space, rtol=rtol,
                          harvest=recycler.harvester())
            carry = recycler.carry_after(res, space)
            r = b - At @ backend.to_numpy(res.x)
            assert res.converged
            assert np.sqrt(r @ M @ r) <= rtol * np.sqrt(b @ M @ b)
            total += res.iterations
        totals[strategy] = total
    assert totals["ritz"] < 0.8 * totals["none"], totals  # measured 145–146 vs 228


def test_a_batch_equals_each_sample_alone(backend):
    """Per-sample preconditioners and spaces in one batch: iterations exactly, x to 1e-10."""
    n, B = 40, 3
    pairs = [system(n, 20 + i, indefinite=i == 1) for i in range(B)]
    As = backend.asarray(np.stack([a for a, _ in pairs]))
    Ms = backend.asarray(np.stack([m for _, m in pairs]))
    rng = np.random.default_rng(11)
    b, Y = rng.standard_normal((B, n)), rng.standard_normal((B, n, 3))
    space = RecycleSpace.from_basis(lambda V: As @ V, backend.asarray(Y), M=lambda V: Ms @ V)
    together = rminres(As, backend.asarray(b), M=Ms, recycle=space, rtol=1e-9)
    for i in range(B):
        Ai, Mi = backend.asarray(pairs[i][0]), backend.asarray(pairs[i][1])
        alone = rminres(Ai, backend.asarray(b[i]), M=Mi, recycle=space.sample(i), rtol=1e-9)
        assert alone.iterations == together.iterations[i]
        np.testing.assert_allclose(backend.to_numpy(together.x)[i], backend.to_numpy(alone.x),
                                   rtol=0, atol=1e-10 * np.linalg.norm(backend.to_numpy(alone.x)))


def test_fft_preconditioner_applies_blocks_column_by_column():
    problem = mnist_deblurring(get_backend("numpy"), load_embedded_mnist().images[0])
    M = fft_preconditioner(problem, problem.Y, initial_theta(dct_filters(5), -3.0))
    V = np.random.default_rng(12).standard_normal((1, problem.n, 4))
    columns = np.stack([M(V[:, :, j]) for j in range(4)], axis=2)
    np.testing.assert_allclose(M(V), columns, rtol=0, atol=1e-14 * np.abs(columns).max())


def test_engine_recycles_with_the_fft_preconditioner():
    """Deblurring with weak experts over three outer steps, B = 2: FFT preconditioning
    with Ritz recycling gives the hypergradients of the plain solve (both at rtol 1e-10)
    with fewer Hessian applications once a space is carried."""
    from framework.bilevel.engine import BilevelEngine, EngineConfig
    from framework.krylov.stopping import StopConfig

    be = get_backend("numpy")
    images = load_embedded_mnist().images[:2]
    problems = [mnist_deblurring(be, img, i) for i, img in enumerate(images)]
    theta0 = initial_theta(dct_filters(5), -3.0)
    runs = {}
    for name, pre, recycle in (("plain", "none", RecycleConfig()),
                               ("both", "fft", RecycleConfig("ritz", 5))):
        engine = BilevelEngine(problems, EngineConfig(
            recycle=recycle, stop=StopConfig(rtol=1e-10), lower_gtol=1e-9,
            lower_maxiter=2000, lower_solver="newton_krylov", preconditioner=pre), backend=be)
        steps = []
        for t in range(3):  # the same θ path for both runs
            steps.append(engine.evaluate(be.asarray(theta0 * (1 + 0.01 * t))))
        runs[name] = steps
    for a, b in zip(runs["plain"], runs["both"], strict=True):
        assert np.linalg.norm(b.grad - a.grad) <= 1e-7 * np.linalg.norm(a.grad)
    last = [s.hvp for s in runs["plain"][-1].samples], [s.hvp for s in runs["both"][-1].samples]
    assert all(s.recycle_dim == 5 for s in runs["both"][-1].samples)
    assert all(p < 0.7 * q for p, q in zip(last[1], last[0], strict=True)), last
