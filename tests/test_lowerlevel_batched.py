"""lbfgs_batched against the unbatched lbfgs, sample by sample."""

from __future__ import annotations

import array_api_compat
import numpy as np
import pytest

from framework.lowerlevel import LowerLevelStatus, lbfgs
from framework.lowerlevel_batched import lbfgs_batched
from problems.foe import FieldsOfExperts, dct_filters, initial_theta
from problems.imaging import ImagingProblem
from problems.operators import Inpainting

N = 12


class RowProblems:
    """f_i(x) = ½ Σ_j c_ij (x_j − a_ij)² + ¼ β_i Σ_j x_j⁴ + Rosenbrock coupling, row-wise."""

    def __init__(self, backend, kappas, *, flip=()) -> None:
        rng = np.random.default_rng(0)
        b = len(kappas)
        c = np.stack([np.logspace(0, np.log10(k), N) for k in kappas])
        self.xp = backend.xp
        self.C = backend.asarray(c[:, rng.permutation(N)])
        self.A = backend.asarray(rng.standard_normal((b, N)))
        self.beta = backend.asarray(np.linspace(0.1, 1.0, b)[:, None])
        sign = np.ones((b, 1))
        sign[list(flip), 0] = -1.0  # a wrong gradient: the line search must fail
        self.sign = backend.asarray(sign)

    def fun(self, X, rows=slice(None)):
        xp = self.xp
        r = X - self.A[rows, :]
        ros = 0.5 * (X[:, 1:] - X[:, :-1] ** 2) ** 2
        val = 0.5 * self.C[rows, :] * r * r + 0.25 * self.beta[rows, :] * X**4
        return xp.sum(val, axis=1) + xp.sum(ros, axis=1)

    def grad(self, X, rows=slice(None)):
        xp = self.xp
        d = X[:, 1:] - X[:, :-1] ** 2
        g = self.C[rows, :] * (X - self.A[rows, :]) + self.beta[rows, :] * X**3
        z = xp.zeros((X.shape[0], 1), dtype=X.dtype, device=X.device)
        g = g + xp.concat([z, d], axis=1) - xp.concat([2.0 * X[:, :-1] * d, z], axis=1)
        return self.sign[rows, :] * g

    def single(self, i):
        rows = slice(i, i + 1)
        return (
            lambda x: self.fun(x[None, :], rows)[0],
            lambda x: self.grad(x[None, :], rows)[0, :],
        )


OPTS = dict(gtol=1e-6, maxiter=500, memory=5)


def check_against_unbatched(backend, res, fun_i, X0, failing=()):
    xp = backend.xp
    Xb = backend.to_numpy(res.X)
    for i in range(Xb.shape[0]):
        fun, grad = fun_i(i)
        ref = lbfgs(fun, grad, X0[i, :], **OPTS)
        assert res.status[i] is ref.status, (i, res.message[i], ref.message)
        xr = backend.to_numpy(ref.x)
        assert np.linalg.norm(Xb[i] - xr) <= 1e-8 * max(1.0, np.linalg.norm(xr)), i
        if i not in failing:
            assert res.iterations[i] == ref.iterations
            assert res.sample_f_evals[i] == ref.f_evals
    return xp


def test_matches_unbatched_and_freezes(backend) -> None:
    probs = RowProblems(backend, [1.0, 1e2, 1e3, 3.0])
    X0 = backend.asarray(np.random.default_rng(1).standard_normal((4, N)))
    res = lbfgs_batched(probs.fun, probs.grad, X0, **OPTS)
    assert res.all_converged
    assert array_api_compat.device(res.X) == array_api_compat.device(X0)
    its = res.iterations
    assert max(its) >= 3 * min(its)  # samples converge at very different iterations
    check_against_unbatched(backend, res, probs.single, X0)
    # one batched call per line-search round: the slowest sample sets the pace
    assert max(res.sample_f_evals) <= res.f_evals < sum(res.sample_f_evals)
    # host transfers, none per sample: one per round of evaluations (f with ‖∇f‖ at x0,
    # f with the slopes in a line search) and two per iteration (the new direction's
    # slopes; sᵀy with ‖∇f‖)
    assert res.host_reads == res.f_evals + 2 * max(its)


