"""Kill-and-rerun harness (issue 16): the real CLI is killed at chosen moments, then the same
command is run again until it finishes; the job must end as if it had never been killed.

Each scenario runs a small quadratic job (6 steps, a checkpoint every 2: at steps 2, 4, 6)
with its own SQLite store, kills it at one or more moments (``tests/kill_points``), reruns it
and compares with one uninterrupted run of the same command: θ bit-identical, exactly one
MLflow run (FINISHED) in the store, every metric's history the same (same steps, same values
— for the wall-clock metrics the same steps — no duplicates, no gaps), the same artifacts
and the same files in the output folder and the store (so no temporary files are left).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from framework.experiment import checkpoint, names

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")]

REPO = Path(__file__).resolve().parents[1]
KILL_POINTS = Path(__file__).resolve().parent / "kill_points"
JOB = ["problem=quadratic", "problem.n=20", "problem.num_samples=2", "outer.lr=0.1",
       "outer.steps=6", "checkpoint.every=2"]
KILLED, TERMINATED = -signal.SIGKILL, 143  # the CLI's exit: killed; SIGTERM handled


def _cli(folder: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    """The job's command, in ``folder`` (output ``run/``, store ``store/mlflow.db``), with
    the kill point ``kill_at`` armed."""
    path = [str(KILL_POINTS)] if kill_at else []
    env = dict(os.environ, PYTHONUNBUFFERED="1", OPENBLAS_NUM_THREADS="1",
               MLFLOW_TRACKING_URI=f"sqlite:///{folder}/store/mlflow.db",
               PYTHONPATH=os.pathsep.join(filter(None, [*path, str(REPO),
                                                        os.environ.get("PYTHONPATH")])))
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("HYPERKRYLOV_TEST_KILL_CLI_PID", None)
    if kill_at:
        env["HYPERKRYLOV_TEST_KILL_AT"] = kill_at
    return subprocess.run(
        [sys.executable, "-m", "framework.experiment.app", *JOB, f"hydra.run.dir={folder}/run"],
        cwd=folder, env=env, capture_output=True, text=True, timeout=300)


@dataclass(frozen=True)
class Outcome:
    """What a finished job left: θ, its runs, their metric histories, params, artifacts and
    files (paths relative to the job's folder, the run id replaced by ``<run>``)."""

    theta: bytes
    theta_artifact: bytes
    statuses: list[str]
    histories: dict[str, list[tuple[int, float]]]
    params: dict[str, str]
    files: set[str]
    checkpoint_artifact_step: int


def _wall_clock(key: str) -> bool:
    """Whether the metric ``key`` is a time measured (its values differ run to run)."""
    return key in (names.STEP_TIME, names.cumulative(names.STEP_TIME)) or key.startswith("time_")


def _runs(folder: Path) -> tuple[Any, list[Any]]:
    """The job's MLflow client and every run in its store (any experiment, any state)."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder}/store/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return client, client.search_runs(experiments, run_view_type=ViewType.ALL)


def _outcome(folder: Path) -> Outcome:
    client, runs = _runs(folder)
    run = runs[0]
    run_id = run.info.run_id
    histories = {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
                 for key in run.data.metrics}
    files = {str(p.relative_to(folder)).replace(run_id, "<run>")
             for p in folder.rglob("*") if p.is_file()}
    artifact = folder / "store" / "artifacts" / "hyperkrylov" / run_id / "artifacts"
    return Outcome(
        theta=np.load(folder / "run" / "theta.npz")["theta"].tobytes(),
        theta_artifact=np.load(artifact / "theta.npz")["theta"].tobytes(),
        statuses=[r.info.status for r in runs],
        histories=histories,
        params=dict(run.data.params),
        files=files,
        checkpoint_artifact_step=checkpoint.load(artifact / "checkpoint.npz")["step"],
    )


@pytest.fixture
def job(tmp_path, empty_store) -> Path:
    """A folder for one job: an empty store in ``store/``, the output in ``run/``."""
    (tmp_path / "store").mkdir()
    shutil.copy(empty_store, tmp_path / "store" / "mlflow.db")
    return tmp_path


@pytest.fixture(scope="module")
def reference(made_once, empty_store) -> Outcome:
    """The uninterrupted job, run once for all xdist workers."""
    def make(folder: Path) -> None:
        (folder / "store").mkdir()
        shutil.copy(empty_store, folder / "store" / "mlflow.db")
        result = _cli(folder)
        assert result.returncode == 0, result.stderr

    outcome = _outcome(made_once("kill-reference", make))
    assert outcome.statuses == ["FINISHED"]
    assert outcome.checkpoint_artifact_step == 6
    return outcome


def _kill(folder: Path, kill_at: str, code: int = KILLED) -> None:
    """Run the job with the kill point ``kill_at`` armed: it must stop with ``code``."""
    result = _cli(folder, kill_at)
    assert result.returncode == code, (
        f"{kill_at}: exit {result.returncode}, expected {code}\n{result.stderr[-3000:]}")


def _rerun_is_uninterrupted(folder: Path, reference: Outcome) -> str:
    """Rerun the job unarmed: it finishes once, as the uninterrupted job; its stdout."""
    rerun = _cli(folder)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Traceback" not in rerun.stderr
    got = _outcome(folder)
    assert got.theta == reference.theta, "θ differs from the uninterrupted run's"
    assert got.theta_artifact == reference.theta
    assert got.statuses == ["FINISHED"], got.statuses  # one run: no orphan, no stray run
    assert got.histories.keys() == reference.histories.keys()
    for key, points in reference.histories.items():
        steps = [s for s, _ in got.histories[key]]
        assert steps == [s for s, _ in points], f"{key}: steps {steps}"  # once each
        if not _wall_clock(key):
            assert got.histories[key] == points, key
    assert got.params == reference.params
    assert got.checkpoint_artifact_step == reference.checkpoint_artifact_step
    left = got.files ^ reference.files
    assert not left, f"files that differ from the uninterrupted run's: {sorted(left)}"
    return rerun.stdout


def _left(folder: Path, pattern: str) -> list[Path]:
    return sorted(folder.rglob(pattern))


def test_killed_before_the_run_exists(job, reference):
    _kill(job, "create-run")
    assert not _runs(job)[1]
    _rerun_is_uninterrupted(job, reference)


def test_killed_right_after_the_run_exists(job, reference):
    _kill(job, "run-created")  # before its id was recorded in the output folder
    assert [r.info.status for r in _runs(job)[1]] == ["RUNNING"]
    assert not (job / "run" / names.RUN_ID_FILE).exists()
    _rerun_is_uninterrupted(job, reference)


def test_killed_mid_step(job, reference):
    _kill(job, "step:4")  # the CLI alone; its writer finishes the checkpoint of step 2
    stdout = _rerun_is_uninterrupted(job, reference)
    assert re.search(r"resuming from \S+ at step 2", stdout), stdout


def test_killed_right_after_a_checkpoint(job, reference):
    _kill(job, "checkpoint-sent:1")  # the CLI alone, as save_checkpoint(step 2) returns
    stdout = _rerun_is_uninterrupted(job, reference)
    assert re.search(r"resuming from \S+ at step 2", stdout), stdout


def test_killed_mid_checkpoint_write(job, reference):
    _kill(job, "checkpoint-write:2")  # step 4's: the metrics of steps 2, 3 are in the store
    assert _left(job / "run", ".checkpoint.npz.*.tmp")  # torn
    stdout = _rerun_is_uninterrupted(job, reference)
    assert re.search(r"resuming from \S+ at step 2", stdout), stdout


def test_killed_mid_artifact_logging(job, reference):
    _kill(job, "artifact:theta.npz")  # after the last checkpoint: the rerun only logs
    assert _left(job / "store", ".artifact.uploading.*")  # MLflow's, torn
    _rerun_is_uninterrupted(job, reference)


def test_killed_three_times_in_a_row(job, reference):
    _kill(job, "run-created")
    _kill(job, "step:3")  # from the start, adopting the run; killed after checkpoint 2
    _kill(job, "checkpoint-write:2")  # resumed; killed writing the last checkpoint (step 6)
    _rerun_is_uninterrupted(job, reference)


def test_sigterm_mid_step(job, reference):
    _kill(job, "sigterm:3", TERMINATED)  # held until step 3 ends: its state is saved
    assert [r.info.status for r in _runs(job)[1]] == ["KILLED"]
    stdout = _rerun_is_uninterrupted(job, reference)
    assert re.search(r"resuming from \S+ at step 3", stdout), stdout
