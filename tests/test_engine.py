"""The one bilevel engine: B samples evaluated together = each evaluated alone.

Property test (hypothesis) over the batch size, problem size, recycle strategy, selection,
stopping rule, Lanczos cap and Newton polish on the quadratic problem, whose rows are
dense and well conditioned: rounding differences between a batch and a batch of one
(summation order of the row kernels) stay at ≈ κ·eps, far below any stopping margin, so
iterations, statuses and counts must agree exactly and gradients to 1e-8.  On FoE
(mnist) the lower level's L-BFGS can flip an iteration under other BLAS kernels, so there
the gradients are compared within the error the solves' tolerances allow.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_hypergradient import (  # tests/ is on sys.path (rootdir)
    assert_mean_hypergradient_within_bound,
    hypergradient_error_bound,
)

import framework.bilevel.engine as engine_module
from backends import get_backend
from framework.bilevel.engine import BilevelEngine, EngineConfig, default_check_every
from framework.krylov.recycle import ORACLES, RecycleConfig
from framework.krylov.selection import Strategy
from framework.krylov.stopping import StopConfig
from problems import (
    FieldsOfExperts,
    ImagingProblem,
    Inpainting,
    QuadraticProblem,
    dct_filters,
    load_embedded_mnist,
)
from problems.foe import initial_theta

THETA = np.array([-1.0, 0.0, -2.0])


def mnist_problems(be, count=3, size=28):
    reg = FieldsOfExperts((size, size), 3, 8, expert="lorentzian")
    start = (28 - size) // 2
    return [
        ImagingProblem.from_image(img[start:start + size, start:start + size], be,
                                  Inpainting((size, size), 0.5, seed=i), reg,
                                  noise_level=0.05, seed=i)
        for i, img in enumerate(load_embedded_mnist().images[:count])
    ]


def per_sample(record):
    """Everything a record counts, as exact values."""
    shadow = None if record.shadow is None else (record.shadow.iterations, record.shadow.hvp)
    return (record.lower_iterations, record.lower_converged, record.lower_grad_evals,
            record.lower_hvp, record.krylov_iterations, record.krylov_converged,
            record.krylov_status, record.recycle_dim, record.hvp, record.jac_t, shadow)


def assert_together_equals_alone(be, problems, cfg, thetas):
    """Evaluate all samples together and each alone (same engine class) at ``thetas``."""
    together = BilevelEngine(problems, cfg, backend=be)
    alone = BilevelEngine(problems, cfg, backend=be)
    B = len(problems)
    for theta in thetas:
        th = be.asarray(theta)
        batch = together.evaluate(th)
        singles = [alone.evaluate(th, [j]) for j in range(B)]
        assert [per_sample(r) for r in batch.samples] == [
            per_sample(s.samples[0]) for s in singles]
        for s in singles:
            # a batch of one: the per-row counts are the problem counter's own
            assert (s.counts.hvp, s.counts.jac_t) == (s.samples[0].hvp, s.samples[0].jac_t)
        # x*: row round-off (≈ eps) carried through tens of L-BFGS steps on κ ≈ 1e2
        np.testing.assert_allclose([r.upper_loss for r in batch.samples],
                                   [s.loss for s in singles], rtol=1e-10)
        # NSC estimates only decide against rtol (the equal iterations show the decisions
        # agree); at that scale they must agree too
        np.testing.assert_allclose([r.hg_error_estimate for r in batch.samples],
                                   [s.samples[0].hg_error_estimate for s in singles],
                                   rtol=0, atol=0.1 * cfg.stop.rtol)
        grads = [be.to_numpy(s.grad) for s in singles]
        want = np.mean(grads, axis=0)
        scale = np.mean([np.linalg.norm(g) for g in grads])  # the summands' size
        # the recycle spaces are chosen by small eigen/GSVD problems that near-degenerate
        # spectra make ill-conditioned: round-off may pick another (equally valid) space,
        # and the iterate then moves within the Krylov tolerance, ≤ 2‖J‖‖H⁻¹‖rtol‖∇ℓ‖
        krylov = np.mean([hypergradient_error_bound(p, theta, 0.0, cfg.stop.rtol)
                          for p in problems])
        assert np.linalg.norm(be.to_numpy(batch.grad) - want) <= 1e-8 * scale + krylov
        assert batch.counts.hvp_passes <= sum(s.counts.hvp_passes for s in singles)
    return together, alone


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    B=st.integers(1, 4),
    n=st.integers(48, 96),
    strategy=st.sampled_from([s.value for s in Strategy]),
    k=st.integers(1, 4),
    outer=st.booleans(),
    nsc=st.booleans(),
    cap=st.sampled_from([None, 3, 6]),
    newton=st.sampled_from([0, 2]),
)
def test_batch_equals_each_alone_on_the_quadratic(B, n, strategy, k, outer, nsc, cap, newton):
    be = get_backend("numpy")
    outer = outer and strategy not in ORACLES
    cfg = EngineConfig(
        recycle=RecycleConfig(strategy, k, max_vectors=None if outer else cap,
                              selection="outer" if outer else "inner"),
        # rtol reached in far fewer than n iterations: MINRES's residual is not yet at the
        # round-off plateau where small systems end (there rounding decides the stop)
        stop=StopConfig("hypergradient" if nsc else "residual", rtol=1e-6),
        # gtol well above where L-BFGS stalls on round-off (‖∇f‖ ≈ 1e-8; at 1e-7 the
        # Prescott kernels flip an iteration), so no stopping test sits at a rounding tie
        lower_gtol=1e-5, lower_newton_steps=newton, shadow_baseline=True,
    )
    problems = [QuadraticProblem(n=n, num_terms=3, seed=s, backend=be) for s in range(B)]
    together, alone = assert_together_equals_alone(
        be, problems, cfg, [THETA + 0.1 * t for t in range(3)])
    # states are interchangeable: a batch continues from the per-sample engine's states
    together.load_state_dict(alone.state_dict())
    assert_together_equals_alone(be, problems, cfg, [THETA + 0.3])


@pytest.mark.parametrize("kind", ["hypergradient", "hypergradient_change"])
def test_batch_equals_each_alone_under_array_api_strict(kind):
    be = get_backend("array_api_strict", dtype="float64", device="device1")
    cfg = EngineConfig(recycle=RecycleConfig("rgen_right", 3, max_vectors=5),
                       stop=StopConfig(kind, rtol=1e-6), lower_gtol=1e-5,
                       lower_newton_steps=2, shadow_baseline=True)
    problems = [QuadraticProblem(n=n, num_terms=3, seed=s, backend=be)
                for s, n in enumerate((20, 20, 20))]
    assert_together_equals_alone(be, problems, cfg, [THETA + 0.1 * t for t in range(3)])


def test_foe_batch_matches_alone_within_the_tolerances():
    # FoE: round-off of another summation order can flip an L-BFGS or MINRES stopping
    # decision, so compare gradients within what the tolerances allow.  The lower level is
    # polished by Newton to ‖∇f‖ ≤ gtol, the adjoint solved to ‖Hw − ∇ℓ‖ ≤ rtol‖∇ℓ‖; to
    # first order each run's −Jᵀw is then within ‖J‖‖H⁻¹‖(rtol‖∇ℓ‖ + gtol/λmin) of the
    # exact one (‖∇ℓ‖ moves by ‖δx‖ ≤ gtol/λmin), so two runs within twice that.
    be = get_backend("numpy")
    gtol, rtol = 1e-9, 1e-8
    cfg = EngineConfig(recycle=RecycleConfig("ritz", 4), stop=StopConfig(rtol=rtol),
                       lower_gtol=gtol, lower_newton_steps=3)
    problems = mnist_problems(be, 3, size=12)
    together = BilevelEngine(problems, cfg, backend=be)
    alone = BilevelEngine(problems, cfg, backend=be)
    theta0 = initial_theta(dct_filters(3)[:8], -1.0)
    for t in range(2):
        th = be.asarray(theta0 * (1 + 0.05 * t))
        batch = together.evaluate(th)
        singles = [alone.evaluate(th, [j]) for j in range(3)]
        assert all(r.lower_converged and r.krylov_converged for r in batch.samples)
        bounds = []
        for j, p in enumerate(problems):
            x = together.states[j].x
            lin = p.linearize(x, th)
            eye = be.asarray(np.eye(p.n))
            H, J = be.to_numpy(lin.hvp(eye)), be.to_numpy(lin.jac_t(eye))
            lam_min = np.linalg.eigvalsh(0.5 * (H + H.T))[0]
            g = np.linalg.norm(be.to_numpy(p.upper_grad(x)))
            bounds.append(2 * np.linalg.norm(J, 2) / lam_min * (rtol * g + gtol / lam_min))
        want = np.mean([be.to_numpy(s.grad) for s in singles], axis=0)
        assert np.linalg.norm(be.to_numpy(batch.grad) - want) <= np.mean(bounds)


def test_newton_steps_and_the_hessian_phase_reuse_the_evaluations_linearizations(
        monkeypatch):
    """Newton–Krylov on FoE: f and ∇f come from a linearization at the evaluated point,
    which that point's Newton step and, at x*, the Hessian phase reuse — one linearization
    per evaluation round, none more — and every number is that of an engine which
    linearizes afresh for each solve.  (Without compaction, which linearizes the rows a
    solve goes on with once more.)"""
    be = get_backend("numpy")
    cfg = EngineConfig(recycle=RecycleConfig("ritz", 3), lower_solver="newton_krylov",
                       compact_rows=0)
    problems = mnist_problems(be, 3, size=12)
    theta = be.asarray(initial_theta(dct_filters(3)[:8], -1.0))
    calls, rounds = [], []
    linearize, newton = ImagingProblem.linearize, engine_module.newton_krylov
    monkeypatch.setattr(ImagingProblem, "linearize",
                        lambda self, x, th: calls.append(1) or linearize(self, x, th))
    monkeypatch.setattr(engine_module, "newton_krylov", lambda *a, **k: (
        rounds.append((result := newton(*a, **k)).evaluation_rounds) or result))
    shared, fresh = BilevelEngine(problems, cfg), BilevelEngine(problems, cfg)
    remember = BilevelEngine._linearize
    monkeypatch.setattr(fresh, "_linearize", lambda problem, X, th: (
        setattr(fresh, "_last_linearization", None) or remember(fresh, problem, X, th)))
    for th in (theta, theta * 1.05):
        calls.clear()
        got = shared.evaluate(th)
        assert len(calls) == rounds[-1] >= 2
        want = fresh.evaluate(th)
        assert len(calls) > 2 * rounds[-1]  # the fresh engine linearizes more often
        assert got.loss == want.loss
        np.testing.assert_array_equal(be.to_numpy(got.grad), be.to_numpy(want.grad))
        assert [per_sample(r) for r in got.samples] == [per_sample(r) for r in want.samples]


def test_engine_on_the_quadratic_problem_matches_the_closed_form(backend):
    # B = 3 samples with their own A_i, G_ij, y_i solved together; the mean hypergradient
    # must match the mean of the dense host references within the first-order error bound
    # of the tolerances the two solves were run to (lower gtol, Krylov rtol)
    # L-BFGS's line search stalls near ‖∇f‖ ≈ 1e-8 and, under some BLAS kernels (Haswell),
    # above gtol = 1e-7: the Newton polish on the batch reaches gtol on every kernel
    gtol, rtol = 1e-7, 1e-10
    problems = [QuadraticProblem(n=40, num_terms=3, seed=s, backend=backend) for s in range(3)]
    cfg = EngineConfig(recycle=RecycleConfig("ritz", 4), stop=StopConfig(rtol=rtol),
                       lower_gtol=gtol, lower_newton_steps=2)
    engine = BilevelEngine(problems, cfg, backend=backend)
    for t in range(3):
        th = THETA + 0.05 * t
        result = engine.evaluate(backend.asarray(th))
        assert_mean_hypergradient_within_bound(backend, result.grad, problems, th, gtol, rtol)
        losses, loss_bounds = [], []
        for j, p in enumerate(problems):
            # ‖∇f‖ ≤ gtol ⇒ ‖x − x*‖ ≤ δx = gtol / λmin(H); ℓ then moves by ≤ ‖x* − x_true‖ δx + δx²
            dx = gtol / np.linalg.eigvalsh(p._hessian_host(th)[0])[0]
            residual = p.exact_solution(th) - p._x_true_host
            losses.append(0.5 * np.sum(residual**2))
            loss_bounds.append(np.linalg.norm(residual) * dx + dx**2)
            err = np.linalg.norm(backend.to_numpy(engine.states[j].x) - p.exact_solution(th))
            assert result.samples[j].lower_converged and err <= dx
        assert abs(result.loss - np.mean(losses)) <= np.mean(loss_bounds)
        # the engine's loss(θ) (line searches) solves the same lower problems again
        assert abs(engine.loss(backend.asarray(th)) - np.mean(losses)) <= np.mean(loss_bounds)
    assert result.samples[0].recycle_dim == 4 and result.counts.hvp_passes > 0


def test_engine_needs_one_batch_first_problem_type():
    be = get_backend("numpy")
    quad = QuadraticProblem(n=9, backend=be)

    class PerSampleOnly:  # a problem without concat: nothing falls back to one by one
        theta_shape = quad.theta_shape

    for problems in ([quad, PerSampleOnly()], [PerSampleOnly()]):
        with pytest.raises(ValueError, match="one batch-first problem type"):
            BilevelEngine(problems)
    with pytest.raises(ValueError, match="at least one sample"):
        BilevelEngine([])


def test_check_every_defaults_to_every_iteration_on_the_cpu(backend):
    problems = [QuadraticProblem(n=10, backend=backend)]
    engine = BilevelEngine(problems, EngineConfig(), backend=backend)
    assert engine.check_every == 1  # a host check is free on the CPU (NumPy, strict)
    assert default_check_every(backend.asarray(np.zeros(3))) == 1
    assert BilevelEngine(problems, check_every=8).check_every == 8
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="check_every"):
            BilevelEngine(problems, check_every=bad)


def test_host_syncs_do_not_grow_with_the_batch(backend):
    # the same digit B times: every sample takes the same path, so a batch of 4 must need
    # exactly the host transfers of a batch of 1 (scalars travel as (B,) arrays)
    cfg = EngineConfig(recycle=RecycleConfig("ritz", 3), stop=StopConfig(rtol=1e-6),
                       lower_gtol=1e-7, lower_newton_steps=1)
    theta = backend.asarray(initial_theta(dct_filters(3)[:8], -1.0))
    one = mnist_problems(backend, 1, size=12)
    syncs = []
    for copies in (1, 4):
        engine = BilevelEngine(one * copies, cfg, backend=backend)
        results = [engine.evaluate(theta) for _ in range(2)]
        syncs.append([r.host_syncs for r in results])
        assert all(math.isfinite(r.times.krylov) and r.times.krylov > 0 for r in results)
    assert syncs[0] == syncs[1]
    assert min(syncs[0]) > 0


def test_shadow_baseline_without_recycling_is_not_solved_twice():
    """Without recycling or an NSC rule the shadow solve would repeat the hypergradient
    solve from the same warm starts: it is not run (the engine applies exactly the
    operators of an engine without the baseline, records no shadow); with recycling it is."""
    be = get_backend("numpy")
    problems = [QuadraticProblem(n=30, num_terms=3, seed=s, backend=be) for s in range(2)]

    def engine(shadow, recycle=None):
        return BilevelEngine(problems, EngineConfig(
            recycle=recycle or RecycleConfig(), stop=StopConfig(rtol=1e-8), lower_gtol=1e-6,
            shadow_baseline=shadow), backend=be)

    shadowed, plain, recycled = engine(True), engine(False), engine(True, RecycleConfig("ritz", 3))
    for t in range(3):
        theta = be.asarray(THETA + 0.1 * t)
        a, b, c = shadowed.evaluate(theta), plain.evaluate(theta), recycled.evaluate(theta)
        assert shadowed.counter.snapshot() == plain.counter.snapshot()
        assert np.array_equal(be.to_numpy(a.grad), be.to_numpy(b.grad))
        assert [per_sample(r) for r in a.samples] == [per_sample(r) for r in b.samples]
        assert all(r.shadow is None for r in a.samples)
        assert all(r.shadow is not None and r.shadow.iterations > 0 for r in c.samples)
