"""Adaptive recycling: the policy's choices on known costs, and the engine using it."""

from __future__ import annotations

import numpy as np
import pytest
from test_hypergradient import assert_mean_hypergradient_within_bound  # tests/ on sys.path

from framework.bilevel.adaptive import EXPLORE, RecyclePolicy
from framework.bilevel.engine import BilevelEngine, EngineConfig
from framework.krylov.recycle import RecycleConfig
from framework.krylov.stopping import StopConfig
from problems import QuadraticProblem

THETA = np.array([-1.0, 0.0, -2.0])


def simulate(policy, steps, iterations, plain, recycled, *, shadow=False):
    """Step a policy on systems of known cost: ``plain``/``recycled`` give the seconds per
    system of step t; a recycle space exists once some step has harvested.  Returns the
    (dimension used, seconds, harvested) of every step."""
    log, carry = [], False
    for t in range(steps):
        plan = policy.plan()
        used = plan.dim if carry else 0
        seconds = recycled(t) if used else plain(t)
        policy.record(used, seconds, iterations,
                      plain_seconds=plain(t) if shadow else None,
                      plain_iterations=iterations if shadow else None)
        carry = carry or plan.harvest > 0
        log.append((used, seconds, plan.harvest > 0))
    return log


def test_dimension_is_a_quarter_of_the_plain_iterations_up_to_k():
    for m, k, want in ((40, 30, 10), (200, 30, 30), (17, 30, 4), (15, 30, 3)):
        policy = RecyclePolicy(k)
        policy.record(0, 1.0, 999)  # the cold first step is not measured
        policy.record(0, 1.0, m)
        assert policy.affordable() == want == min(k, m // 4)


def test_short_systems_are_never_recycled_nor_harvested():
    log = simulate(RecyclePolicy(10), 60, 12, lambda t: 1.0, lambda t: 0.1)
    assert all(used == 0 and not harvested for used, _, harvested in log)


def tries(log):
    return [t for t, (used, _, _) in enumerate(log) if used]


@pytest.mark.parametrize("steps", [20, 100, 300])
def test_recycling_that_loses_costs_at_most_the_exploration_budget(steps):
    # recycling takes twice the time: a try (and the harvest before it) costs one plain
    # step; none starts before its cost fits in EXPLORE of the seconds spent, so a short
    # run never tries and a long one pays at most EXPLORE plus one try's overrun
    log = simulate(RecyclePolicy(10), steps, 80, lambda t: 1.0, lambda t: 2.0)
    assert not tries(log[: int(1 / EXPLORE)])
    assert sum(s for _, s, _ in log) <= (1 + EXPLORE) * steps + 1.0
    assert len(tries(log)) >= (1 if steps >= 2 / EXPLORE else 0)


def test_recycling_is_entered_only_by_budgeted_tries_while_systems_drift():
    # systems grow harder (plain seconds rise 5 % a step) and recycling costs 2 % more: the
    # plain average rising past the last try's stale figure must not switch to recycling
    def plain(t):
        return 1.0 + t / 20

    log = simulate(RecyclePolicy(10), 200, 80, plain, lambda t: 1.02 * plain(t))
    assert 1 <= len(tries(log)) <= 5
    assert all(not log[t - 1][0] and log[t - 1][2] for t in tries(log))  # each after a harvest


def test_recycling_that_pays_is_found_and_kept_with_k_prime_vectors():
    log = simulate(RecyclePolicy(30), 100, 80, lambda t: 1.0, lambda t: 0.5)
    used = [d for d, _, _ in log]
    first = used.index(20)
    assert set(used) == {0, 20} and first <= 1 / EXPLORE + 5
    assert used[first:].count(20) >= 0.9 * (100 - first)  # kept, but for rare plain tries


def test_a_change_of_costs_is_followed_both_ways():
    # recycling pays until step 80, then costs 3×, then pays again from step 140
    def recycled(t):
        return 0.5 if t < 80 or t >= 140 else 3.0

    log = simulate(RecyclePolicy(10), 300, 80, lambda t: 1.0, recycled)
    used = [d > 0 for d, _, _ in log]
    assert sum(used[40:80]) >= 38  # recycling while it pays (a plain try or two)
    assert sum(used[100:140]) <= 2  # after the change, back to plain solves within 20 steps
    assert sum(used[240:300]) >= 58  # and back to recycling once it pays again


def test_a_shadow_baseline_replaces_the_plain_tries():
    log = simulate(RecyclePolicy(10), 100, 80, lambda t: 1.0, lambda t: 0.5, shadow=True)
    used = [d for d, _, _ in log]
    first = used.index(10)
    assert first <= 1 / EXPLORE + 5 and used[first:] == [10] * (100 - first)


def test_engine_with_adaptive_recycling_keeps_hypergradients_exact(backend):
    # long systems (rtol 1e-10 on n = 40: m ≈ 40 iterations, so k' = 4 is tried); every
    # step's hypergradient matches the closed form within the tolerances' error bound
    gtol, rtol = 1e-7, 1e-10
    problems = [QuadraticProblem(n=40, num_terms=3, seed=s, backend=backend) for s in range(2)]
    cfg = EngineConfig(recycle=RecycleConfig("ritz", 4, adaptive=True),
                       stop=StopConfig(rtol=rtol), lower_gtol=gtol, lower_newton_steps=2)
    engine = BilevelEngine(problems, cfg, backend=backend)
    engine.policy = RecyclePolicy(4, explore=1.0)  # tries at once: the switching is tested
    dims = []
    for t in range(6):
        th = THETA + 0.02 * t
        result = engine.evaluate(backend.asarray(th))
        assert_mean_hypergradient_within_bound(backend, result.grad, problems, th, gtol, rtol)
        dims.append(result.samples[0].recycle_dim)
    assert dims[:3] == [0, 0, 0] and set(dims) <= {0, 4} and 4 in dims


@pytest.mark.parametrize("recycle", [RecycleConfig("eig", 4, adaptive=True),
                                     RecycleConfig("ritz", 4, selection="outer", adaptive=True)])
def test_adaptive_recycling_needs_inner_selection(recycle):
    problems = [QuadraticProblem(n=10)]
    with pytest.raises(ValueError, match="adaptive recycling needs"):
        BilevelEngine(problems, EngineConfig(recycle=recycle))


def test_adaptive_without_a_strategy_is_no_recycling():
    # recycle.strategy=none under the adaptive default: nothing to adapt, plain MINRES
    problems = [QuadraticProblem(n=10)]
    adaptive, plain = (BilevelEngine(problems, EngineConfig(recycle=RecycleConfig(adaptive=a)))
                       for a in (True, False))
    assert adaptive.policy is None
    one, other = adaptive.evaluate(np.zeros(adaptive.theta_shape)), plain.evaluate(
        np.zeros(plain.theta_shape))
    figures = lambda r: [(s.krylov_iterations, s.hvp, s.recycle_dim) for s in r.samples]  # noqa: E731
    assert figures(one) == figures(other) and np.array_equal(one.grad, other.grad)
