"""The FFT preconditioner of the FoE imaging Hessians: M is the inverse of the periodic
approximation built densely from circulant matrices, symmetric positive definite, the
same on every namespace, and it cuts MINRES iterations where the Hessian is far from
the identity (blur with weak regularisation)."""

from __future__ import annotations

import numpy as np
import pytest

from backends import get_backend
from framework.krylov import rminres
from problems.datasets import load_embedded_mnist
from problems.foe import FieldsOfExperts, dct_filters, initial_theta
from problems.imaging import ImagingProblem
from problems.operators import GaussianBlur, Identity, Inpainting, gaussian_kernel_1d
from problems.preconditioners import fft_preconditioner
from problems.tv import TotalVariation


def circulant(kernel: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The periodic convolution x ↦ Σ_{a,c} k[a, c] x[i − a, j − c] as a dense matrix."""
    h, w = shape
    n = h * w
    C = np.zeros((n, n))
    for col in range(n):
        e = np.zeros(n)
        e[col] = 1.0
        img = e.reshape(shape)
        out = np.zeros(shape)
        for a in range(kernel.shape[0]):
            for c in range(kernel.shape[1]):
                out += kernel[a, c] * np.roll(img, (a, c), axis=(0, 1))
        C[:, col] = out.reshape(-1)
    return C


def mnist_deblurring(be, image: np.ndarray, seed: int = 0) -> ImagingProblem:
    """An MNIST digit blurred (σ = 1.5, 5 % noise), FoE with 24 DCT 5×5 Lorentzian experts."""
    reg = FieldsOfExperts(image.shape, 5, 24, expert="lorentzian")
    return ImagingProblem.from_image(image, be, GaussianBlur(image.shape, 1.5), reg,
                                     noise_level=0.05, seed=seed)


def dense(apply, n: int) -> np.ndarray:
    return np.stack([apply(np.eye(n)[j][None, :])[0] for j in range(n)], axis=1)


@pytest.mark.parametrize("operator", ["identity", "inpainting", "blur"])
def test_fft_preconditioner_inverts_the_periodic_approximation(operator):
    shape = (12, 13)
    n = shape[0] * shape[1]
    rng = np.random.default_rng(0)
    reg = FieldsOfExperts(shape, 3, 2, expert="l2")  # φ'' = 1: c_f = 10^{p_f}
    ops = {"identity": Identity(shape), "inpainting": Inpainting(shape, 0.3, seed=1),
           "blur": GaussianBlur(shape, 1.0)}
    be = get_backend("numpy")
    problem = ImagingProblem.from_image(rng.random(shape), be, ops[operator], reg,
                                        noise_level=0.0, epsilon=1e-3)
    filters = rng.standard_normal((2, 9))
    exponents = np.array([-0.5, 0.3])
    theta = np.concatenate([filters, exponents[:, None]], axis=1)
    M = dense(fft_preconditioner(problem, problem.Y, theta), n)
    P = 1e-3 * np.eye(n)
    for f in range(2):
        C = circulant(filters[f].reshape(3, 3), shape)
        P += 10.0 ** exponents[f] * C.T @ C
    if operator == "identity":
        P += np.eye(n)
    elif operator == "inpainting":
        P += ops["inpainting"].masks.mean() * np.eye(n)
    else:
        g = gaussian_kernel_1d(1.0)
        G = circulant(np.outer(g, g), shape)
        P += G.T @ G
    np.testing.assert_allclose(M @ P, np.eye(n), atol=1e-10 * np.linalg.cond(P))
    np.testing.assert_allclose(M, M.T, atol=1e-14 * np.abs(M).max())
    assert np.linalg.eigvalsh((M + M.T) / 2).min() > 0


def test_non_convex_expert_weights_are_clipped_so_m_stays_positive_definite():
    image = 20.0 * load_embedded_mnist().images[0]  # responses beyond the convex zone
    be = get_backend("numpy")
    reg = FieldsOfExperts(image.shape, 5, 24, expert="lorentzian")
    problem = ImagingProblem.from_image(image, be, GaussianBlur(image.shape, 1.5), reg,
                                        noise_level=0.05, seed=0)
    theta = initial_theta(dct_filters(5), 1.0)
    x = problem.Y
    lin = reg.linearize(np, x, theta.reshape(reg.theta_shape))
    assert (lin.weight() < 0).any()
    apply = fft_preconditioner(problem, x, theta)
    v = np.random.default_rng(1).standard_normal((3, problem.n))
    Mv = np.stack([apply(row[None, :])[0] for row in v])
    gram = v @ Mv.T
    np.testing.assert_allclose(gram, gram.T, rtol=1e-10)
    assert np.linalg.eigvalsh(gram).min() > 0


def test_same_preconditioner_on_every_namespace(backend):
    image = load_embedded_mnist().images[1]
    reg = FieldsOfExperts(image.shape, 5, 24, expert="lorentzian")
    theta = initial_theta(dct_filters(5), -1.0)
    v = np.random.default_rng(2).standard_normal((1, image.size))
    outputs = []
    for be in (get_backend("numpy"), backend):
        problem = ImagingProblem.from_image(image, be, Inpainting(image.shape, 0.4, seed=0),
                                            reg, noise_level=0.05, seed=0)
        apply = fft_preconditioner(problem, problem.Y, be.asarray(theta))
        outputs.append(be.to_numpy(apply(be.asarray(v))))
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-12, atol=1e-14)


def test_preconditioner_cuts_iterations_on_a_weakly_regularised_deblurring():
    problem = mnist_deblurring(get_backend("numpy"), load_embedded_mnist().images[0])
    theta = initial_theta(dct_filters(5), -3.0)
    H = problem.linearize(problem.y, theta)
    g = np.random.default_rng(0).standard_normal(problem.n)
    plain = rminres(H, g, rtol=1e-6)
    pre = rminres(H, g, rtol=1e-6, M=fft_preconditioner(problem, problem.y, theta),
                  check=True)
    assert plain.converged and pre.converged
    # measured 40 → 19 iterations; the preconditioner must at least halve them less 20 %
    assert pre.iterations <= 0.6 * plain.iterations
    np.testing.assert_allclose(pre.x, plain.x, rtol=1e-4 * np.linalg.norm(plain.x))


def test_tv_problems_are_refused_with_a_clear_message():
    shape = (8, 8)
    be = get_backend("numpy")
    problem = ImagingProblem.from_image(np.zeros(shape), be, Identity(shape),
                                        TotalVariation(shape), noise_level=0.0)
    with pytest.raises(ValueError, match="built for Fields of Experts"):
        fft_preconditioner(problem, problem.Y, np.zeros(1))


@pytest.mark.parametrize("lower", ["lbfgs", "newton_krylov"])
def test_engine_hypergradients_with_the_preconditioner_match_without(lower):
    """Deblurring with weak experts: the preconditioned Hessian solves (hypergradient and,
    for Newton, the inner solves) give the same hypergradient to the solves' accuracy,
    with fewer Hessian applications."""
    from framework.bilevel.engine import BilevelEngine, EngineConfig
    from framework.krylov.stopping import StopConfig

    be = get_backend("numpy")
    images = load_embedded_mnist().images[:2]
    problems = [mnist_deblurring(be, img, i) for i, img in enumerate(images)]
    theta = be.asarray(initial_theta(dct_filters(5), -3.0))
    results = {}
    for pre in ("none", "fft"):
        config = EngineConfig(stop=StopConfig(rtol=1e-10), lower_gtol=1e-9,
                              lower_maxiter=2000, lower_solver=lower, preconditioner=pre,
                              lower_preconditioner=pre)
        results[pre] = BilevelEngine(problems, config, backend=be).evaluate(theta)
    a, b = results["none"], results["fft"]
    # the runs differ by the Hessian solves' accuracy (rtol 1e-10) and, with Newton, by two
    # lower solutions that each meet gtol 1e-9 (measured 1.4e-11 and 1.4e-9 relative)
    assert np.linalg.norm(b.grad - a.grad) <= 1e-7 * np.linalg.norm(a.grad)
    hessian = [s.krylov_iterations for s in a.samples], [s.krylov_iterations for s in b.samples]
    assert all(p < 0.7 * q for p, q in zip(hessian[1], hessian[0], strict=True)), hessian
    if lower == "newton_krylov":  # converged (L-BFGS stalls near gtol 1e-9), and the inner
        # solves too take fewer Hessian applications
        assert all(s.lower_converged for r in (a, b) for s in r.samples)
        inner = [s.lower_hvp for s in a.samples], [s.lower_hvp for s in b.samples]
        assert all(p < 0.7 * q for p, q in zip(inner[1], inner[0], strict=True)), inner


def test_engine_records_count_the_preconditioner_applications(monkeypatch):
    """Per-sample M applications in both phases.  B = 1: one M per MINRES iteration plus
    two (M r₀ and M b) per solve — lower: per Newton step, Hessian phase: once.  B = 3:
    the records add up to the rows an independent wrapper of M saw."""
    from framework.bilevel import engine as engine_module
    from framework.bilevel.engine import BilevelEngine, EngineConfig
    from framework.krylov.stopping import StopConfig

    seen = {"rows": 0}
    build = engine_module._preconditioner

    def counting(*args):
        M = build(*args)

        def apply(V):
            seen["rows"] += int(np.count_nonzero(np.any(V != 0, axis=1)))
            return M(V)

        return None if M is None else apply

    monkeypatch.setattr(engine_module, "_preconditioner", counting)
    be = get_backend("numpy")
    images = load_embedded_mnist().images[:3]
    problems = [mnist_deblurring(be, img, i) for i, img in enumerate(images)]
    theta = be.asarray(initial_theta(dct_filters(5), -3.0))
    config = EngineConfig(stop=StopConfig(rtol=1e-6), lower_gtol=1e-8, lower_maxiter=500,
                          lower_solver="newton_krylov", preconditioner="fft",
                          lower_preconditioner="fft")
    (one,) = BilevelEngine(problems[:1], config, backend=be).evaluate(theta).samples
    assert one.preconditioner == one.krylov_iterations + 2
    assert one.lower_preconditioner == one.lower_hvp + 2 * one.lower_iterations
    seen["rows"] = 0
    step = BilevelEngine(problems, config, backend=be).evaluate(theta)
    metrics = step.metrics()
    assert metrics["preconditioner"] + metrics["lower_preconditioner"] == seen["rows"] > 0
    assert all(s.preconditioner >= s.krylov_iterations + 2 for s in step.samples)


def test_auto_is_fft_exactly_where_it_applies():
    """``auto`` becomes fft on FoE imaging samples (the Hessian solve unless an NSC rule
    estimates from a recycle space; the lower level with Newton–Krylov) and none on TV and
    quadratic samples; explicit choices are kept as given."""
    from framework.bilevel.engine import EngineConfig, with_preconditioners
    from framework.krylov.recycle import RecycleConfig
    from framework.krylov.stopping import StopConfig
    from problems import QuadraticProblem

    be = get_backend("numpy")
    image = load_embedded_mnist().images[0]
    foe = mnist_deblurring(be, image)
    tv = ImagingProblem.from_image(image, be, Identity(image.shape),
                                   TotalVariation(image.shape), noise_level=0.05)
    quadratic = QuadraticProblem(n=10, num_terms=2, seed=0, backend=be)
    auto = dict(preconditioner="auto", lower_preconditioner="auto")

    def chosen(problem, **settings):
        c = with_preconditioners(EngineConfig(**{**auto, **settings}), problem)
        return c.preconditioner, c.lower_preconditioner

    assert chosen(foe, lower_solver="newton_krylov") == ("fft", "fft")
    assert chosen(foe, lower_solver="lbfgs") == ("fft", "none")
    assert chosen(tv, lower_solver="newton_krylov") == ("none", "none")
    assert chosen(quadratic, lower_solver="newton_krylov") == ("none", "none")
    nsc = StopConfig("hypergradient", rtol=1e-3)
    assert chosen(foe, stop=nsc, lower_solver="lbfgs") == ("fft", "none")  # no recycling
    assert chosen(foe, stop=nsc, recycle=RecycleConfig("ritz", 3),
                  lower_solver="lbfgs") == ("none", "none")
    assert chosen(foe, lower_solver="newton_krylov", preconditioner="none") == ("none", "fft")
