"""BatchedImagingProblem and linearize() against the per-sample ImagingProblem."""

from __future__ import annotations

import array_api_compat
import numpy as np
import pytest

from backends.counting import Counter
from problems.batched import BatchedImagingProblem
from problems.foe import FieldsOfExperts, gaussian_filters, initial_theta
from problems.imaging import ImagingProblem
from problems.linearization import linearize
from problems.operators import GaussianBlur, Identity, Inpainting
from problems.tv import TotalVariation

SHAPE = (7, 9)  # not square: catches transposed reshapes
B = 3
TOL = 1e-12


def make_regularizer(kind: str, shape: tuple[int, int] = SHAPE, **kw):
    if kind == "tv":
        return TotalVariation(shape, gamma=0.05)
    return FieldsOfExperts(shape, 3, 4, expert=kind, gamma=0.1, **kw)


def make_operator(kind: str, i: int, shape: tuple[int, int] = SHAPE):
    if kind == "identity":
        return Identity(shape)
    if kind == "inpainting":
        return Inpainting(shape, 0.4, seed=i)
    return GaussianBlur(shape, 1.0)


def make_problems(backend, reg_kind: str, op_kind: str, b: int = B, **kw):
    rng = np.random.default_rng(1)
    reg = make_regularizer(reg_kind, **kw)
    return [
        ImagingProblem.from_image(
            rng.random(SHAPE), backend, make_operator(op_kind, i), reg, noise_level=0.1, seed=i
        )
        for i in range(b)
    ]


def make_theta(backend, reg_kind: str):
    if reg_kind == "tv":
        return backend.asarray(np.array([-1.5]))
    rng = np.random.default_rng(2)
    exps = rng.uniform(-1.0, 0.0, 4)
    return backend.asarray(initial_theta(3.0 * gaussian_filters(3, 4, seed=3), exps))


def host(backend, a) -> np.ndarray:
    return backend.to_numpy(a)


def assert_close(backend, got, want) -> None:
    g, w = host(backend, got), host(backend, want)
    assert g.shape == w.shape
    scale = max(np.linalg.norm(w), 1e-300)
    assert np.linalg.norm(g - w) <= TOL * scale, np.linalg.norm(g - w) / scale


def assert_on_device(backend, a) -> None:
    assert array_api_compat.device(a) == backend.device


def random_block(backend, rng, *shape):
    return backend.asarray(rng.standard_normal(shape))


CASES = [
    ("lorentzian", "inpainting"),
    ("lorentzian", "identity"),
    ("lorentzian", "blur"),
    ("huber", "inpainting"),
    ("smooth_l1", "blur"),
    ("l2", "identity"),
    ("tv", "inpainting"),
    ("tv", "blur"),
    ("tv", "identity"),
]


@pytest.mark.parametrize(("reg_kind", "op_kind"), CASES)
def test_batched_matches_per_sample(backend, reg_kind: str, op_kind: str) -> None:
    xp = backend.xp
    problems = make_problems(backend, reg_kind, op_kind)
    batch = BatchedImagingProblem.from_problems(problems)
    theta = make_theta(backend, reg_kind)
    rng = np.random.default_rng(5)
    n, p = batch.n, batch.p
    X = random_block(backend, rng, B, n)
    V = random_block(backend, rng, B, n)
    V3 = random_block(backend, rng, B, n, 2)
    V9 = random_block(backend, rng, B, n, 9)  # wide blocks take another product order
    assert batch.batch_size == B and batch.theta_shape == problems[0].theta_shape

    def per_sample(name, *args):
        def row(a, i):
            return a[i, ...]

        return xp.stack(
            [getattr(problems[i], name)(*(row(a, i) if a is not theta else a for a in args))
             for i in range(B)],
            axis=0,
        )

    cases = [
        (batch.lower_objective(X, theta), per_sample("lower_objective", X, theta)),
        (batch.lower_grad(X, theta), per_sample("lower_grad", X, theta)),
        (batch.hvp(X, theta, V), per_sample("hvp", X, theta, V)),
        (batch.hvp(X, theta, V3), per_sample("hvp", X, theta, V3)),
        (batch.jac_t(X, theta, V), per_sample("jac_t", X, theta, V)),
        (batch.jac_t(X, theta, V3), per_sample("jac_t", X, theta, V3)),
        (batch.jac_t(X, theta, V9), per_sample("jac_t", X, theta, V9)),
        (batch.upper_loss(X), per_sample("upper_loss", X)),
        (batch.upper_grad(X), per_sample("upper_grad", X)),
    ]
    lin = batch.linearize(X, xp.reshape(theta, (-1,)))
    cases += [(lin.hvp(V3), cases[3][1]), (lin.jac_t(V), cases[4][1]), (lin.jac_t(V9), cases[6][1])]
    for got, want in cases:
        assert_on_device(backend, got)
        assert_close(backend, got, want)
    assert tuple(cases[5][0].shape) == (B, p, 2)
    assert tuple(cases[6][0].shape) == (B, p, 9)
    assert tuple(cases[4][0].shape) == (B, p)


