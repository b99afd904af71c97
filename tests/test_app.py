"""The experiment layer end to end: the `hyperkrylov` command, sweeps, resume, bad configs."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module

from framework.experiment import checkpoint, names, tracking
from framework.experiment.runner import run

# MLflow's SQLAlchemy store triggers a SQLAlchemy deprecation warning; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")

QUICK = [
    "problem=quadratic",
    "problem.n=20",
    "problem.num_samples=2",
    "outer.lr=0.1",
    "outer.steps=4",
    "checkpoint.every=2",
]
BASE = QUICK[:-2]  # without steps and checkpointing
# MNIST with 4 filters: ~0.1 s a step, slower than the creation of the run by its tracking
# writer (which a test waits for before it kills the run)
SLOW = ["problem.num_samples=2", "outer.batch_size=2", "problem.num_filters=4",
        "recycle.dim=3", "baseline=none"]


REPO = Path(__file__).resolve().parents[1]


def _command() -> list[str]:
    """This checkout's CLI (the venv's console script may belong to another checkout)."""
    return [sys.executable, "-m", "framework.experiment.app"]


def _env(uri: str) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, PYTHONUNBUFFERED="1", PYTHONPATH=path)
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def _hyperkrylov(args, cwd, uri, timeout=240):
    return subprocess.run(
        [*_command(), *args], cwd=cwd, env=_env(uri), capture_output=True, text=True,
        timeout=timeout,
    )


def _compose(*overrides: str):
    with initialize_config_module(config_module="conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize(
    ("override", "key", "code"),
    [
        ("recycle.strategy=ritzz", "recycle.strategy", 2),
        ("recycle.dim=-2", "recycle.dim", 2),
        ("problem=bsds_deblur", "problem.data_path", 2),
        ("outer.lr=0", "outer.lr", 2),
        ("recycle=ritzz", "recycle", 1),
        ("recycle.dimm=3", "dimm", 1),
        # pre-flight: a dataset folder without the data, an output folder that cannot exist
        ("problem=bsds_deblur problem.data_path=.", "images/train' holds 0 .jpg images", 2),
        ("problem.dataset=mnist problem.data_path=.", "t10k-images-idx3-ubyte.gz' not found", 2),
        ("hydra.run.dir={tmp}/a-file/run", "cannot write {tmp}/a-file/run", 2),
        ("outer.init_theta_path={tmp}/none.npz", "outer.init_theta_path", 2),
        ("outer.init_theta_path={tmp}/a-file", "cannot read θ", 2),
        ("outer.init_theta_path={tmp}/short.npz", "shape (3,), but this problem's θ", 2),
        ("outer.init_theta_path={tmp}/state.npz", "a checkpoint without θ", 2),
        ("task=evaluate evaluate.theta_path={tmp}/short.npz outer.init_theta_path="
         "{tmp}/short.npz", "outer.init_theta_path: starts a training run", 2),
    ],
)
def test_bad_config_fails_fast_without_an_mlflow_run(tmp_path, no_store_uri, override, key, code):
    (tmp_path / "a-file").write_text("")
    np.savez(tmp_path / "short.npz", theta=np.zeros(3))
    checkpoint.save(tmp_path / "state.npz", {"step": 1})
    override, key = override.format(tmp=tmp_path), key.format(tmp=tmp_path)
    start = time.perf_counter()
    result = _hyperkrylov([f"hydra.run.dir={tmp_path}/run", *override.split()], tmp_path,
                          no_store_uri)
    assert result.returncode == code, result.stderr
    assert key in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    assert time.perf_counter() - start < 30
    assert not (tmp_path / "mlflow.db").exists()  # no store, no experiment, no run
    assert not (tmp_path / "run" / "checkpoint.npz").exists()


def test_a_missing_backend_is_one_line_before_any_run(tmp_path, no_store_uri):
    from backends import available_backends

    if "cupy" in available_backends():
        pytest.skip("CuPy works here: nothing to refuse")
    result = _hyperkrylov(["backend=cupy", f"hydra.run.dir={tmp_path}/run"], tmp_path, no_store_uri)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("hyperkrylov: configuration error: backend.name: ")
    assert not (tmp_path / "mlflow.db").exists()


def _runs(uri, experiment="hyperkrylov", sweep=None):
    return tracking.read_runs(uri, experiment, sweep_id=sweep)


def _start_until(args, cwd, uri, path, **popen):
    """Start the CLI and return it once ``path`` exists (or it ended, or 120 s passed)."""
    proc = subprocess.Popen([*_command(), *args], cwd=cwd, env=_env(uri), **popen)
    deadline = time.monotonic() + 120
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    return proc


def _assert_continuous(record, steps):
    for key in ("upper_loss", "krylov_iterations", "cumulative_krylov_iterations"):
        points = record.history[key]
        assert sorted(s for s, _ in points) == list(range(steps)), key  # each step once


def test_quadratic_end_to_end_from_another_cwd(tmp_path, uri):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    out = tmp_path / "run"
    result = _hyperkrylov([*QUICK, "recycle=ritz", "recycle.dim=3", f"hydra.run.dir={out}"],
                          cwd, uri)
    assert result.returncode == 0, result.stderr
    (record,) = _runs(uri)
    assert record.status == "FINISHED"
    assert str(out) in result.stdout and record.run_id in result.stdout
    assert record.params["problem.name"] == "quadratic"
    assert record.params["recycle.dim"] == "3" and "seed_entropy" in record.params
    assert record.tags[names.OUTPUT_DIR_TAG] == str(out)
    _assert_continuous(record, 4)
    for key in ("hypergradient_norm", "operator_applications", "baseline_krylov_iterations",
                "cumulative_operator_applications", "lower_iterations"):
        assert len(record.history[key]) == 4, key
    cum = np.cumsum([v for _, v in record.history["krylov_iterations"]])
    np.testing.assert_array_equal(cum, [v for _, v in record.history[
        "cumulative_krylov_iterations"]])
    artifacts = {p.relative_to(tmp_path / "artifacts").parts[-1] for p in
                 (tmp_path / "artifacts").rglob("*") if p.is_file()}
    assert {"config.yaml", "theta.npz", "iterations_per_system.png",
            "cumulative_iterations.png", "upper_loss.png", "reconstruction.png"} <= artifacts
    theta = np.load(out / "theta.npz")["theta"]
    assert theta.shape == (3,) and np.all(np.isfinite(theta))
    assert checkpoint.load(out / "checkpoint.npz")["finished"] is True


def test_mnist_sample_end_to_end(tmp_path, uri):
    cfg = _compose(
        "problem.num_samples=2", "problem.num_filters=4", "outer.steps=3", "outer.batch_size=2",
        "recycle.dim=4",
    )
    summary = run(cfg, output_dir=tmp_path / "run")
    assert summary.steps == 3 and summary.theta.shape == (4, 26)
    (record,) = _runs(uri)
    assert record.run_id == summary.run_id and record.params["problem.dataset"] == "embedded_mnist"
    _assert_continuous(record, 3)
    assert (tmp_path / "run" / "figures" / "filters.png").exists()
    assert record.metrics["cumulative_krylov_iterations"] == summary.cumulative[
        "krylov_iterations"]


def _git_head() -> str | None:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return head.stdout.strip() if head.returncode == 0 else None


@pytest.mark.slow
def test_joblib_multirun_is_one_parent_run_with_nested_runs_and_compare_selects_it(
        tmp_path, uri, capsys):
    from framework.experiment import compare

    sweep = tmp_path / "sweep"
    result = _hyperkrylov(
        ["-m", "recycle=ritz,harmonic_ritz", "recycle.dim=2,4", *BASE, "outer.steps=3",
         "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}"],
        tmp_path, uri,
    )
    assert result.returncode == 0, result.stderr
    records = _runs(uri, sweep=str(sweep))  # the jobs (the parent run is left out)
    assert len(records) == 4 and len(_runs(uri)) == 4
    assert {(r.params["recycle.strategy"], r.params["recycle.dim"]) for r in records} == {
        ("ritz", "2"), ("ritz", "4"), ("harmonic_ritz", "2"), ("harmonic_ritz", "4")}
    assert sorted(int(r.tags["hyperkrylov.job_num"]) for r in records) == [0, 1, 2, 3]
    for job in range(4):  # each job's lines name it, in its own log
        assert f"[job {job}] step 3/3" in (sweep / str(job) / "hyperkrylov.log").read_text()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)  # one parent, created once by parallel jobs, ended FINISHED
    parent_id = (sweep / tracking.PARENT_RUN_FILE).read_text().strip()
    parent = client.get_run(parent_id)
    (experiment,) = {parent.info.experiment_id}
    assert parent.info.status == "FINISHED" and parent.info.run_name == str(sweep)
    assert len(client.search_runs([experiment])) == 5
    head = _git_head()
    for r in records:
        assert r.tags["mlflow.parentRunId"] == parent_id
        assert r.tags["mlflow.user"] and r.tags["mlflow.source.type"] == "LOCAL"
        assert r.tags["mlflow.source.name"].endswith(os.path.join("experiment", "app.py"))
        if head is not None:
            assert r.tags["mlflow.source.git.commit"] == head

    rows = compare.compare("hyperkrylov", sweep="latest", figure=tmp_path / "cmp.png")
    assert len(rows) == 4 and (tmp_path / "cmp.png").exists()
    by_id = {r.run_id: r for r in records}
    for row in rows:
        logged = by_id[row.run_id].metrics
        assert row.krylov_iterations == logged["cumulative_krylov_iterations"]
        assert row.applications == logged["cumulative_operator_applications"]
        expected = 100 * (1 - logged["cumulative_krylov_iterations"]
                          / logged["cumulative_baseline_krylov_iterations"])
        assert row.savings_percent == pytest.approx(expected)
        assert row.strategy == by_id[row.run_id].params["recycle.strategy"]
    table = compare.format_table(rows)
    assert len(table.splitlines()) == 6
    # the parent by id and by name: the same table; the figure is logged to the parent run
    capsys.readouterr()
    assert compare.main(["--sweep", parent_id, "--figure", ""]) == 0  # the entry point
    assert capsys.readouterr().out.strip() == table
    shown = subprocess.run(  # the command itself
        [sys.executable, "-m", "framework.experiment.compare", "--sweep", str(sweep)],
        cwd=tmp_path, env=_env(uri), capture_output=True, text=True, timeout=240)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"{table}\n")
    assert f"figures logged to the sweep's parent run {parent_id}" in shown.stdout
    assert [a.path for a in client.list_artifacts(parent_id, "compare")] == [
        "compare/comparison.png"]


@pytest.mark.slow
def test_sigterm_saves_ends_the_run_killed_and_the_rerun_resumes(tmp_path, uri):
    steps = 100_000  # far more than it can run before the signal, on any machine
    args = [*SLOW, f"outer.steps={steps}", "checkpoint.every=1",
            f"hydra.run.dir={tmp_path / 'run'}"]
    ckpt = tmp_path / "run" / "checkpoint.npz"
    proc = _start_until(args, tmp_path, uri, ckpt, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)
    time.sleep(0.2)  # a step has ended (its checkpoint exists); now mid-way through another
    proc.send_signal(signal.SIGTERM)  # a scheduler's preemption, once the run exists
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    saved = checkpoint.load(ckpt)["step"]
    assert "Traceback" not in err and f"interrupted after step {saved}; state saved" in out
    (record,) = _runs(uri)
    assert record.status == "KILLED"
    assert 0 < saved < steps

    rerun = _hyperkrylov([*args, f"outer.steps={saved + 3}"], tmp_path, uri)  # 3 more steps
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming from {ckpt} at step {saved}" in rerun.stdout
    (record,) = _runs(uri)
    assert record.status == "FINISHED"
    _assert_continuous(record, saved + 3)
    # the signal waited for its step to end: the resumed run is the uninterrupted one
    reference = _hyperkrylov(
        [*SLOW, f"outer.steps={saved + 3}", f"hydra.run.dir={tmp_path / 'ref'}",
         "tracking.experiment=reference"], tmp_path, uri)
    assert reference.returncode == 0, reference.stderr
    theta = np.load(tmp_path / "run" / "theta.npz")["theta"]
    assert theta.tobytes() == np.load(tmp_path / "ref" / "theta.npz")["theta"].tobytes()
    (ref_record,) = _runs(uri, "reference")
    assert dict(record.history["upper_loss"]) == dict(ref_record.history["upper_loss"])


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_is_continued_not_orphaned(tmp_path, uri):
    args = [*SLOW, "outer.steps=100000", "checkpoint.every=1000",
            f"hydra.run.dir={tmp_path / 'run'}"]
    recorded = tmp_path / "run" / names.RUN_ID_FILE
    proc = _start_until(args, tmp_path, uri, recorded, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "run" / "checkpoint.npz").exists()

    rerun = _hyperkrylov([*args, "outer.steps=4"], tmp_path, uri)  # from scratch, shorter
    assert rerun.returncode == 0, rerun.stderr
    (record,) = _runs(uri)  # the killed run, continued: no orphan left RUNNING
    assert record.run_id == recorded.read_text().strip() and record.status == "FINISHED"
    _assert_continuous(record, 4)


def test_checkpoint_off_writes_no_checkpoint_and_a_rerun_runs_again(tmp_path):
    cfg = _compose(*QUICK[:-1], "checkpoint=off", "tracking=disabled")
    first = run(cfg, output_dir=tmp_path)
    assert not first.checkpoint_path.exists() and first.steps == 4
    again = run(cfg, output_dir=tmp_path)  # nothing to resume: the same run again
    assert again.steps == 4 and again.theta.tobytes() == first.theta.tobytes()


@pytest.mark.slow
def test_parallel_jobs_share_one_fresh_sqlite_store(tmp_path, no_store_uri):
    procs = [
        subprocess.Popen(
            [*_command(), *QUICK, "outer.steps=3", f"recycle.dim={k}",
             f"hydra.run.dir={tmp_path / str(k)}"],
            cwd=tmp_path, env=_env(no_store_uri), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True,
        )
        for k in (1, 2, 3, 4)
    ]
    errors = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
    records = _runs(no_store_uri)
    assert sorted(r.params["recycle.dim"] for r in records) == ["1", "2", "3", "4"]
    assert all(r.status == "FINISHED" and len(r.history["upper_loss"]) == 3 for r in records)


def test_gradient_descent_backtracks_on_the_batch_loss(tmp_path):
    cfg = _compose("problem.num_samples=2", "problem.num_filters=4", "recycle.dim=2",
                   "outer=gd", "outer.lr=1", "outer.steps=2", "tracking=disabled",
                   "baseline=none")
    summary = run(cfg, output_dir=tmp_path)
    state = checkpoint.load(summary.checkpoint_path)
    history = state["history"]
    assert summary.run_id is None and summary.tracking_uri is None
    assert all(h["outer_backtracks"] > 0 for h in history)
    assert all(h["outer_step_size"] < 1 for h in history)
    losses = [h["upper_loss"] for h in history]
    assert losses[-1] < losses[0]


def test_lbfgs_lowers_the_full_batch_loss_at_every_step(tmp_path):
    cfg = _compose("problem.num_samples=2", "problem.num_filters=4", "recycle.dim=2",
                   "outer=lbfgs", "outer.lr=0.05", "outer.steps=4", "tracking=disabled",
                   "baseline=none")
    summary = run(cfg, output_dir=tmp_path)
    history = checkpoint.load(summary.checkpoint_path)["history"]
    losses = [h["upper_loss"] for h in history]
    # every step is accepted by Armijo on the same (full-batch) loss: a monotone decrease
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert all(h["outer_step_size"] > 0 for h in history)


def test_a_run_starts_from_the_theta_of_another_run(tmp_path, caplog):
    """``outer.init_theta_path``: the first step evaluates the file's θ.  A 2-step run's θ
    (``theta.npz``) started from is the θ a 3-step run reaches in its third step; the loss
    there agrees to the lower-level tolerance (the 3-step run's lower solves start warm,
    the new run's cold: the same x* to ``solver.lower.gtol`` 1e-6 relative, hence the loss
    to ~1e-6 relative of its size)."""
    common = [*QUICK, "tracking=disabled"]
    three = run(_compose(*common, "outer.steps=3"), output_dir=tmp_path / "three")
    two = run(_compose(*common, "outer.steps=2"), output_dir=tmp_path / "two")
    resumed = run(_compose(*common, "outer.steps=1", f"outer.init_theta_path={two.theta_path}"),
                  output_dir=tmp_path / "from-two")
    losses = [h["upper_loss"] for h in checkpoint.load(three.checkpoint_path)["history"]]
    first = checkpoint.load(resumed.checkpoint_path)["history"][0]["upper_loss"]
    assert first == pytest.approx(losses[2], rel=1e-6)
    assert abs(first - losses[0]) > 1e-3 * abs(losses[0])  # not the problem's own θ₀
    # its checkpoint serves as its θ file: the same θ, hence the same first step to the bit
    caplog.set_level(logging.INFO, logger="hyperkrylov")
    from_checkpoint = run(_compose(*common, "outer.steps=1",
                                   f"outer.init_theta_path={two.checkpoint_path}"),
                          output_dir=tmp_path / "from-checkpoint")
    assert checkpoint.load(from_checkpoint.checkpoint_path)["history"][0]["upper_loss"] == first
    assert "outer.init_theta_path: θ after step 2 of the checkpoint" in caplog.text


class _Uphill:
    """An engine whose hypergradients point uphill, so that no line-search trial along −g
    lowers the loss."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def evaluate(self, theta, indices=None):
        result = self._engine.evaluate(theta, indices)
        return dataclasses.replace(result, grad=-result.grad)


