"""Recorded training sequences: save/load round trip and re-solving per strategy."""

from __future__ import annotations

import numpy as np
import pytest

from backends import get_backend
from framework.bilevel.engine import BilevelEngine, EngineConfig
from framework.bilevel.recording import RecordedSequence, record_training
from framework.krylov.recycle import RecycleConfig
from framework.krylov.sequence import solve_sequence
from framework.krylov.stopping import StopConfig
from framework.optim import Adam
from problems import QuadraticProblem


@pytest.fixture
def recorded(tmp_path):
    be = get_backend("numpy")
    problems = [QuadraticProblem(n=40, seed=s, backend=be) for s in range(2)]
    engine = BilevelEngine(problems, EngineConfig(stop=StopConfig(rtol=1e-10), lower_gtol=1e-10,
                                                 lower_newton_steps=3),
                           backend=be)
    rec, losses = record_training(engine, Adam(lr=0.1), be.asarray(np.zeros(3)), 6,
                                  problem_config={"name": "quadratic", "n": 40})
    path = rec.save(tmp_path / "sequence.npz")
    return be, problems, rec, losses, path


def test_roundtrip_and_shapes(recorded):
    _, problems, rec, losses, path = recorded
    loaded = RecordedSequence.load(path)
    assert loaded.steps == 6 and loaded.xs.shape == (6, 2, 40)
    np.testing.assert_array_equal(loaded.thetas, rec.thetas)
    np.testing.assert_array_equal(loaded.xs, rec.xs)
    assert loaded.config() == {"name": "quadratic", "n": 40}
    assert losses[-1] < losses[0]
    # x_t are the lower-level solutions at θ_t
    for t in range(6):
        np.testing.assert_allclose(rec.xs[t, 1], problems[1].exact_solution(rec.thetas[t]),
                                   rtol=1e-8)


def test_resolved_sequence_gives_exact_hypergradients(recorded):
    be, problems, rec, _, path = recorded
    systems = RecordedSequence.load(path).systems(problems[1], be, sample=1, references=True)
    for cfg in (RecycleConfig(), RecycleConfig("ritz", 3)):
        res = solve_sequence(systems, recycle=cfg, stop=StopConfig(rtol=1e-11))
        for t, r in enumerate(res.records):
            exact = problems[1].exact_hypergradient(rec.thetas[t])
            np.testing.assert_allclose(r.hypergradient, exact, rtol=1e-7)
            assert r.hg_error < 1e-8


def test_mismatched_problem_is_refused(recorded):
    be, problems, rec, _, _ = recorded
    with pytest.raises(ValueError, match="does not match"):
        rec.systems(problems[0], be, sample=1)