def test_batched_counts_one_pass(backend) -> None:
    counter = Counter()
    batch = BatchedImagingProblem.from_problems(
        make_problems(backend, "lorentzian", "inpainting"), counter=counter
    )
    theta = make_theta(backend, "lorentzian")
    rng = np.random.default_rng(0)
    X = random_block(backend, rng, B, batch.n)
    batch.lower_objective(X, theta)
    batch.lower_grad(X, theta)
    batch.hvp(X, theta, random_block(backend, rng, B, batch.n, 4))
    lin = batch.linearize(X, theta)
    lin.hvp(random_block(backend, rng, B, batch.n))
    lin.jac_t(random_block(backend, rng, B, batch.n, 2))
    c = counter.snapshot()
    assert (c.f_evals, c.grad_evals) == (B, B)
    assert (c.hvp, c.hvp_passes) == (4 * B + B, 2)
    assert (c.jac_t, c.jac_t_passes) == (2 * B, 1)


@pytest.mark.parametrize(("reg_kind", "op_kind"), [("lorentzian", "blur"), ("tv", "inpainting")])
def test_unbatched_linearize_matches_problem(backend, reg_kind: str, op_kind: str) -> None:
    problem = make_problems(backend, reg_kind, op_kind, b=1)[0]
    theta = make_theta(backend, reg_kind)
    rng = np.random.default_rng(7)
    x = random_block(backend, rng, problem.n)
    lin = linearize(problem, x, theta)
    assert lin.shape == (problem.n, problem.n)
    for v in (random_block(backend, rng, problem.n), random_block(backend, rng, problem.n, 3)):
        problem.counter.reset()
        want_h, want_j = problem.hvp(x, theta, v), problem.jac_t(x, theta, v)
        want_counts = problem.counter.snapshot()
        problem.counter.reset()
        got_h, got_j = lin.hvp(v), lin.jac_t(v)
        assert problem.counter.snapshot() == want_counts
        for got, want in ((got_h, want_h), (got_j, want_j)):
            assert_on_device(backend, got)
            assert_close(backend, got, want)


def test_from_problems_validation() -> None:
    from backends import get_backend

    be = get_backend("numpy")
    good = make_problems(be, "lorentzian", "inpainting", b=2)
    with pytest.raises(ValueError, match="at least one"):
        BatchedImagingProblem.from_problems([])
    with pytest.raises(ValueError, match="regulariser"):
        BatchedImagingProblem.from_problems([*good, *make_problems(be, "huber", "inpainting", 1)])
    with pytest.raises(ValueError, match="regulariser"):
        BatchedImagingProblem.from_problems(
            [*good, *make_problems(be, "lorentzian", "inpainting", 1, learn="filters")]
        )
    with pytest.raises(ValueError, match="Identity"):
        BatchedImagingProblem.from_problems(
            [*good, *make_problems(be, "lorentzian", "identity", 1)]
        )
    blur = make_problems(be, "tv", "blur", b=1)[0]
    other = ImagingProblem(blur.x_true, blur.y, GaussianBlur(SHAPE, 2.0), blur.regularizer)
    with pytest.raises(ValueError, match="sigma"):
        BatchedImagingProblem.from_problems([blur, other])
    small = ImagingProblem.from_image(
        np.zeros((5, 5)), be, Inpainting((5, 5), 0.3), make_regularizer("lorentzian", (5, 5))
    )
    with pytest.raises(ValueError, match="image shape"):
        BatchedImagingProblem.from_problems([*good, small])
    g0 = good[0]
    eps = ImagingProblem(g0.x_true, g0.y, g0.operator, g0.regularizer, epsilon=0.1)
    with pytest.raises(ValueError, match="epsilon"):
        BatchedImagingProblem.from_problems([good[0], eps])
    batch = BatchedImagingProblem.from_problems(good)
    theta = make_theta(be, "lorentzian")
    with pytest.raises(ValueError, match="X has shape"):
        batch.lower_grad(np.zeros((3, batch.n)), theta)
    with pytest.raises(ValueError, match="V has shape"):
        batch.hvp(np.zeros((2, batch.n)), theta, np.zeros((2, batch.n + 1)))
    with pytest.raises(ValueError, match="theta"):
        batch.lower_objective(np.zeros((2, batch.n)), np.zeros(3))


@pytest.mark.parametrize("reg_kind", ["lorentzian", "tv"])
def test_subset_matches_rows_of_the_batch(backend, reg_kind: str) -> None:
    counter = Counter()
    batch = BatchedImagingProblem.from_problems(
        make_problems(backend, reg_kind, "inpainting", b=4), counter=counter
    )
    theta = make_theta(backend, reg_kind)
    X = random_block(backend, np.random.default_rng(5), 4, batch.n)
    F, G = batch.lower_value_and_grad(X, theta)
    rows = [3, 1]
    index = backend.xp.asarray(rows, dtype=backend.xp.int64, device=X.device)
    sub = batch.subset(rows)
    assert sub.batch_size == 2 and batch.subset(rows) is sub  # cached
    assert batch.subset(range(4)) is batch
    counter.reset()
    Fs, Gs = sub.lower_value_and_grad(backend.xp.take(X, index, axis=0), theta)
    assert counter.snapshot().f_evals == 2  # counted in the parent's counter
    assert_on_device(backend, Gs)
    assert_close(backend, Fs, backend.xp.take(F, index, axis=0))
    assert_close(backend, Gs, backend.xp.take(G, index, axis=0))
    for bad in ([], [4], [-1]):
        with pytest.raises(ValueError, match="rows must be"):
            batch.subset(bad)