def _uphill(problem_set, cfg, backend):
    from framework.experiment.engine_setup import make_engine

    return _Uphill(make_engine(problem_set, cfg, backend))


@pytest.mark.parametrize("outer", ["lbfgs", "gd"])
def test_a_full_batch_run_whose_line_search_finds_no_descent_stops_there(tmp_path, uri, outer,
                                                                         caplog):
    """Full batch, deterministic: a refused step leaves θ and the optimiser as they were, so
    every later step would repeat it; the run ends after it, θ₀ kept, and says why and what
    to try (the lower level's tolerance, with its value)."""
    cfg = _compose(*QUICK, f"outer={outer}", "outer.steps=4", "outer.max_backtracks=3")
    with caplog.at_level(logging.INFO, logger="hyperkrylov"):
        summary = run(cfg, output_dir=tmp_path, engine_factory=_uphill)
    said = [r.getMessage() for r in caplog.records if "no trial step lowered" in r.getMessage()]
    assert len(said) == 1 and f"lower solver.lower.gtol (now {cfg.solver.lower.gtol:g})" in said[0]
    state = checkpoint.load(summary.checkpoint_path)
    assert summary.steps == 1 and state["stalled"] == 1 and state["finished"]
    assert state["history"][0]["outer_backtracks"] == 3
    assert np.array_equal(summary.theta, np.zeros_like(summary.theta))  # the quadratic θ₀
    (record,) = [r for r in _runs(uri) if r.run_id == summary.run_id]
    assert record.tags[names.STALLED_TAG] == "1" and record.status == "FINISHED"
    again = run(cfg, output_dir=tmp_path, engine_factory=_uphill)  # nothing left to do
    assert again.steps == 1 and again.resumed_from_step == 1


