"""Compaction: a batched solve that goes on with its unfinished rows alone gives every row
the result of the solve without compaction (the same bits: a row's arithmetic does not
depend on the other rows) and applies the operator to fewer rows, as many as the policy
says; dense solves are the independent reference for the answers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from backends import get_backend
from framework.bilevel.engine import BilevelEngine, EngineConfig
from framework.krylov import RecycleSpace, Status, rminres
from framework.krylov.compaction import Restrictable
from framework.krylov.operators import batch_operator
from framework.krylov.recycle import RecycleConfig
from problems import FieldsOfExperts, ImagingProblem, Inpainting, dct_filters, load_embedded_mnist
from problems.foe import initial_theta

B, N = 8, 60
CONDITIONS = (1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 100.0, 3e3)


def spread_batch(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """B SPD matrices, most well conditioned and a few not (MINRES needs from one to about
    fifty iterations, as a batch of samples does), and right-hand sides."""
    rng = np.random.default_rng(seed)
    mats = []
    for cond in CONDITIONS:
        q, _ = np.linalg.qr(rng.standard_normal((N, N)))
        mats.append((q * np.linspace(1.0, cond, N)) @ q.T)
    A = np.stack([(a + a.T) / 2 for a in mats])
    return A, rng.standard_normal((B, N))


class RowCounter:
    """A restrictable operator counting the rows it is applied to (shared by its
    restrictions)."""

    def __init__(self, op, log: list[int]) -> None:
        self.op, self.log = op, log

    def __call__(self, V):
        self.log.append(int(V.shape[0]))
        return self.op(V)

    def restrict(self, rows):
        return RowCounter(self.op.restrict(rows), self.log)


def expected_rows(iterations: list[int], initial: int, least: int = 1, every: int = 1) -> int:
    """Row applications under the policy, from each row's iteration count: every
    iteration applies the operator to the current rows; after it, when at most half of
    them still iterate (a row with i iterations iterates after step s < i) and at least
    ``least`` have finished, those go on alone (tested every ``every`` iterations).
    ``initial``: rows of the initial-residual pass (x0 given)."""
    current, total, step = len(iterations), initial, 0
    while True:  # the solve stops at the first check without a live row
        step += 1
        total += current
        live = sum(i > step for i in iterations)
        if step % every:
            continue
        if live == 0:
            return total
        if 2 * live <= current and current - live >= least:
            current = live


@pytest.mark.parametrize("scalars", ["host", "device", "device every 3"])
@pytest.mark.parametrize("extras", ["plain", "x0", "preconditioner", "recycle"])
def test_compaction_gives_each_row_the_uncompacted_result(backend, scalars, extras):
    A, b = spread_batch()
    Ad, bd = backend.asarray(A), backend.asarray(b)
    kwargs = {}
    if extras == "x0":
        kwargs["x0"] = backend.asarray(0.1 * b)
    if extras == "preconditioner":  # Jacobi, per sample
        kwargs["M"] = backend.asarray(np.stack([np.diag(1.0 / np.diag(a)) for a in A]))
    if extras == "recycle":
        Y = np.random.default_rng(2).standard_normal((B, N, 3))
        kwargs["recycle"] = RecycleSpace.from_basis(batch_operator(Ad), backend.asarray(Y))
    runs, every = {}, 3 if scalars.endswith("3") else 1
    for compact in (False, True):
        log: list[int] = []
        res = rminres(RowCounter(batch_operator(Ad), log), bd, rtol=1e-10,
                      scalars=scalars.split()[0], check_every=every,
                      compact_rows=int(compact), **kwargs)
        runs[compact] = res, log
    (plain, plain_log), (compacted, log) = runs[False], runs[True]
    x, x_plain = backend.to_numpy(compacted.x), backend.to_numpy(plain.x)
    np.testing.assert_array_equal(x, x_plain)
    assert compacted.iterations == plain.iterations and compacted.status == plain.status
    assert compacted.residual_history == plain.residual_history
    assert compacted.residual_norm == plain.residual_norm and compacted.passes == plain.passes
    assert compacted.host_syncs == plain.host_syncs
    assert len(set(plain.iterations)) > 4  # the rows do need different counts
    # the answers, against dense solves: "converged" holds of the returned x (the true
    # residual, in the M-norm with M, is what the check at exit compares)
    assert all(compacted.converged) and Status.CONVERGED in compacted.status
    for i in range(B):
        r = b[i] - A[i] @ x[i]
        m = 1.0 / np.diag(A[i]) if extras == "preconditioner" else np.ones(N)
        assert np.sqrt(r @ (m * r)) <= 1e-10 * np.sqrt(b[i] @ (m * b[i])) * (1 + 1e-8)
        ref = np.linalg.solve(A[i], b[i])
        cond = np.linalg.cond(A[i])
        assert np.linalg.norm(x[i] - ref) <= 1e-10 * cond * np.linalg.norm(ref)
    # the operator's row applications: every pass over all rows without compaction, the
    # policy's count with it (tested at each host check), both with the true-residual
    # check at exit on every row
    initial = B if extras == "x0" else 0
    assert sum(plain_log) == B * len(plain_log)
    assert sum(log) == expected_rows(list(compacted.iterations), initial, every=every) + B
    assert sum(log) < 0.65 * sum(plain_log)  # 244 of 424 here


@pytest.mark.parametrize("least", [2, 3, 5])
def test_compact_rows_is_the_fewest_finished_rows_dropped(least):
    A, b = spread_batch()
    log: list[int] = []
    res = rminres(RowCounter(batch_operator(A), log), b, rtol=1e-10, compact_rows=least)
    assert sum(log) == expected_rows(list(res.iterations), 0, least) + B
    sizes = [n for i, n in enumerate(log[:-1]) if i == 0 or n != log[i - 1]]  # (the
    assert all(a - b >= least for a, b in itertools.pairwise(sizes))  # last: the check)
    assert len(sizes) > 1


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_bad_compact_rows_is_refused(value):
    A, b = spread_batch()
    with pytest.raises(ValueError, match="compact_rows must be an integer >= 0"):
        rminres(A, b, compact_rows=value)


def test_callback_sees_every_row():
    A, b = spread_batch()
    seen = {False: [], True: []}
    for compact in (False, True):
        rminres(A, b, rtol=1e-10, compact_rows=int(compact),
                callback=lambda X, c=compact: seen[c].append(X.copy()))
    assert len(seen[True]) == len(seen[False])
    for got, want in zip(seen[True], seen[False], strict=True):
        assert got.shape == (B, N)
        np.testing.assert_array_equal(got, want)


def test_no_compaction_without_restriction_or_with_another_rule():
    """A plain callable cannot be restricted; a rule other than the residual rule keeps
    its own per-row state: both solve every row on every pass."""
    A, b = spread_batch()
    log: list[int] = []

    def op(V):
        log.append(V.shape[0])
        return (A @ V[..., None])[..., 0]

    rminres(op, b, rtol=1e-10)
    assert set(log) == {B}
    log.clear()
    counted = Restrictable(op, lambda rows: pytest.fail("restricted"))
    rminres(counted, b, rtol=1e-10, stop=lambda state: state.residual_norm
            <= 1e-10 * state.b_norm)
    assert set(log) == {B}


def spread_samples(be) -> list[ImagingProblem]:
    """Six 16×16 MNIST inpainting samples whose Hessian solves need from 5 to 21
    iterations: 95 % of the pixels missing down to 5 %."""
    reg = FieldsOfExperts((16, 16), 3, 8, expert="lorentzian")
    images = load_embedded_mnist().images[:6, 6:22, 6:22]
    return [ImagingProblem.from_image(img, be, Inpainting((16, 16), ratio, seed=i), reg,
                                      noise_level=0.05, seed=i)
            for i, (img, ratio) in enumerate(zip(images, RATIOS, strict=True))]


RATIOS = (0.95, 0.9, 0.8, 0.6, 0.3, 0.05)


@pytest.mark.parametrize("recycle", ["none", "ritz"])
@pytest.mark.parametrize("preconditioner", ["none", "fft"])
@pytest.mark.parametrize("lower", ["lbfgs", "newton_krylov"])
def test_engine_with_compaction_gives_the_same_steps_with_fewer_applications(
        recycle, preconditioner, lower):
    """Two outer steps on six FoE inpainting samples: the loss, the hypergradient and
    every per-sample count are those of the engine without compaction (the same bits); the
    applications counted by the problem (rows × passes) are fewer where a solve compacts."""
    be = get_backend("numpy")
    theta = be.asarray(initial_theta(dct_filters(3)[:8], -2.0))
    steps = {}
    for compact in (False, True):
        cfg = EngineConfig(recycle=RecycleConfig(recycle, 3) if recycle != "none"
                           else RecycleConfig(), lower_solver=lower,
                           preconditioner=preconditioner,
                           lower_preconditioner="fft" if lower == "newton_krylov" else "none",
                           compact_rows=int(compact))
        engine = BilevelEngine(spread_samples(be), cfg)
        steps[compact] = [engine.evaluate(theta), engine.evaluate(theta * 1.05)]
    for plain, compacted in zip(steps[False], steps[True], strict=True):
        assert compacted.loss == plain.loss
        np.testing.assert_array_equal(be.to_numpy(compacted.grad), be.to_numpy(plain.grad))
        for a, c in zip(plain.samples, compacted.samples, strict=True):
            assert (c.krylov_iterations, c.hvp, c.lower_iterations, c.lower_hvp) == (
                a.krylov_iterations, a.hvp, a.lower_iterations, a.lower_hvp)
            assert c.preconditioner <= a.preconditioner  # frozen rows' applications go
        assert len({r.krylov_iterations for r in plain.samples}) >= 4
    hessian = {c: sum(s.counts.hvp for s in steps[c]) for c in steps}
    if recycle == "none":
        assert hessian[True] < hessian[False]
    else:  # a solve that harvests recycle vectors goes on over all rows
        assert hessian[True] == hessian[False]
    if lower == "newton_krylov":  # the inner solves (without harvest) are compacted
        inner = {c: sum(s.lower_counts.hvp for s in steps[c]) for c in steps}
        assert inner[True] < inner[False]
