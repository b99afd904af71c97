"""Batch-first problems: B samples evaluated together = each sample evaluated alone.

Property tests (hypothesis) over the batch size, image shape, regulariser, forward
operator and block width.  Rows whose kernels are elementwise or reduce over the sample's
own contiguous row (operators, TV, the data term, the upper loss) are bitwise equal; the
FoE kernels go through BLAS products whose blocking may depend on the batch's width, so
their rows agree to 1e-12 relative to the row's norm.
"""

from __future__ import annotations

import array_api_compat
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends import get_backend
from backends.counting import Counter
from problems.foe import FieldsOfExperts, gaussian_filters, initial_theta
from problems.imaging import ImagingProblem
from problems.operators import GaussianBlur, Identity, Inpainting
from problems.quadratic import QuadraticProblem
from problems.tv import TotalVariation

SHAPE = (7, 9)  # not square: catches transposed reshapes
B = 3
TOL = 1e-12
REGULARIZERS = ["lorentzian", "huber", "smooth_l1", "l2", "tv"]
OPERATORS = ["identity", "inpainting", "blur"]
NUMPY = get_backend("numpy")


def make_regularizer(kind: str, shape: tuple[int, int] = SHAPE, **kw):
    if kind == "tv":  # FoE options (``kw``) do not apply
        return TotalVariation(shape, gamma=0.05)
    return FieldsOfExperts(shape, 3, 4, expert=kind, gamma=0.1, **kw)


def make_operator(kind: str, i: int, shape: tuple[int, int] = SHAPE):
    if kind == "identity":
        return Identity(shape)
    if kind == "inpainting":
        return Inpainting(shape, 0.4, seed=i)
    return GaussianBlur(shape, 1.0)


def make_problems(backend, reg_kind: str, op_kind: str, b: int = B,
                  shape: tuple[int, int] = SHAPE, seed: int = 1, **kw):
    rng = np.random.default_rng(seed)
    reg = make_regularizer(reg_kind, shape, **kw)
    return [
        ImagingProblem.from_image(
            rng.random(shape), backend, make_operator(op_kind, seed + i, shape), reg,
            noise_level=0.1, seed=i,
        )
        for i in range(b)
    ]


def make_theta(backend, reg_kind: str, seed: int = 2):
    if reg_kind == "tv":
        return backend.asarray(np.array([-1.5]))
    rng = np.random.default_rng(seed)
    exps = rng.uniform(-1.0, 0.0, 4)
    return backend.asarray(initial_theta(3.0 * gaussian_filters(3, 4, seed=seed), exps))


def assert_rows(backend, got, want, bitwise: bool) -> None:
    g, w = backend.to_numpy(got), backend.to_numpy(want)
    assert g.shape == w.shape
    if bitwise:
        np.testing.assert_array_equal(g, w)
        return
    scale = max(np.linalg.norm(w), 1e-300)
    assert np.linalg.norm(g - w) <= TOL * scale, np.linalg.norm(g - w) / scale


def batch_versus_alone(backend, problems, theta, X, V, bitwise_reg: bool) -> None:
    """Every method of the batch of ``problems`` against each sample alone."""
    xp = backend.xp
    batch = type(problems[0]).concat(problems)
    bsz, n = batch.batch_size, batch.n
    V2 = V[:, :, 0]
    lin = batch.linearize(X, theta)
    got = {
        "lower_objective": batch.lower_objective(X, theta),
        "lower_grad": batch.lower_grad(X, theta),
        "value_and_grad": xp.concat([xp.reshape(a, (bsz, -1))
                                     for a in batch.lower_value_and_grad(X, theta)], axis=1),
        "hvp": batch.hvp(X, theta, V2),
        "hvp_block": lin.hvp(V),
        "jac_t": batch.jac_t(X, theta, V2),
        "jac_t_block": lin.jac_t(V),
        "upper_loss": batch.upper_loss(X),
        "upper_grad": batch.upper_grad(X),
    }
    assert tuple(got["hvp_block"].shape) == tuple(V.shape)
    assert tuple(got["jac_t_block"].shape) == (bsz, batch.p, V.shape[2])
    for i, pr in enumerate(problems):
        x, v, v3 = X[i, :], V2[i, :], V[i, :, :]
        alone = pr.linearize(x, theta)
        f, g = pr.lower_value_and_grad(x, theta)
        want = {
            "lower_objective": pr.lower_objective(x, theta),
            "lower_grad": pr.lower_grad(x, theta),
            "value_and_grad": xp.concat([xp.reshape(f, (1,)), g]),
            "hvp": pr.hvp(x, theta, v),
            "hvp_block": alone.hvp(v3),
            "jac_t": pr.jac_t(x, theta, v),
            "jac_t_block": alone.jac_t(v3),
            "upper_loss": pr.upper_loss(x),
            "upper_grad": pr.upper_grad(x),
        }
        for name, row in want.items():
            assert array_api_compat.device(got[name]) == backend.device
            bitwise = bitwise_reg or name.startswith("upper")
            assert_rows(backend, got[name][i, ...], row, bitwise)
    assert n == problems[0].n


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    bsz=st.integers(1, 4),
    reg_kind=st.sampled_from(REGULARIZERS),
    op_kind=st.sampled_from(OPERATORS),
    h=st.integers(4, 9),
    w=st.integers(4, 9),
    b=st.sampled_from([1, 2, 9]),  # b ≥ 8 takes the other Jᵀ product order
    seed=st.integers(0, 2**16),
    boundary=st.sampled_from(["zero", "symmetric"]),  # FoE only
)
def test_batch_equals_each_sample_alone(bsz, reg_kind, op_kind, h, w, b, seed, boundary) -> None:
    problems = make_problems(NUMPY, reg_kind, op_kind, bsz, (h, w), seed, boundary=boundary)
    rng = np.random.default_rng(seed)
    X = NUMPY.asarray(rng.standard_normal((bsz, h * w)))
    V = NUMPY.asarray(rng.standard_normal((bsz, h * w, b)))
    batch_versus_alone(NUMPY, problems, make_theta(NUMPY, reg_kind, seed), X, V,
                       bitwise_reg=reg_kind == "tv")