def test_a_mini_batch_run_goes_on_after_a_refused_step(tmp_path):
    """With mini-batches the next step's batch is another objective: no stop."""
    cfg = _compose(*QUICK, "outer=gd", "outer.batch_size=1", "outer.steps=3",
                   "outer.max_backtracks=2", "tracking=disabled")
    summary = run(cfg, output_dir=tmp_path, engine_factory=_uphill)
    history = checkpoint.load(summary.checkpoint_path)["history"]
    assert summary.steps == 3 and all(h["outer_step_size"] == 0 for h in history)


def test_unreachable_tracking_server_is_reported_at_start(tmp_path, uri):
    result = _hyperkrylov(
        [*QUICK, "tracking.uri=http://127.0.0.1:9", f"hydra.run.dir={tmp_path}/run"], tmp_path, uri
    )
    assert result.returncode == 3
    assert "unreachable" in result.stderr and "http://127.0.0.1:9" in result.stderr
    assert not (tmp_path / "run" / "checkpoint.npz").exists()


def test_sweep_id_groups_single_runs(tmp_path, uri):
    for k in (2, 3):
        cfg = _compose(*QUICK, f"recycle.dim={k}", "outer.steps=2", "tracking.sweep_id=grp")
        run(cfg, output_dir=tmp_path / str(k))
    assert len(_runs(uri, sweep="grp")) == 2


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path, uri):
    run(_compose(*QUICK, "recycle.dim=2", "tracking=disabled"), output_dir=tmp_path)
    from framework.experiment.config import ConfigError

    with pytest.raises(ConfigError, match=r"^recycle\.dim: .*another config"):
        run(_compose(*QUICK, "recycle.dim=3", "tracking=disabled"), output_dir=tmp_path)
    longer = run(_compose(*QUICK, "recycle.dim=2", "outer.steps=6", "tracking=disabled"),
                 output_dir=tmp_path)  # a longer run of the same config continues
    assert longer.resumed_from_step == 4 and longer.steps == 6


