"""The batched engine reproduces the per-sample engine."""

from __future__ import annotations

import numpy as np
import pytest
from test_hypergradient import hypergradient_error_bound  # tests/ is on sys.path (rootdir)

from backends import get_backend
from framework.bilevel.batched_engine import (
    BatchedBilevelEngine,
    batching_unsupported,
    create_engine,
    default_check_every,
)
from framework.bilevel.engine import BilevelEngine, EngineConfig
from framework.krylov.recycle import RecycleConfig
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


def mnist_problems(be, count=3):
    reg = FieldsOfExperts((28, 28), 3, 8, expert="lorentzian")
    return [
        ImagingProblem.from_image(img, be, Inpainting((28, 28), 0.5, seed=i), reg,
                                  noise_level=0.05, seed=i)
        for i, img in enumerate(load_embedded_mnist().images[:count])
    ]


@pytest.mark.parametrize("strategy, stop, cap, selection", [
    ("none", "residual", None, "inner"),
    ("ritz", "residual", None, "inner"),
    ("ritz", "residual", 8, "inner"),
    ("rgen_right", "residual", None, "inner"),
    ("rgen_right", "hypergradient", 8, "inner"),
    ("harmonic_ritz", "residual", None, "outer"),
    ("rgen_right", "hypergradient", None, "outer"),
    ("eig", "residual", None, "inner"),
])
def test_batched_engine_matches_per_sample_engine(backend, strategy, stop, cap, selection):
    if selection == "outer" or strategy == "eig":
        if backend.name != "numpy":
            pytest.skip("outer selection and the oracles: one namespace keeps the suite fast")
    cfg = EngineConfig(recycle=RecycleConfig(strategy, 0 if strategy == "none" else 4,
                                             max_vectors=cap, selection=selection),
                       stop=StopConfig(stop, rtol=1e-6), lower_gtol=1e-7, shadow_baseline=True)
    theta = initial_theta(dct_filters(3)[:8], -1.0)
    ref = BilevelEngine(mnist_problems(backend), cfg, backend=backend)
    bat = BatchedBilevelEngine(mnist_problems(backend), cfg, backend=backend, check_every=4)
    for step in range(3):
        th = backend.asarray(theta * (1 + 0.05 * step))
        a, b = ref.evaluate(th), bat.evaluate(th)
        assert [r.lower_iterations for r in a.samples] == [r.lower_iterations for r in b.samples]
        assert [r.krylov_iterations for r in a.samples] == [r.krylov_iterations for r in b.samples]
        assert [r.counts.hvp for r in a.samples] == [r.counts.hvp for r in b.samples]
        assert [r.shadow.iterations for r in a.samples] == [r.shadow.iterations for r in b.samples]
        ga, gb = backend.to_numpy(a.grad), backend.to_numpy(b.grad)
        assert np.linalg.norm(ga - gb) <= 1e-8 * np.linalg.norm(ga)
        # the lower level stops at gtol = 1e-7; round-off in the batched kernels (another
        # summation order) moves its solution within that tolerance
        assert a.loss == pytest.approx(b.loss, rel=1e-8)
        assert [r.counts.jac_t for r in a.samples] == [r.counts.jac_t for r in b.samples]
        np.testing.assert_allclose([r.hg_error_estimate for r in b.samples],
                                   [r.hg_error_estimate for r in a.samples], rtol=1e-6)
        assert b.batch_counts.hvp_passes < sum(r.counts.hvp_passes for r in b.samples)
        assert a.host_syncs is None and b.metrics()["batch_host_syncs"] == b.host_syncs > 0
    # states are interchangeable: continue the per-sample engine from the batched state
    ref.load_state_dict(bat.state_dict())
    c = ref.evaluate(backend.asarray(theta))
    d = bat.evaluate(backend.asarray(theta))
    assert [r.krylov_iterations for r in c.samples] == [r.krylov_iterations for r in d.samples]