def test_row_subsets_evaluate_only_searching_samples(backend) -> None:
    probs = RowProblems(backend, [1.0, 1e2, 1e3, 3.0])
    X0 = backend.asarray(np.random.default_rng(1).standard_normal((4, N)))
    seen = []

    def rows_value_and_grad(X, rows):
        seen.append(tuple(int(r) for r in rows))
        assert X.shape == (len(rows), N)
        index = backend.xp.asarray(rows, dtype=backend.xp.int64, device=X.device)

        def pick(a):
            return backend.xp.take(a, index, axis=0)

        sub = RowProblems.__new__(RowProblems)
        sub.xp, sub.C, sub.A = probs.xp, pick(probs.C), pick(probs.A)
        sub.beta, sub.sign = pick(probs.beta), pick(probs.sign)
        return sub.fun(X), sub.grad(X)

    res = lbfgs_batched(probs.fun, probs.grad, X0, rows_value_and_grad=rows_value_and_grad,
                        **OPTS)
    assert res.all_converged
    check_against_unbatched(backend, res, probs.single, X0)
    # evaluations skip finished samples: the rows evaluated are exactly the samples' own
    per_sample = np.zeros(4, dtype=int)
    for rows in seen:
        per_sample[list(rows)] += 1
    assert per_sample.tolist() == list(res.sample_f_evals)
    assert min(len(r) for r in seen) < 4 and sum(map(len, seen)) == sum(res.sample_f_evals)


def test_failing_sample_does_not_stop_others(backend) -> None:
    probs = RowProblems(backend, [10.0, 1e3, 5.0], flip=(1,))
    X0 = backend.asarray(np.random.default_rng(2).standard_normal((3, N)))
    res = lbfgs_batched(probs.fun, probs.grad, X0, **OPTS)
    assert res.status[1] is LowerLevelStatus.LINESEARCH_FAILED
    assert not res.converged[1] and res.converged[0] and res.converged[2]
    Xb = backend.to_numpy(res.X)
    # a failed line search never moves the row past an increase of f
    assert res.f[1] <= float(backend.to_numpy(probs.fun(X0))[1])
    assert np.all(np.isfinite(Xb))
    check_against_unbatched(backend, res, probs.single, X0, failing=(1,))


def test_nonfinite_start_and_maxiter() -> None:
    from backends import get_backend

    be = get_backend("numpy")
    probs = RowProblems(be, [1.0, 1e4, 2.0])
    X0 = np.random.default_rng(3).standard_normal((3, N))
    X0[0, 0] = np.nan
    res = lbfgs_batched(probs.fun, probs.grad, X0, gtol=1e-10, maxiter=5)
    assert res.status[0] is LowerLevelStatus.NONFINITE
    assert res.status[1] is LowerLevelStatus.MAXITER and res.iterations[1] == 5
    assert np.isnan(res.X[0, 0]) and np.all(np.isfinite(res.X[1:]))
    with pytest.raises(ValueError, match="X0"):
        lbfgs_batched(probs.fun, probs.grad, X0[0])
    with pytest.raises(ValueError, match="memory"):
        lbfgs_batched(probs.fun, probs.grad, X0, memory=0)


def test_imaging_batch_matches_per_sample(backend) -> None:
    shape = (8, 8)
    rng = np.random.default_rng(4)
    reg = FieldsOfExperts(shape, 3, 8, expert="lorentzian")
    problems = [
        ImagingProblem.from_image(
            rng.random(shape), backend, Inpainting(shape, 0.3, seed=i), reg,
            noise_level=0.05, seed=i,
        )
        for i in range(3)
    ]
    batch = ImagingProblem.concat(problems)
    theta = backend.asarray(initial_theta(dct_filters(3), -1.0))
    # gtol 1e-7: at ‖∇f‖ ≈ 1e-9 f's decrease (≈ ‖∇f‖²/λ) falls below its rounding and the
    # line search stalls, whichever summation order the kernels use
    gtol = 1e-7
    res = lbfgs_batched(
        lambda X: batch.lower_objective(X, theta), lambda X: batch.lower_grad(X, theta),
        batch.Y, gtol=gtol, maxiter=300,
    )
    assert res.all_converged
    c = batch.counter.snapshot()
    assert c.f_evals == 3 * res.f_evals and c.grad_evals == 3 * res.grad_evals
    Xb = backend.to_numpy(res.X)
    for i, pr in enumerate(problems):
        ref = lbfgs(
            lambda x, pr=pr: pr.lower_objective(x, theta), lambda x, pr=pr: pr.lower_grad(x, theta),
            pr.y, gtol=gtol, maxiter=300,
        )
        xr = backend.to_numpy(ref.x)
        # both within gtol/λmin(H) of the minimiser (H the dense Hessian at it, one block pass)
        eye = backend.asarray(np.eye(pr.n))
        lam_min = np.linalg.eigvalsh(backend.to_numpy(pr.hvp(ref.x, theta, eye)))[0]
        assert ref.converged and np.linalg.norm(Xb[i] - xr) <= 2 * gtol / lam_min