def test_resume_accepts_a_checkpoint_from_before_a_key_was_added(tmp_path, uri):
    """A key the schema gained after the checkpoint was written cannot have changed the
    run at its default value; set to anything else, it is a change like any other."""
    from framework.experiment import checkpoint
    from framework.experiment.config import ConfigError

    run(_compose(*QUICK, "outer.steps=2", "tracking=disabled"), output_dir=tmp_path)
    path = tmp_path / "checkpoint.npz"
    state = checkpoint.load(path)
    assert state["config"].pop("problem.coupling") == "0.5"  # as if written before it
    checkpoint.save(path, state)
    with pytest.raises(ConfigError, match=r"^problem\.coupling: .*another config"):
        run(_compose(*QUICK, "outer.steps=3", "problem.coupling=0.4", "tracking=disabled"),
            output_dir=tmp_path)
    resumed = run(_compose(*QUICK, "outer.steps=3", "tracking=disabled"), output_dir=tmp_path)
    assert resumed.resumed_from_step == 2 and resumed.steps == 3


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda s: s.pop("rng"), "no rng"),
        (lambda s: s.update(rng={"bit_generator": "PCG64", "state": "seven"}),
         "mini-batch generator's state is invalid"),
        (lambda s: s.update(theta=np.full_like(s["theta"], np.nan)), "θ is not a finite"),
    ],
)
def test_damaged_checkpoints_are_refused_naming_the_file(tmp_path, damage, says):
    cfg = _compose(*QUICK, "tracking=disabled")
    path = run(cfg, output_dir=tmp_path).checkpoint_path
    state = checkpoint.load(path)
    damage(state)
    checkpoint.save(path, state)
    with pytest.raises(checkpoint.CheckpointError, match=says) as info:
        run(cfg, output_dir=tmp_path)
    assert str(path) in str(info.value) and f"delete {path}" in str(info.value)