def test_create_engine_falls_back_when_batching_is_unsupported():
    be = get_backend("numpy")
    quad = [QuadraticProblem(n=10, backend=be)]
    assert type(create_engine(quad, EngineConfig(), backend=be)) is BatchedBilevelEngine
    # outer selection and the dense oracles run on the batched path (one code path)
    for recycle in (RecycleConfig("ritz", 3, selection="outer"), RecycleConfig("eig", 3),
                    RecycleConfig("gsvd", 3)):
        assert batching_unsupported(mnist_problems(be, 2), EngineConfig(recycle=recycle)) == ""
        assert type(create_engine(mnist_problems(be, 2), EngineConfig(recycle=recycle),
                                  backend=be)) is BatchedBilevelEngine
    newton = EngineConfig(lower_newton_steps=2)
    assert "Newton" in batching_unsupported(mnist_problems(be, 2), newton)
    assert type(create_engine(mnist_problems(be, 2), EngineConfig(), backend=be)) is (
        BatchedBilevelEngine
    )
    assert type(create_engine(mnist_problems(be, 2), EngineConfig(), backend=be,
                              batched=False)) is BilevelEngine
    with pytest.raises(ValueError, match="Newton"):
        BatchedBilevelEngine(mnist_problems(be, 2), newton, backend=be)


def test_batched_engine_on_the_quadratic_problem_matches_the_closed_form(backend):
    # B = 3 samples with their own A_i, G_ij, y_i solved together; the mean hypergradient
    # must match the mean of the dense host references within the first-order error bound
    # of the tolerances the two solves were run to (lower gtol, Krylov rtol)
    gtol, rtol = 1e-7, 1e-10  # a gtol L-BFGS reaches (its line search stalls near 1e-8)
    problems = [QuadraticProblem(n=40, num_terms=3, seed=s, backend=backend) for s in range(3)]
    cfg = EngineConfig(recycle=RecycleConfig("ritz", 4), stop=StopConfig(rtol=rtol),
                       lower_gtol=gtol)
    engine = BatchedBilevelEngine(problems, cfg, backend=backend)
    theta = np.array([-1.0, 0.0, -2.0])
    for t in range(3):
        th = theta + 0.05 * t
        result = engine.evaluate(backend.asarray(th))
        want = np.mean([p.exact_hypergradient(th) for p in problems], axis=0)
        bound = np.mean([hypergradient_error_bound(p, th, gtol, rtol) for p in problems])
        assert np.linalg.norm(backend.to_numpy(result.grad) - want) <= bound
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
    assert result.samples[0].recycle_dim == 4 and result.batch_counts.hvp_passes > 0


def test_check_every_defaults_to_every_iteration_on_the_cpu(backend):
    engine = BatchedBilevelEngine(mnist_problems(backend, 2), EngineConfig(), backend=backend)
    assert engine.check_every == 1  # a host check is free on the CPU (NumPy, strict)
    assert default_check_every(backend.asarray(np.zeros(3))) == 1
    assert BatchedBilevelEngine(mnist_problems(backend, 2), EngineConfig(), backend=backend,
                                check_every=8).check_every == 8
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="check_every"):
            BatchedBilevelEngine(mnist_problems(backend, 2), EngineConfig(), backend=backend,
                                 check_every=bad)


def test_host_syncs_do_not_grow_with_the_batch(backend):
    # the same digit B times: every sample takes the same path, so a batch of 4 must need
    # exactly the host transfers of a batch of 1 (scalars travel as (B,) arrays)
    cfg = EngineConfig(recycle=RecycleConfig("ritz", 3), stop=StopConfig(rtol=1e-6),
                       lower_gtol=1e-7)
    theta = backend.asarray(initial_theta(dct_filters(3)[:8], -1.0))
    one = mnist_problems(backend, 1)
    syncs = []
    for copies in (1, 4):
        engine = BatchedBilevelEngine(one * copies, cfg, backend=backend)
        results = [engine.evaluate(theta) for _ in range(2)]
        syncs.append([r.host_syncs for r in results])
    assert syncs[0] == syncs[1]
    assert min(syncs[0]) > 0
