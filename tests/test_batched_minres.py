"""Batched RMINRES equals the per-sample solver (iterates, iteration counts, statuses)."""

from __future__ import annotations

import numpy as np
import pytest
from array_api_compat import device as device_of

from framework.krylov import RecycleSpace, Status, rminres
from framework.krylov.batched import BatchedRecycleSpace, rminres_batched


def sample_matrices(B: int, n: int, seed: int = 0) -> np.ndarray:
    """B symmetric matrices with different conditioning (sample 1 indefinite), so the
    samples converge at very different iterations."""
    rng = np.random.default_rng(seed)
    mats = []
    for i in range(B):
        Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        ev = np.linspace(1.0, 1.5 + 6 * i, n)
        if i == 1:
            ev = np.linspace(1.0, 3.0, n)
            ev[::2] *= -1
        mats.append((Q * ev) @ Q.T)
    return np.stack(mats)


def batched_operator(be, mats: np.ndarray):
    Md = be.asarray(mats)

    def apply(V):
        if V.ndim == 2:
            return (Md @ V[..., None])[..., 0]
        return Md @ V

    return apply


def reference(mats, b, x0, spaces, **kw):
    out = []
    for i in range(mats.shape[0]):
        A = mats[i]
        out.append(rminres(lambda v, A=A: A @ v, b[i], x0=None if x0 is None else x0[i],
                           recycle=None if spaces is None else spaces[i], **kw))
    return out


@pytest.mark.parametrize("with_x0", [False, True])
@pytest.mark.parametrize("check_every", [1, 7])
def test_batched_equals_per_sample(backend, with_x0, check_every):
    B, n = 4, 80
    mats = sample_matrices(B, n)
    rng = np.random.default_rng(1)
    b = rng.standard_normal((B, n))
    # sample 3: b in a 3-dimensional invariant subspace → exact after 3 steps
    _, Q = np.linalg.eigh(mats[3])
    b[3] = Q[:, [0, 40, 79]] @ np.array([1.0, 2.0, -1.0])
    x0 = rng.standard_normal((B, n)) if with_x0 else None
    if with_x0:
        x0[3] = 0.0
    ref = reference(mats, b, x0, None, rtol=1e-9, maxiter=400)
    res = rminres_batched(batched_operator(backend, mats), backend.asarray(b),
                          x0=None if x0 is None else backend.asarray(x0), rtol=1e-9,
                          maxiter=400, check_every=check_every)
    x = backend.to_numpy(res.x)
    assert device_of(res.x) == backend.device
    assert res.iterations == tuple(r.iterations for r in ref)
    assert res.statuses == tuple(r.status for r in ref)
    assert res.matvecs == tuple(r.matvecs for r in ref)
    assert len(set(res.iterations)) >= 3  # very different convergence
    assert res.statuses[3] is Status.EXACT and res.iterations[3] == 3
    for i in range(B):
        assert np.linalg.norm(x[i] - ref[i].x) <= 1e-10 * np.linalg.norm(ref[i].x)
        assert res.residual_norms[i] == pytest.approx(ref[i].residual_norms[-1], rel=1e-8)
    # host syncs: one per check, never one per iteration when check_every > 1
    assert res.host_syncs <= max(res.iterations) // check_every + 2


def test_batched_with_recycling_equals_per_sample(backend):
    B, n, k = 3, 60, 5
    mats = sample_matrices(B, n, seed=2)
    rng = np.random.default_rng(3)
    b = rng.standard_normal((B, n))
    spaces = [RecycleSpace.from_basis(lambda V, A=mats[i]: A @ V, rng.standard_normal((n, k)))
              for i in range(B)]
    ref = reference(mats, b, None, spaces, rtol=1e-10, maxiter=300)
    U = np.stack([s.U for s in spaces])
    C = np.stack([s.C for s in spaces])
    res = rminres_batched(batched_operator(backend, mats), backend.asarray(b),
                          recycle=BatchedRecycleSpace(backend.asarray(U), backend.asarray(C)),
                          rtol=1e-10, maxiter=300, check_every=5)
    assert res.iterations == tuple(r.iterations for r in ref)
    x = backend.to_numpy(res.x)
    for i in range(B):
        assert np.linalg.norm(x[i] - ref[i].x) <= 1e-10 * np.linalg.norm(ref[i].x)


def test_zero_padding_columns_are_harmless():
    n, k = 40, 4
    mats = sample_matrices(2, n, seed=4)
    rng = np.random.default_rng(0)
    b = rng.standard_normal((2, n))
    space = RecycleSpace.from_basis(lambda V: mats[0] @ V, rng.standard_normal((n, k)))
    U = np.zeros((2, n, k + 2))
    C = np.zeros((2, n, k + 2))
    U[0, :, :k], C[0, :, :k] = space.U, space.C
    res = rminres_batched(batched_operator(__import__("backends").get_backend("numpy"), mats),
                          b, recycle=BatchedRecycleSpace(U, C), rtol=1e-10)
    ref0 = rminres(lambda v: mats[0] @ v, b[0], recycle=space, rtol=1e-10)
    ref1 = rminres(lambda v: mats[1] @ v, b[1], rtol=1e-10)
    assert res.iterations == (ref0.iterations, ref1.iterations)
    np.testing.assert_allclose(res.x[0], ref0.x, rtol=1e-10)


def test_maxiter_and_bad_input():
    mats = sample_matrices(2, 30)
    op = batched_operator(__import__("backends").get_backend("numpy"), mats)
    res = rminres_batched(op, np.ones((2, 30)), rtol=1e-14, maxiter=3)
    assert res.statuses == (Status.MAXITER, Status.MAXITER) and res.iterations == (3, 3)
    with pytest.raises(ValueError, match="b must"):
        rminres_batched(op, np.ones(30))
    with pytest.raises(ValueError, match="x0"):
        rminres_batched(op, np.ones((2, 30)), x0=np.ones((2, 29)))
    with pytest.raises(ValueError, match="check_every"):
        rminres_batched(op, np.ones((2, 30)), check_every=0)
    with pytest.raises(ValueError, match="non-finite"):
        rminres_batched(op, np.full((2, 30), np.nan))
