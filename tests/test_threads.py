"""BLAS thread limits: chosen by rule, applied for a whole run, one per multirun job."""

from __future__ import annotations

import pytest
from test_app import BASE, _compose, _hyperkrylov, _runs
from threadpoolctl import threadpool_limits

from backends.threads import (
    DENSE_THREADED_ENTRIES,
    available_cores,
    choose_num_threads,
    limited_threads,
    pool_threads,
)
from framework.experiment.config import ConfigError, validate
from framework.experiment.engine_setup import make_engine
from framework.experiment.runner import run

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")


def test_choose_num_threads_rule():
    assert choose_num_threads("numpy", None) == 1
    assert choose_num_threads("array_api_strict", None, dense_entries=10) == 1
    assert choose_num_threads("numpy", None, dense_entries=DENSE_THREADED_ENTRIES) == (
        available_cores())
    assert choose_num_threads("numpy", 3) == 3
    assert choose_num_threads("cupy", 3) is None  # device work does not use host pools


def test_bad_num_threads_names_the_key():
    with pytest.raises(ConfigError, match=r"^backend\.num_threads: must be positive"):
        validate(_compose("backend.num_threads=0"))


def _two_threads_possible() -> int:
    with threadpool_limits(limits=2):
        reached = pool_threads()
    if reached is None or reached < 2:
        pytest.skip("the BLAS pool cannot run 2 threads on this machine")
    return 2


@pytest.mark.parametrize("requested", [None, 2])
def test_run_applies_its_limit_inside_and_restores_it(tmp_path, uri, requested):
    expected = 1 if requested is None else _two_threads_possible()
    with threadpool_limits(limits=2 if requested is None else 1):  # differ from the run's
        before = pool_threads()
        seen = []

        def factory(problem_set, cfg, backend):
            seen.append(pool_threads())  # threadpoolctl's report from inside the run
            return make_engine(problem_set, cfg, backend)

        overrides = [*BASE, "outer.steps=1", "checkpoint.every=0"]
        if requested is not None:
            overrides.append(f"backend.num_threads={requested}")
        summary = run(_compose(*overrides), output_dir=tmp_path / "run", engine_factory=factory)
        assert seen == [expected]
        assert pool_threads() == before  # the limit ends with the run
    (record,) = [r for r in _runs(uri) if r.run_id == summary.run_id]
    assert record.params["backend.blas_threads"] == str(expected)


@pytest.mark.slow
def test_each_joblib_multirun_job_gets_its_own_limit(tmp_path, uri):
    two = _two_threads_possible()
    sweep = tmp_path / "sweep"
    result = _hyperkrylov(
        ["-m", f"backend.num_threads=1,{two}", "hydra/launcher=joblib",
         "hydra.launcher.n_jobs=2", *BASE, "outer.steps=1", f"hydra.sweep.dir={sweep}"],
        tmp_path, uri,
    )
    assert result.returncode == 0, result.stderr
    records = _runs(uri, sweep=str(sweep))
    assert sorted((r.params["backend.num_threads"], r.params["backend.blas_threads"])
                  for r in records) == [("1", "1"), (str(two), str(two))]


def test_limited_threads_none_leaves_pools_alone():
    before = pool_threads()
    with limited_threads(None) as reported:
        assert reported == before == pool_threads()
