"""The compare view: rows from logged runs, savings references, table and figure."""

from __future__ import annotations

import math

import pytest

from framework.experiment import compare, names
from framework.experiment.tracker import Tracker


def _log_run(name, strategy, dim, its, shadow=None, sweep="s1"):
    t = Tracker(experiment="cmp")
    t.start(run_name=name, tags={names.SWEEP_TAG: sweep})
    t.log_params({"recycle.strategy": strategy, "recycle.dim": dim})
    total = total_shadow = 0.0
    for step, value in enumerate(its):
        total += value
        metrics = {
            "krylov_iterations": value,
            "cumulative_krylov_iterations": total,
            "cumulative_operator_applications": 2 * total,
            "hg_error_estimate": 0.1 * (step + 1),
            "upper_loss": 1.0 / (step + 1),
            "cumulative_step_time": 0.5 * (step + 1),
        }
        if shadow is not None:
            total_shadow += shadow
            metrics["cumulative_baseline_krylov_iterations"] = total_shadow
        t.log_metrics(metrics, step)
    t.end()
    return t.run_id


# MLflow's SQLAlchemy store triggers a SQLAlchemy deprecation warning; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")

@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    return {
        "base": _log_run("base", "none", "0", [20, 20, 20]),
        "ritz": _log_run("ritz", "ritz", "4", [20, 10, 10], shadow=20),
        "hr": _log_run("hr", "harmonic_ritz", "4", [20, 12, 12]),
        "other": _log_run("other", "ritz", "8", [5], sweep="s2"),
    }


def test_rows_match_logged_metrics_and_savings(runs, tmp_path):
    rows = compare.compare("cmp", sweep="s1", figure=tmp_path / "fig.png")
    assert [r.name for r in rows] == ["base", "ritz", "hr"]
    by = {r.name: r for r in rows}
    assert by["ritz"].krylov_iterations == 40 and by["ritz"].applications == 80
    assert by["ritz"].savings_reference == "shadow"
    assert math.isclose(by["ritz"].savings_percent, 100 * (1 - 40 / 60))
    assert by["hr"].savings_reference == "recycle=none run"
    assert math.isclose(by["hr"].savings_percent, 100 * (1 - 44 / 60))
    assert math.isclose(by["hr"].mean_hg_error, 0.2)
    assert by["hr"].solve_time == 1.5 and by["hr"].steps == 3 and by["hr"].wall_time >= 0
    assert by["base"].strategy == "none" and by["ritz"].dim == "4"
    assert (tmp_path / "fig.png").stat().st_size > 10_000
    table = compare.format_table(rows)
    assert len(table.splitlines()) == 5 and "harmonic_ritz" in table


def test_latest_sweep_and_cli(runs, tmp_path, capsys):
    rows = compare.compare("cmp", sweep="latest")
    assert [r.name for r in rows] == ["other"]
    assert math.isnan(rows[0].savings_percent)
    code = compare.main(["--experiment", "cmp", "--figure", str(tmp_path / "all.png")])
    out = capsys.readouterr().out
    assert code == 0 and "other" in out and "base" in out and (tmp_path / "all.png").exists()
    assert compare.main(["--experiment", "missing", "--figure", ""]) == 1
    assert "no MLflow experiment" in capsys.readouterr().err


def test_an_unknown_sweep_lists_the_experiments_sweeps(runs, capsys):
    assert compare.main(["--experiment", "cmp", "--sweep", "s9", "--figure", ""]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "hyperkrylov-compare: no runs in experiment 'cmp' sweep 's9'; its sweeps: s1, s2"


def test_compare_never_creates_a_store(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert compare.main(["--figure", ""]) == 1
    assert "no tracking store at" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no mlflow/ folder, no database
