"""Batched recycling over sequences equals the per-sample recycled path."""

from __future__ import annotations

import numpy as np
import pytest

from framework.krylov.batched import rminres_batched
from framework.krylov.batched_recycle import BatchedRecycler, space_from_products
from framework.krylov.recycle import RecycleConfig, Recycler
from framework.krylov.sequence import recycled_solve
from framework.krylov.stopping import StopConfig
from problems.sequences import drifting_sequence, laplacian_2d

SIDE, T, B = 12, 4, 3


def batched_ops(be, seqs, t):
    diags = be.asarray(np.stack([s.diagonals[t] for s in seqs]))
    Js = be.asarray(np.stack([s.J for s in seqs]))  # (B, n, p)
    xp = be.xp

    def H(V):
        if V.ndim == 2:
            return xp.stack([laplacian_2d(V[i, ...], SIDE) for i in range(V.shape[0])]) + diags * V
        out = xp.stack([laplacian_2d(V[i, ...], SIDE) for i in range(V.shape[0])])
        return out + diags[:, :, None] * V

    def JT(W):
        return xp.matrix_transpose(Js) @ W

    return H, JT


@pytest.mark.parametrize("strategy, cap", [("ritz", None), ("harmonic_ritz", None),
                                           ("rgen_right", None), ("ritz", 6),
                                           ("rgen_right", 6)])
def test_batched_sequence_equals_per_sample(backend, strategy, cap):
    seqs = [drifting_sequence(side=SIDE, count=T, seed=s, p=6, drift=1e-2) for s in range(B)]
    cfg = RecycleConfig(strategy, 4, max_vectors=cap)
    rtol = 1e-8
    # per-sample reference
    ref_iters, ref_x = [], []
    for s in seqs:
        systems = s.systems(backend, with_jacobian=True)
        rec, carry, w, its, xs = Recycler(cfg), None, None, [], []
        for sys_ in systems:
            out = recycled_solve(sys_.H, sys_.g, recycler=rec, carry=carry, x0=w,
                                 jac_t=sys_.jac_t, stop=StopConfig(rtol=rtol))
            carry, w = out.carry, out.result.x
            its.append(out.result.iterations)
            xs.append(backend.to_numpy(w))
        ref_iters.append(its)
        ref_x.append(xs)
    # batched
    recycler = BatchedRecycler(cfg)
    carry, X = None, None
    for t in range(T):
        H, JT = batched_ops(backend, seqs, t)
        g = backend.asarray(np.stack([s.rhs[t] for s in seqs]))
        space = recycler.prepare(carry, H)
        res = rminres_batched(H, g, x0=X, recycle=space, rtol=rtol, check_every=4,
                              harvest=recycler.harvester(JT))
        carry, X = res.harvest, res.x
        assert list(res.iterations) == [ref_iters[i][t] for i in range(B)], t
        Xh = backend.to_numpy(X)
        for i in range(B):
            assert np.linalg.norm(Xh[i] - ref_x[i][t]) <= 1e-10 * np.linalg.norm(ref_x[i][t])
    assert min(min(r[1:]) for r in ref_iters) < min(r[0] for r in ref_iters)  # recycling helps


def test_space_from_products_pads_with_zero_columns():
    rng = np.random.default_rng(0)
    n = 20
    A = np.stack([np.diag(np.linspace(1, 2, n)), np.diag(np.linspace(1, 3, n))])
    Y = rng.standard_normal((2, n, 3))
    Y[1, :, 2] = 0.0  # a padding column
    space = space_from_products(Y, A @ Y)
    C, U = space.C, space.U
    np.testing.assert_allclose(A @ U, C, atol=1e-12)
    np.testing.assert_allclose(C[0].T @ C[0], np.eye(3), atol=1e-12)
    norms = np.linalg.norm(C[1], axis=0)
    assert sorted(np.round(norms, 12)) == [0.0, 1.0, 1.0]


def test_batched_rejects_unsupported_modes():
    with pytest.raises(ValueError, match="oracles"):
        BatchedRecycler(RecycleConfig("eig", 3))
    recycler = BatchedRecycler(RecycleConfig("ritz", 3, selection="outer"))
    with pytest.raises(ValueError, match="inner selection"):
        recycler.harvester()


@pytest.mark.parametrize("strategy", ["ritz", "harmonic_ritz", "rgen_right", "rgen_left",
                                      "rgen_both"])
@pytest.mark.parametrize("which", ["small", "large", "mix"])
def test_select_batched_equals_per_sample_select(backend, strategy, which):
    import scipy.linalg as sla

    from framework.krylov.batched_selection import select_batched
    from framework.krylov.selection import Projection, select

    rng = np.random.default_rng(0)
    Bn, n, D, p, k = 4, 50, 16, 20, 6
    counts = [16, 10, 5, 13]  # sample 2 has fewer valid columns than k
    W = rng.standard_normal((Bn, n, D))
    HW, JW = np.zeros_like(W), np.zeros((Bn, p, D))
    valid = np.zeros((Bn, D), dtype=bool)
    for i in range(Bn):
        Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        ev = np.logspace(-2, 1, n)
        if i == 1:
            ev[::3] *= -1  # indefinite
        HW[i] = ((Q * ev) @ Q.T) @ W[i]
        JW[i] = rng.standard_normal((p, n)) @ W[i]
        valid[i, : counts[i]] = True
    valid[3, 2] = False  # a padding column in the middle
    U = backend.to_numpy(select_batched(backend.asarray(W), backend.asarray(HW),
                                        backend.asarray(JW), backend.asarray(valid),
                                        strategy, k, which))
    for i in range(Bn):
        cols = np.nonzero(valid[i])[0]
        proj = Projection.from_products(W[i][:, cols], HW[i][:, cols], JW[i][:, cols])
        ref = W[i][:, cols] @ select(proj, strategy, k, which)
        ours = U[i][:, np.linalg.norm(U[i], axis=0) > 0]
        assert ours.shape[1] == ref.shape[1] == min(k, len(cols))
        assert np.max(sla.subspace_angles(ours, ref)) < 1e-8
