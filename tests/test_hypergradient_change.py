"""The ``hypergradient_change`` stopping rule against dense oracles (numpy solves)."""

from __future__ import annotations

from functools import partial
from operator import matmul

import numpy as np
import pytest

from framework.krylov import rminres
from framework.krylov.recycle import RecycleConfig, Recycler
from framework.krylov.sequence import LinearSystem, solve_sequence
from framework.krylov.stopping import HypergradientChangeRule, StopConfig

N, P, K = 80, 4, 4


def drifting_problem(count: int, seed: int = 0, smallest: float = 1e-3):
    """SPD H_t = Q diag(λ) Qᵀ + t·δ·I (λ from ``smallest`` to 1: slow MINRES), g_t
    drifting, J dense (n × p) with most weight on the small-λ eigenvectors (hard for NSC)."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((N, N)))
    lam = np.geomspace(smallest, 1.0, N)
    J = Q[:, :P] @ rng.standard_normal((P, P)) + 0.1 * rng.standard_normal((N, P))
    g0, e = rng.standard_normal(N), rng.standard_normal(N)
    mats = [Q @ np.diag(lam + 2e-4 * t) @ Q.T for t in range(count)]
    return mats, [g0 + 0.05 * t * e for t in range(count)], J


def relative_error(J, w, w_star):
    return np.linalg.norm(J.T @ (w - w_star)) / np.linalg.norm(J.T @ w_star)


@pytest.mark.parametrize("tol", [1e-3, 1e-5])
def test_stops_with_the_true_hypergradient_error_below_the_tolerance(backend, tol):
    """A recycled, warm-started sequence with the preset's safety 2 (conf/stop): at every
    stop the dense error ‖Jᵀ(w − w*)‖/‖Jᵀw*‖ is ≤ tol, and the Jᵀ count is exactly one per
    check plus the NSC set-up."""
    mats, rhs, J = drifting_problem(5)
    Jt = backend.asarray(J.T)
    systems = [LinearSystem(H=partial(matmul, backend.asarray(A)), g=backend.asarray(g),
                            jac_t=partial(matmul, Jt),
                            reference=backend.asarray(-J.T @ np.linalg.solve(A, g)))
               for A, g in zip(mats, rhs, strict=True)]
    res = solve_sequence(systems, recycle=RecycleConfig("ritz", K),
                         stop=StopConfig("hypergradient_change", rtol=tol, safety=2.0))
    errors = [r.hg_error for r in res.records]
    assert max(errors) <= tol
    for r in res.records:
        # the rule: one Jᵀ per check (iterations, + 1 for a warm start x₀ ≠ 0), the NSC
        # set-up JᵀU (k), the final −Jᵀw (1)
        warm = 1 if r.index else 0
        assert r.jac_t == r.iterations + warm + (K if r.recycle_dim else 0) + 1
        assert 0 < r.hg_error_estimate <= tol
    # NSC on the same sequence stops earlier with errors above tol: what the rule fixes
    nsc = solve_sequence(systems, recycle=RecycleConfig("ritz", K),
                         stop=StopConfig("hypergradient", rtol=tol))
    assert max(r.hg_error for r in nsc.records) > tol
    assert nsc.iterations < res.iterations


def test_estimate_follows_the_dense_error_per_iteration(backend):
    """Per iteration of one warm-started recycled solve, the rule's estimate against the
    dense error of the same iterate: never below a third of it (inf until the window's two
    rates exist, k ≥ 3), and the estimate at the stop is ≤ rtol."""
    mats, rhs, J = drifting_problem(2)
    H0, H1 = (backend.asarray(A) for A in mats)
    g0, g1 = (backend.asarray(g) for g in rhs)
    jac_t = lambda V: backend.asarray(J.T) @ V  # noqa: E731
    recycler = Recycler(RecycleConfig("ritz", K))
    first = rminres(H0, g0, rtol=1e-8, harvest=recycler.harvester(None))
    space = recycler.prepare(recycler.carry_after(first, None), lambda V: H1 @ V, jac_t,
                             like=g1)
    rows = lambda W: (backend.asarray(J.T) @ W[0, ...])[None, ...]  # noqa: E731
    rule = StopConfig("hypergradient_change", rtol=1e-6).rule(space.promoted(), rows,
                                                              g1[None, :])
    assert isinstance(rule, HypergradientChangeRule)
    iterates = [first.x]
    res = rminres(H1, g1, x0=first.x, recycle=space, stop=rule, callback=iterates.append)
    w_star = np.linalg.solve(mats[1], rhs[1])
    true = np.array([relative_error(J, backend.to_numpy(w), w_star) for w in iterates[1:]])
    est = np.array([float(backend.to_numpy(e)[0]) for e in rule.estimates[1:]])
    assert len(true) == len(est) == res.iterations > 2
    assert np.all(est[1:] >= true[1:] / 3)
    assert est[-1] <= 1e-6 and true[-1] <= 1e-6


def test_batch_rows_stop_as_each_alone(backend):
    """B = 3 right-hand sides: each row stops at the iteration it stops at alone, and Jᵀ
    is applied only to rows still running."""
    mats, rhs, J = drifting_problem(1, smallest=0.05)  # well below n iterations: no ties
    H = backend.asarray(mats[0])
    G = backend.asarray(np.stack([rhs[0], 0.1 * rhs[0] + np.ones(N), J[:, 0]]))
    applied = []

    def jac_t(W):
        applied.append(int(np.sum(np.any(backend.to_numpy(W) != 0, axis=-1))))
        return W @ backend.asarray(J)

    stop = StopConfig("hypergradient_change", rtol=1e-4)
    together = rminres(H, G, stop=stop.rule(None, jac_t, G))
    alone = [rminres(H, G[i, :], stop=stop.rule(None, jac_t, G[i, :][None, :]))
             for i in range(3)]
    assert together.iterations == tuple(a.iterations for a in alone)
    assert len(set(together.iterations)) > 1  # the rows do stop apart
    # x₀ = 0: check 0 applies nothing; then one per row until its stop
    per_check = applied[: max(together.iterations)]  # the batch's calls
    assert per_check == [sum(i >= k for i in together.iterations)
                         for k in range(1, max(together.iterations) + 1)]


@pytest.mark.parametrize("window", [1, 2, 3])
def test_estimate_is_the_tail_formula_on_dense_iterates(backend, window):
    """Without a recycle space E_k = q_k/(1 − q_k)·Δ_k, q_k the largest of the last
    ``window`` ratios max(‖r_j‖/‖r_{j−1}‖, Δ_j/Δ_{j−1}), j ≥ 2: recomputed in numpy from
    the iterates with true residuals ‖g − Hw_j‖ and Δ_j = ‖Jᵀ(w_j − w_{j−1})‖ — equal to
    1e-8 relative (the recurrence and true residual norms differ by ~κ·eps·‖g‖/‖r_k‖ ≤ 1e-11
    here); inf before k = window + 1 and where q_k ≥ 1; the solve stops at the first k
    with E_k ≤ rtol·‖Jᵀw_k‖."""
    mats, rhs, J = drifting_problem(1, smallest=0.05)
    H, g = backend.asarray(mats[0]), backend.asarray(rhs[0])
    rows = lambda W: W @ backend.asarray(J)  # noqa: E731
    rule = StopConfig("hypergradient_change", rtol=1e-5, window=window).rule(
        None, rows, g[None, :])
    iterates = [np.zeros(N)]
    res = rminres(H, g, stop=rule,  # a copy: without recycling x is updated in place
                  callback=lambda x: iterates.append(np.array(backend.to_numpy(x))))
    h = np.array([J.T @ w for w in iterates])
    r = np.array([np.linalg.norm(rhs[0] - mats[0] @ w) for w in iterates])
    step = np.r_[np.inf, np.linalg.norm(np.diff(h, axis=0), axis=1)]
    ratio = np.r_[np.nan, np.nan, np.maximum(r[2:] / r[1:-1], step[2:] / step[1:-1])]
    dense = np.full(len(iterates), np.inf)
    for k in range(window + 1, len(iterates)):
        q = ratio[k - window + 1: k + 1].max()
        if q < 1:
            dense[k] = q / (1 - q) * step[k] / np.linalg.norm(h[k])
    est = np.array([float(backend.to_numpy(e)[0]) for e in rule.estimates])
    assert len(est) == len(iterates) == res.iterations + 1
    assert np.array_equal(np.isinf(est), np.isinf(dense))
    finite = np.isfinite(dense)
    np.testing.assert_allclose(est[finite], dense[finite], rtol=1e-8)
    assert res.iterations == int(np.argmax(dense <= 1e-5)) > window


@pytest.mark.parametrize("window", [0, 1.5])
def test_bad_window_is_one_clear_error(window):
    with pytest.raises(ValueError, match="^window must be an integer >= 1"):
        StopConfig("hypergradient_change", window=window)