@settings(max_examples=15, deadline=None)
@given(bsz=st.integers(1, 4), n=st.integers(3, 12), b=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_quadratic_batch_equals_each_sample_alone(bsz, n, b, seed) -> None:
    problems = [QuadraticProblem(n, 3, seed=seed + i, backend=NUMPY) for i in range(bsz)]
    rng = np.random.default_rng(seed)
    X = NUMPY.asarray(rng.standard_normal((bsz, n)))
    V = NUMPY.asarray(rng.standard_normal((bsz, n, b)))
    theta = NUMPY.asarray(rng.uniform(-1.0, 1.0, 3))
    batch_versus_alone(NUMPY, problems, theta, X, V, bitwise_reg=False)
    batch = QuadraticProblem.concat(problems)
    for i, pr in enumerate(problems):  # the host references follow their sample
        np.testing.assert_array_equal(batch.exact_solution(NUMPY.to_numpy(theta), sample=i),
                                      pr.exact_solution(NUMPY.to_numpy(theta)))


@pytest.mark.parametrize(("reg_kind", "op_kind", "boundary"), [
    ("lorentzian", "inpainting", "zero"), ("lorentzian", "inpainting", "symmetric"),
    ("tv", "blur", "zero")])
def test_batch_equals_each_sample_alone_on_every_backend(backend, reg_kind, op_kind,
                                                         boundary) -> None:
    rng = np.random.default_rng(5)
    problems = make_problems(backend, reg_kind, op_kind, boundary=boundary)
    X = backend.asarray(rng.standard_normal((B, problems[0].n)))
    V = backend.asarray(rng.standard_normal((B, problems[0].n, 2)))
    batch_versus_alone(backend, problems, make_theta(backend, reg_kind), X, V,
                       bitwise_reg=reg_kind == "tv")


def test_batch_counts_one_pass(backend) -> None:
    counter = Counter()
    batch = ImagingProblem.concat(make_problems(backend, "lorentzian", "inpainting"),
                                  counter=counter)
    theta = make_theta(backend, "lorentzian")
    rng = np.random.default_rng(0)
    X = backend.asarray(rng.standard_normal((B, batch.n)))
    batch.lower_objective(X, theta)
    batch.lower_grad(X, theta)
    batch.hvp(X, theta, backend.asarray(rng.standard_normal((B, batch.n, 4))))
    lin = batch.linearize(X, theta)
    lin.hvp(backend.asarray(rng.standard_normal((B, batch.n))))
    lin.jac_t(backend.asarray(rng.standard_normal((B, batch.n, 2))))
    c = counter.snapshot()
    assert (c.f_evals, c.grad_evals) == (B, B)
    assert (c.hvp, c.hvp_passes) == (4 * B + B, 2)
    assert (c.jac_t, c.jac_t_passes) == (2 * B, 1)


@pytest.mark.parametrize(("reg_kind", "op_kind"), [("lorentzian", "blur"), ("tv", "inpainting")])
def test_single_sample_linearize_matches_problem(backend, reg_kind: str, op_kind: str) -> None:
    problem = make_problems(backend, reg_kind, op_kind, b=1)[0]
    theta = make_theta(backend, reg_kind)
    rng = np.random.default_rng(7)
    x = backend.asarray(rng.standard_normal(problem.n))
    lin = problem.linearize(x, theta)
    assert lin.shape == (problem.n, problem.n)
    for v in (backend.asarray(rng.standard_normal(problem.n)),
              backend.asarray(rng.standard_normal((problem.n, 3)))):
        problem.counter.reset()
        want_h, want_j = problem.hvp(x, theta, v), problem.jac_t(x, theta, v)
        want_counts = problem.counter.snapshot()
        problem.counter.reset()
        got_h, got_j = lin.hvp(v), lin.jac_t(v)
        assert problem.counter.snapshot() == want_counts
        assert tuple(got_h.shape) == tuple(v.shape)
        assert tuple(got_j.shape) == (problem.p, *v.shape[1:])
        for got, want in ((got_h, want_h), (got_j, want_j)):
            assert array_api_compat.device(got) == backend.device
            assert_rows(backend, got, want, bitwise=True)


def test_concat_validation() -> None:
    be = NUMPY
    good = make_problems(be, "lorentzian", "inpainting", b=2)
    with pytest.raises(ValueError, match="at least one"):
        ImagingProblem.concat([])
    with pytest.raises(ValueError, match="regulariser"):
        ImagingProblem.concat([*good, *make_problems(be, "huber", "inpainting", 1)])
    with pytest.raises(ValueError, match="regulariser"):
        ImagingProblem.concat(
            [*good, *make_problems(be, "lorentzian", "inpainting", 1, learn="filters")]
        )
    with pytest.raises(ValueError, match="regulariser.*boundary='symmetric'"):
        ImagingProblem.concat(
            [*good, *make_problems(be, "lorentzian", "inpainting", 1, boundary="symmetric")]
        )
    with pytest.raises(ValueError, match="Identity"):
        ImagingProblem.concat([*good, *make_problems(be, "lorentzian", "identity", 1)])
    blur = make_problems(be, "tv", "blur", b=1)[0]
    other = ImagingProblem(blur.x_true, blur.y, GaussianBlur(SHAPE, 2.0), blur.regularizer)
    with pytest.raises(ValueError, match="sigma"):
        ImagingProblem.concat([blur, other])
    small = ImagingProblem.from_image(
        np.zeros((5, 5)), be, Inpainting((5, 5), 0.3), make_regularizer("lorentzian", (5, 5))
    )
    with pytest.raises(ValueError, match="image shape"):
        ImagingProblem.concat([*good, small])
    g0 = good[0]
    eps = ImagingProblem(g0.x_true, g0.y, g0.operator, g0.regularizer, epsilon=0.1)
    with pytest.raises(ValueError, match="epsilon"):
        ImagingProblem.concat([good[0], eps])
    batch = ImagingProblem.concat(good)
    theta = make_theta(be, "lorentzian")
    with pytest.raises(ValueError, match="x has shape"):
        batch.lower_grad(np.zeros((3, batch.n)), theta)
    with pytest.raises(ValueError, match="x has shape"):  # one point needs B = 1
        batch.lower_grad(np.zeros(batch.n), theta)
    with pytest.raises(ValueError, match="v has shape"):
        batch.hvp(np.zeros((2, batch.n)), theta, np.zeros((2, batch.n + 1)))
    with pytest.raises(ValueError, match="theta"):
        batch.lower_objective(np.zeros((2, batch.n)), np.zeros(3))
    with pytest.raises(ValueError, match="ambiguous"):
        _ = batch.x_true
    with pytest.raises(ValueError, match="holds 1 samples"):
        ImagingProblem(batch.X_true, batch.Y, g0.operator, g0.regularizer)


@pytest.mark.parametrize("reg_kind", ["lorentzian", "tv"])
def test_subset_matches_rows_of_the_batch(backend, reg_kind: str) -> None:
    counter = Counter()
    batch = ImagingProblem.concat(make_problems(backend, reg_kind, "inpainting", b=4),
                                  counter=counter)
    theta = make_theta(backend, reg_kind)
    X = backend.asarray(np.random.default_rng(5).standard_normal((4, batch.n)))
    F, G = batch.lower_value_and_grad(X, theta)
    rows = [3, 1]
    index = backend.xp.asarray(rows, dtype=backend.xp.int64, device=X.device)
    sub = batch.subset(rows)
    assert sub.batch_size == 2 and batch.subset(rows) is sub  # cached
    assert batch.subset(range(4)) is batch
    counter.reset()
    Fs, Gs = sub.lower_value_and_grad(backend.xp.take(X, index, axis=0), theta)
    assert counter.snapshot().f_evals == 2  # counted in the parent's counter
    assert array_api_compat.device(Gs) == backend.device
    assert_rows(backend, Fs, backend.xp.take(F, index, axis=0), reg_kind == "tv")
    assert_rows(backend, Gs, backend.xp.take(G, index, axis=0), reg_kind == "tv")
    for bad in ([], [4], [-1]):
        with pytest.raises(ValueError, match="rows must be"):
            batch.subset(bad)