def test_an_unreadable_checkpoint_is_one_line_and_exit_2(tmp_path, uri):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.npz").write_bytes(b"not a checkpoint")
    result = _hyperkrylov([*QUICK, f"hydra.run.dir={tmp_path}/run"], tmp_path, uri)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("hyperkrylov: ") and "unreadable checkpoint" in last
    assert "Traceback" not in result.stderr and "allow_pickle" not in result.stderr


def test_divergence_stops_the_run_naming_the_step_and_keeps_the_checkpoint(tmp_path, uri):
    """Adam at lr 1e6 throws the FoE exponents to ~1e6 after one step: 10^p overflows and
    the lower-level problem is not finite at step 1 (the checkpoint of step 1 is kept)."""
    result = _hyperkrylov([*SLOW, "outer.lr=1e6", "outer.steps=3", "checkpoint.every=1",
                           f"hydra.run.dir={tmp_path}/run"], tmp_path, uri)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("hyperkrylov: step 1: the lower-level f or ∇f is not finite")
    assert "the checkpoint of step 1" in last and "Traceback" not in result.stderr
    state = checkpoint.load(tmp_path / "run" / "checkpoint.npz")
    assert state["step"] == 1 and np.all(np.isfinite(state["theta"]))
    (record,) = _runs(uri)
    assert record.status == "FAILED" and len(record.history["upper_loss"]) == 1


