"""A sum of regularisers (Huber-TV + Fields of Experts): each derivative is the parts' own,
summed or stacked; the hypergradient of a TV + FoE problem against finite differences."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from backends import get_backend
from problems.composite import SumRegularizer
from problems.datasets import load_embedded_mnist
from problems.foe import FieldsOfExperts, dct_filters, initial_theta
from problems.imaging import ImagingProblem
from problems.operators import GaussianBlur
from problems.tv import TotalVariation
from tests.test_hypergradient import TIGHT, upper_loss_at

SHAPE = (9, 8)


def _parts():
    return TotalVariation(SHAPE, gamma=0.05), FieldsOfExperts(
        SHAPE, 3, 4, expert="smooth_l1", gamma=0.1, boundary="symmetric")


def test_sum_is_the_parts_summed_and_stacked(backend) -> None:
    tv, foe = _parts()
    reg = SumRegularizer([tv, foe])
    rng = np.random.default_rng(0)
    theta_tv = np.array([-1.0])
    theta_foe = initial_theta(dct_filters(3)[:4] * 2.0, rng.uniform(-1.0, 0.0, 4))
    theta = backend.asarray(np.concatenate([theta_tv, theta_foe.ravel()]))
    assert reg.theta_shape == (1 + 40,) and reg.mask_host().shape == (41,)
    xp = backend.xp
    X = backend.asarray(rng.random((2, 72)))
    V = backend.asarray(rng.standard_normal((2, 72, 3)))
    value, grad = reg.rows_value_and_grad(xp, X, theta)
    parts = [p.rows_value_and_grad(xp, X, backend.asarray(t))
             for p, t in ((tv, theta_tv), (foe, theta_foe))]
    # the sum of two (B,)/(B, n) arrays: exact up to one rounding of each entry
    np.testing.assert_allclose(backend.to_numpy(value),
                               sum(backend.to_numpy(p[0]) for p in parts), rtol=1e-15)
    np.testing.assert_allclose(backend.to_numpy(grad),
                               sum(backend.to_numpy(p[1]) for p in parts), rtol=1e-14,
                               atol=1e-15 * np.abs(backend.to_numpy(grad)).max())
    lin = reg.linearize(xp, X, theta)
    lins = [p.linearize(xp, X, backend.asarray(t)) for p, t in ((tv, theta_tv), (foe, theta_foe))]
    hvp = backend.to_numpy(lin.hvp(V))
    want = sum(backend.to_numpy(part.hvp(V)) for part in lins)
    np.testing.assert_allclose(hvp, want, rtol=1e-14, atol=1e-14 * np.abs(want).max())
    jt = backend.to_numpy(lin.jac_t(V))
    assert jt.shape == (2, 41, 3)
    np.testing.assert_array_equal(jt[:, :1], backend.to_numpy(lins[0].jac_t(V)))
    np.testing.assert_array_equal(jt[:, 1:], backend.to_numpy(lins[1].jac_t(V)))


def test_tv_plus_foe_hypergradient_matches_finite_differences() -> None:
    be = get_backend("numpy")
    image = load_embedded_mnist().images[3][6:22, 6:22]
    shape = (16, 16)
    reg = SumRegularizer([TotalVariation(shape, gamma=0.1),
                          FieldsOfExperts(shape, 3, 4, expert="smooth_l1", gamma=0.1,
                                          boundary="symmetric")])
    problem = ImagingProblem.from_image(image, be, GaussianBlur(shape, 0.6), reg,
                                        noise_level=0.1, seed=2, upper="neg_psnr")
    theta = np.concatenate([[-1.5], initial_theta(dct_filters(3)[[0, 2, 4, 7]], -1.0).ravel()])
    from framework.bilevel.engine import BilevelEngine

    result = BilevelEngine([problem], TIGHT).evaluate(be.asarray(theta))
    grad = be.to_numpy(result.grad)
    direction = np.random.default_rng(1).standard_normal(theta.shape)
    direction /= np.linalg.norm(direction)
    x0 = be.asarray(be.to_numpy(problem.y))
    # as in test_hypergradient: h = 1e-4, truncation O(h²), lower solves to ‖∇f‖ ≤ 1e-11
    h = 1e-4
    plus, g1 = upper_loss_at(problem, theta + h * direction, x0)
    minus, g2 = upper_loss_at(problem, theta - h * direction, x0)
    assert g1 <= 1e-11 and g2 <= 1e-11
    fd = (plus - minus) / (2 * h)
    analytic = float(grad @ direction)
    assert abs(analytic - fd) <= 1e-5 * max(abs(fd), 1e-3 * np.linalg.norm(grad))


def test_bad_sums_are_refused() -> None:
    tv, _ = _parts()
    with pytest.raises(ValueError, match="at least two"):
        SumRegularizer([tv])
    with pytest.raises(ValueError, match="different image shapes"):
        SumRegularizer([tv, TotalVariation((4, 4))])


def test_the_factory_builds_tv_plus_foe_with_its_start() -> None:
    from framework.experiment.config import ProblemConfig
    from problems.factory import build_problems

    cfg = ProblemConfig(num_samples=2, regularizer="tv_foe", tv_init_exponent=-1.7,
                        init_exponent=-4.0, kernel_size=3, num_filters=8, expert="smooth_l1")
    built = build_problems(cfg, get_backend("numpy"), 0)
    reg = built.problems[0].regularizer
    assert isinstance(reg, SumRegularizer) and isinstance(reg.parts[0], TotalVariation)
    assert built.theta0.shape == (1 + 8 * 10,) and built.theta0[0] == -1.7
    foe_theta = built.theta0[1:].reshape(8, 10)
    np.testing.assert_array_equal(foe_theta[:, :9], dct_filters(3).reshape(8, 9))
    assert np.all(foe_theta[:, 9] == -4.0) and np.all(built.mask == 1)
    assert reg.parts[0].gamma == reg.parts[1].expert.gamma == cfg.gamma  # one by default
    own = build_problems(replace(cfg, expert="student_t", gamma=0.05, tv_gamma=0.02),
                         get_backend("numpy"), 0).problems[0].regularizer
    assert (own.parts[0].gamma, own.parts[1].expert.gamma) == (0.02, 0.05)  # TV: its own
    assert not reg.parts[1].zero_mean
    centred = build_problems(replace(cfg, zero_mean_filters=True), get_backend("numpy"), 0)
    assert centred.problems[0].regularizer.parts[1].zero_mean


@pytest.mark.parametrize(("widths", "per_filter"), [("[1.0]", 10), ("[0.5,2.0]", 11)])
# student_t: an expert with a width (lorentzian, the preset's, has none to mix)
def test_a_tv_plus_foe_run_trains_and_draws_its_filters(tmp_path, widths: str,
                                                        per_filter: int) -> None:
    from hydra import compose, initialize_config_dir

    from framework.experiment import checkpoint
    from framework.experiment.runner import run

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base=None):
        cfg = compose(config_name="config", overrides=[
            "problem.regularizer=tv_foe", "problem.num_samples=2", "outer.batch_size=2",
            "problem.num_filters=4", "problem.kernel_size=3", "problem.tv_init_exponent=-2",
            "problem.expert=student_t", "problem.gamma=0.1", f"problem.expert_widths={widths}",
            "outer.steps=3", "tracking=disabled"])
    summary = run(cfg, output_dir=tmp_path)
    assert summary.theta.shape == (1 + 4 * per_filter,)  # TV's p, then K² + widths a filter
    history = checkpoint.load(summary.checkpoint_path)["history"]
    assert len(history) == 3 and all(np.isfinite(h["upper_loss"]) for h in history)
    assert (tmp_path / "figures" / "filters.png").stat().st_size > 0