def test_without_a_terminal_progress_lines_reach_stdout_and_the_job_log(tmp_path, uri):
    """stdout is a pipe here (as under a scheduler or `> log.txt`): no progress bar, but
    lines at the first and last step (and every PROGRESS_SECONDS), in Hydra's job log too."""
    result = _hyperkrylov([*QUICK, "tracking=disabled", f"hydra.run.dir={tmp_path}/run"],
                          tmp_path, uri)
    assert result.returncode == 0, result.stderr
    for line in ("hyperkrylov: step 1/4: upper loss", "hyperkrylov: step 4/4: upper loss",
                 "hyperkrylov: finished 4 steps"):
        assert line in result.stdout
    log = (tmp_path / "run" / "hyperkrylov.log").read_text()
    assert "[hyperkrylov][INFO] - step 1/4: upper loss" in log
    assert "[hyperkrylov][INFO] - step 4/4: upper loss" in log
    assert "outer:" not in result.stdout + result.stderr  # no tqdm bar without a terminal


def test_help_says_what_the_tool_does_and_lists_the_groups(tmp_path, no_store_uri):
    result = _hyperkrylov(["--help"], tmp_path, no_store_uri)
    assert result.returncode == 0, result.stderr
    for part in ("== Tasks (task=...) ==", "resolve    re-solve a recording",
                 "recycle: auto, harmonic_ritz, none, rgen_both", "hyperkrylov-compare --paper",
                 "2 bad value or input"):
        assert part in result.stdout
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_mlflow_checkpoint_in_a_fresh_folder(tmp_path, uri):
    steps = 60
    args = [*BASE, "recycle.dim=3", f"outer.steps={steps}", "checkpoint.every=1"]
    first = tmp_path / "first"
    proc = _start_until([*args, f"hydra.run.dir={first}"], tmp_path, uri,
                        first / "checkpoint.npz", stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    with tracking.folder_lock(first):  # its writer has sent the store all it was given
        run_id = (first / names.RUN_ID_FILE).read_text().strip()
    shutil.rmtree(first)  # another machine: only the store is shared

    second = tmp_path / "second"
    resumed = _hyperkrylov([*args, f"resume_from={run_id}", f"hydra.run.dir={second}"],
                           tmp_path, uri)
    assert resumed.returncode == 0, resumed.stderr
    assert f"downloaded the checkpoint of MLflow run {run_id}" in resumed.stdout
    killed_at = int(re.search(r"resuming from \S+ at step (\d+)", resumed.stdout).group(1))
    assert 0 < killed_at < steps
    reference = _hyperkrylov(
        [*args, f"hydra.run.dir={tmp_path / 'ref'}", "tracking.experiment=reference"],
        tmp_path, uri,
    )
    assert reference.returncode == 0, reference.stderr
    theta = np.load(second / "theta.npz")["theta"]
    assert theta.tobytes() == np.load(tmp_path / "ref" / "theta.npz")["theta"].tobytes()
    (record,) = _runs(uri)  # the same run, continued: each step logged once
    assert record.run_id == run_id and record.status == "FINISHED"
    assert record.tags[names.OUTPUT_DIR_TAG] == str(second)
    _assert_continuous(record, steps)
    (ref_record,) = _runs(uri, "reference")
    for key in ("upper_loss", "cumulative_krylov_iterations"):
        assert dict(record.history[key]) == dict(ref_record.history[key])


def test_resume_from_an_unknown_run_is_one_line_before_any_work(tmp_path, no_store_uri):
    args = [*QUICK, "resume_from=0123abcd", f"hydra.run.dir={tmp_path}/run"]
    for missing in (f"store at {tmp_path}/mlflow.db", "run '0123abcd'"):
        result = _hyperkrylov(args, tmp_path, no_store_uri)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(
            f"hyperkrylov: configuration error: resume_from: no MLflow {missing}")
        assert len(result.stderr.strip().splitlines()) == 1 and "step 1/" not in result.stdout
        assert not (tmp_path / "run" / "checkpoint.npz").exists()
        tracking.prepare_experiment(no_store_uri, "hyperkrylov")  # the store, without that run
    assert _runs(no_store_uri) == []


def _read_only(folder: Path) -> list[str]:
    """A command prefix under which ``folder`` is read-only (root ignores permissions: a
    read-only bind mount in a private mount namespace); skips where neither works."""
    if os.geteuid() != 0:
        for path in (folder, *folder.iterdir()):
            path.chmod(0o555)
        return []
    script = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && exec "$@"'
    prefix = ["unshare", "-m", "sh", "-c", script, str(folder)]
    if shutil.which("unshare") is None or subprocess.run([*prefix, "true"]).returncode:
        pytest.skip("cannot make a folder read-only for root here (no mount namespace)")
    return prefix


def test_a_read_only_store_is_one_line_exit_3_and_no_run(tmp_path, empty_store):
    store = tmp_path / "store"
    store.mkdir()
    shutil.copyfile(empty_store, store / "mlflow.db")
    uri = f"sqlite:///{store}/mlflow.db"
    first = _hyperkrylov([*QUICK, f"hydra.run.dir={tmp_path}/a"], tmp_path, uri)
    assert first.returncode == 0, first.stderr
    result = subprocess.run(
        [*_read_only(store), *_command(), *QUICK, f"hydra.run.dir={tmp_path}/b"],
        cwd=tmp_path, env=_env(uri), capture_output=True, text=True, timeout=240)
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith(f"hyperkrylov: tracking error: the MLflow store "
                                    f"{store}/mlflow.db is read-only")
    assert "tracking=disabled" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert len(_runs(uri)) == 1 and not (tmp_path / "b" / "checkpoint.npz").exists()


@pytest.fixture
def mlflow_server(tmp_path, empty_store):
    """A ``mlflow server`` on 127.0.0.1 (artifacts proxied; its store a copy of the empty
    store); its URL.  Skips when it does not answer within 180 s (it imports much: about
    40 s on a loaded 2-core machine)."""
    shutil.copyfile(empty_store, tmp_path / "server.db")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.skip(f"mlflow server did not start: see {tmp_path / 'server.log'}")
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()


def _rest(url: str, endpoint: str, **query: str) -> dict:
    with urllib.request.urlopen(f"{url}{endpoint}?{urllib.parse.urlencode(query)}") as answer:
        return json.loads(answer.read())


@pytest.mark.slow
def test_figures_checkpoint_and_system_metrics_through_a_tracking_servers_rest_api(
        tmp_path, mlflow_server):
    env = _env(mlflow_server)
    env.update(MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="true",
               MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="0.2")
    result = subprocess.run([*_command(), *QUICK, f"hydra.run.dir={tmp_path}/run"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    experiment = _rest(mlflow_server, "/api/2.0/mlflow/experiments/get-by-name",
                       experiment_name="hyperkrylov")["experiment"]
    search = urllib.request.Request(
        f"{mlflow_server}/api/2.0/mlflow/runs/search", method="POST",
        data=json.dumps({"experiment_ids": [experiment["experiment_id"]]}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(search) as answer:
        (run,) = json.loads(answer.read())["runs"]
    run_id = run["info"]["run_id"]
    listed = _rest(mlflow_server, "/api/2.0/mlflow/artifacts/list", run_id=run_id,
                   path="figures")
    figures = {Path(f["path"]).name for f in listed["files"]}
    assert {"upper_loss.png", "cumulative_iterations.png", "iterations_per_system.png",
            "parameters.png", "reconstruction.png"} <= figures
    with urllib.request.urlopen(f"{mlflow_server}/get-artifact?" + urllib.parse.urlencode(
            {"path": "figures/upper_loss.png", "run_uuid": run_id})) as answer:
        assert answer.read().startswith(b"\x89PNG\r\n\x1a\n")
    root = {f["path"] for f in _rest(mlflow_server, "/api/2.0/mlflow/artifacts/list",
                                     run_id=run_id)["files"]}
    assert {"checkpoint.npz", "requirements.txt", "config.yaml"} <= root
    metrics = {m["key"] for m in run["data"]["metrics"]}
    assert "system/cpu_utilization_percentage" in metrics, sorted(metrics)
    assert "upper_loss" in metrics
