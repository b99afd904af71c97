"""MLflow tracking: params in batches, stepped metrics, artifacts, resume, errors."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy
import pytest

from framework.experiment import checkpoint, names, tracking
from framework.experiment.tracker import NullTracker, Tracker, make_tracker
from framework.experiment.tracking import TrackingError

# MLflow's SQLAlchemy store triggers a SQLAlchemy deprecation warning; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")

def test_mlflow_is_the_installed_package_not_the_repo_folder():
    import mlflow

    repo_store = Path(__file__).resolve().parents[1] / "mlflow"
    assert "site-packages" in mlflow.__file__
    assert not (repo_store / "__init__.py").exists()


def test_only_tracking_imports_mlflow():
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for folder in ("framework", "backends", "problems"):
        for path in (root / folder).rglob("*.py"):
            if path.name == "tracking.py":
                continue
            text = path.read_text()
            if "import mlflow" in text or "from mlflow" in text:
                offenders.append(str(path))
    assert offenders == []


def test_uri_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_uri(None, tmp_path) == f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////x/env.db")
    assert tracking.resolve_uri(None) == "sqlite:////x/env.db"
    assert tracking.resolve_uri("http://h:5000") == "http://h:5000"
    assert tracking.artifact_root(f"sqlite:///{tmp_path}/m.db") == (tmp_path / "artifacts").as_uri()


def test_run_logs_params_metrics_tags_and_artifacts(uri, tmp_path):
    tracker = Tracker(experiment="unit")
    tracker.start(run_name="r1", tags={names.SWEEP_TAG: "s1"})
    params = {f"p{i:03d}": i for i in range(250)}
    params["long"] = "x" * 7000
    tracker.log_params(params)
    for step in range(3):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "iters": 10 + step, "skip": "text"}, step)
    (tmp_path / "theta.npz").write_bytes(b"data")
    tracker.log_artifact(tmp_path / "theta.npz")
    tracker.log_text("a: 1\n", "config.yaml")
    tracker.end()

    (record,) = tracking.read_runs(None, "unit", sweep_id="s1")
    assert record.run_id == tracker.run_id and record.name == "r1" and record.status == "FINISHED"
    assert len(record.params) == 251 and len(record.params["long"]) == 6000
    assert record.history["loss"] == ((0, 1.0), (1, 0.5), (2, 1 / 3))
    assert "skip" not in record.metrics
    assert tracking.read_runs(None, "unit", sweep_id="other") == []
    artifacts = tmp_path / "artifacts"
    assert sorted(p.name for p in artifacts.rglob("*") if p.is_file()) == [
        "config.yaml",
        "requirements.txt",
        "theta.npz",
    ]
    # the tags mlflow.start_run would add, and the source tree's commit (a git checkout here)
    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                          text=True)
    assert record.tags["mlflow.user"] and record.tags["mlflow.source.type"] == "LOCAL"
    assert record.tags["mlflow.source.name"] == sys.argv[0]
    if head.returncode == 0:
        assert record.tags["mlflow.source.git.commit"] == head.stdout.strip()
    (requirements,) = artifacts.rglob("requirements.txt")
    assert f"numpy=={numpy.__version__}\n" in requirements.read_text()


def test_resume_continues_the_same_run(uri):
    first = Tracker(experiment="unit")
    first.start(run_name="r")
    first.log_params({"a": 1, "b": 2})
    first.log_metrics({"loss": 3.0}, 0)
    first.flush()
    run_id = first.run_id  # abandoned here, its writes done: the run stays RUNNING
    second = Tracker(experiment="unit")
    second.start(run_id=run_id)
    assert second.run_id == run_id
    second.log_params({"a": 1, "b": 5, "c": 3})  # b changed: recorded as a tag, no error
    second.log_metrics({"loss": 2.0}, 1)
    second.end()
    (record,) = tracking.read_runs(None, "unit")
    assert record.params == {"a": "1", "b": "2", "c": "3"}
    assert record.tags["resume.b"] == "5"
    assert record.history["loss"] == ((0, 3.0), (1, 2.0))


def test_a_resumed_run_does_not_log_steps_the_store_holds_again(uri):
    first = Tracker(experiment="unit")
    first.start(run_name="r")
    for step, loss, seconds in ((0, 3.0, 0.5), (1, 2.0, 0.6)):  # step 1: after the checkpoint
        first.log_metrics({"loss": loss, "seconds": seconds}, step)
    run_id = first.flush()  # then killed: the rerun resumes from the checkpoint of step 1
    second = Tracker(experiment="unit")
    second.start(run_id=run_id)
    for step, loss, seconds in ((1, 2.0, 0.7), (2, 1.0, 0.4)):
        second.log_metrics({"loss": loss, "seconds": seconds}, step)
    second.end()
    (record,) = tracking.read_runs(None, "unit")
    assert record.history["loss"] == ((0, 3.0), (1, 2.0), (2, 1.0))
    assert record.history["seconds"] == ((0, 0.5), (1, 0.6), (2, 0.4))  # step 1's first


def test_a_run_killed_before_recording_its_id_is_adopted_by_the_rerun(uri, tmp_path):
    recorded = tmp_path / names.RUN_ID_FILE
    tags = {names.OUTPUT_DIR_TAG: str(tmp_path)}
    first = Tracker(experiment="unit")
    first.start(run_name="r", tags=tags)  # created, not recorded: as if killed right then
    run_id = first.flush()
    other = Tracker(experiment="unit")  # another folder's unfinished run: not adopted
    other.start(run_name="o", tags={names.OUTPUT_DIR_TAG: str(tmp_path / "other")})
    other.flush()
    second = Tracker(experiment="unit")
    second.start(run_name="r", tags=tags, record_to=recorded)
    assert second.run_id == run_id and recorded.read_text() == run_id
    second.end()
    third = Tracker(experiment="unit")  # that run finished: a rerun starts a new one
    third.start(run_name="r", tags=tags, record_to=recorded)
    assert third.run_id not in (run_id, None) and recorded.read_text() == third.run_id
    third.end()


def test_unreachable_server_is_reported_fast():
    start = time.perf_counter()
    with pytest.raises(TrackingError, match="unreachable"):
        Tracker("http://127.0.0.1:9", "unit")
    assert time.perf_counter() - start < 10


def test_deleted_experiment_and_missing_experiment(uri):
    tracking.prepare_experiment(uri, "gone")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    client.delete_experiment(client.get_experiment_by_name("gone").experiment_id)
    with pytest.raises(TrackingError, match="deleted"):
        Tracker(experiment="gone").end()
    with pytest.raises(TrackingError, match="no MLflow experiment"):
        tracking.read_runs(None, "never")


def test_null_tracker_records_nothing(tmp_path):
    before = set(sys.modules)
    t = make_tracker(type("C", (), {"enabled": False})())
    assert isinstance(t, NullTracker) and not t.enabled
    assert t.start(run_name="x") is None
    t.log_params({"a": 1})
    t.log_metrics({"a": 1.0}, 0)
    t.log_artifact(tmp_path / "none")
    t.end()
    assert t.describe() == "tracking disabled"
    assert "mlflow" in before or "mlflow" not in sys.modules


def test_default_store_is_mlflow_folder_of_cwd(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    tracker = make_tracker(
        type("C", (), {"enabled": True, "uri": None, "experiment": "default"})()
    )
    tracker.start(run_name="r")
    (tmp_path / "f.txt").write_text("x")
    tracker.log_artifact(tmp_path / "f.txt")
    tracker.end()
    assert tracker.uri == f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    assert (tmp_path / "mlflow" / "mlflow.db").is_file()
    assert list((tmp_path / "mlflow" / "artifacts").rglob("f.txt"))
    assert not (tmp_path / "mlflow" / "__init__.py").exists()


def test_a_failed_write_is_raised_as_one_line_and_stops_the_writes(uri):
    tracker = Tracker(experiment="unit")
    tracker.start(run_name="r")
    tracker.log_params({"bad?name": 1})  # MLflow rejects the key, in the writer process
    with pytest.raises(TrackingError, match="bad\\?name") as info:
        tracker.flush()  # the writer got past it
    assert "\n" not in str(info.value) and str(info.value).startswith("MLflow ")
    with pytest.raises(TrackingError, match="bad\\?name"):
        tracker.log_metrics({"loss": 1.0}, 0)
    with pytest.raises(TrackingError, match="bad\\?name"):
        tracker.end()
    (record,) = tracking.read_runs(None, "unit")
    assert record.status == "RUNNING" and record.params == {} and record.metrics == {}


def test_writes_return_before_the_store_exists_and_all_reach_it(no_store_uri, tmp_path):
    db = tracking.sqlite_path(no_store_uri)
    with tracking._store_lock(no_store_uri):  # the writer waits here to create the store
        tracker = Tracker(experiment="unit")
        tracker.start(run_name="r")
        for step in range(5):
            tracker.log_metrics({"loss": float(step)}, step)
        tracker.save_checkpoint(tmp_path / "ckpt.npz", {"step": 5})
        assert not db.exists() and not (tmp_path / "ckpt.npz").exists()
    tracker.end()
    (record,) = tracking.read_runs(None, "unit")
    assert record.history["loss"] == tuple((s, float(s)) for s in range(5))
    assert record.status == "FINISHED"
    # the checkpoint was written after the metrics before it, naming the run
    assert checkpoint.load(tmp_path / "ckpt.npz") == {"step": 5, "run_id": record.run_id}


def test_the_writer_exits_when_its_run_is_killed(uri, tmp_path):
    script = (
        "import os, signal; from framework.experiment.tracker import Tracker\n"
        "t = Tracker(experiment='unit'); t.start(run_name='r'); t.flush()\n"
        "print(t._writer.process.pid, flush=True); os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    writer = int(done.stdout.split()[0])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and Path(f"/proc/{writer}").exists():
        if "Z" in Path(f"/proc/{writer}/stat").read_text().split(")")[-1].split()[:1]:
            break  # exited, not yet reaped
        time.sleep(0.1)
    else:
        pytest.fail(f"the writer process {writer} outlived its killed run")


@contextlib.contextmanager
def _read_only(folder: Path):
    """``folder`` read-only, for root too (``chattr +i``): SQLite cannot write its journal
    there, so every write to a store in it fails as on a read-only file system."""
    if os.geteuid() == 0:
        flags = ["chattr", "+i", str(folder)]
        if shutil.which("chattr") is None or subprocess.run(flags).returncode != 0:
            pytest.skip("cannot make a folder read-only for root here (chattr +i)")
    else:
        folder.chmod(0o555)
    try:
        yield
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(0o755)


def test_a_store_made_read_only_mid_run_buffers_and_the_next_run_sends(tmp_path, empty_store,
                                                                        caplog):
    store, folder = tmp_path / "store", tmp_path / "run"
    store.mkdir()
    folder.mkdir()
    shutil.copyfile(empty_store, store / "mlflow.db")
    uri, recorded = f"sqlite:///{store}/mlflow.db", folder / "mlflow_run_id"
    pending = folder / tracking.PENDING_FILE
    first = Tracker(uri, "unit")
    first.start(run_name="r", record_to=recorded)
    first.log_metrics({"loss": 0.0}, 0)
    run_id = first.flush()
    with caplog.at_level(logging.INFO, logger="hyperkrylov"), _read_only(store):
        for step in (1, 2, 3):
            first.save_checkpoint(folder / "ckpt.npz", {"step": step}, [({"loss": step}, step)])
        first.flush()
        assert checkpoint.load(folder / "ckpt.npz")["step"] == 3  # checkpoints went on
        first.end()  # no error: its writes wait in the run's folder
        (record,) = tracking.read_runs(uri, "unit")
    assert record.status == "RUNNING" and record.history["loss"] == ((0, 0.0),)
    said = [r.getMessage() for r in caplog.records if r.name == "hyperkrylov"]
    assert len([m for m in said if "unavailable (OperationalError: " in m]) == 1
    # 3 checkpoints' metrics, the first one's artifact (uploads are at most every
    # UPLOAD_SECONDS), the last one's at the end, and the end
    assert said[-1] == (f"6 writes buffered in {pending}; they will be sent by the next run "
                        "in this folder")

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hyperkrylov"):
        second = Tracker(uri, "unit")  # the rerun in this folder sends them first
        second.start(run_id=run_id, record_to=recorded)
        second.end()
    assert [r.getMessage() for r in caplog.records if r.name == "hyperkrylov"] == [
        f"tracking store {uri} answers: sent the 6 writes buffered in {pending}"]
    (record,) = tracking.read_runs(uri, "unit")
    assert record.status == "FINISHED" and not pending.exists()
    assert record.history["loss"] == tuple((s, float(s)) for s in range(4))
    assert record.tags[names.BUFFERED_WRITES_TAG] == "6"
    artifact = store / "artifacts" / "unit" / run_id / "artifacts" / "ckpt.npz"
    assert checkpoint.load(artifact)["step"] == 3  # the last checkpoint, uploaded at the end


def test_a_buffered_write_the_store_rejects_is_moved_aside(tmp_path, empty_store):
    store, folder = tmp_path / "store", tmp_path / "run"
    store.mkdir()
    folder.mkdir()
    shutil.copyfile(empty_store, store / "mlflow.db")
    uri, recorded = f"sqlite:///{store}/mlflow.db", folder / "mlflow_run_id"
    first = Tracker(uri, "unit")
    first.start(run_name="r", record_to=recorded)
    run_id = first.flush()
    with _read_only(store):
        first.log_metrics({"loss": 1.0}, 1)  # the outage starts
        first.log_params({"bad?name": 1})  # buffered as it came
        first.end()
    second = Tracker(uri, "unit")
    second.start(run_id=run_id, record_to=recorded)
    with pytest.raises(TrackingError, match=r"bad\?name.*not all sent \(kept in .*\.rejected\)"):
        second.end()
    assert (folder / "mlflow_pending.rejected").is_file()
    assert not (folder / tracking.PENDING_FILE).exists()
    (record,) = tracking.read_runs(uri, "unit")
    assert record.history["loss"] == ((1, 1.0),)  # the writes before it were sent


def test_a_resolve_run_names_its_recording_run_and_logs_the_recording_as_input(tmp_path, uri):
    from hydra import compose, initialize_config_module
    from mlflow.tracking import MlflowClient

    from framework.experiment.runner import run

    quadratic = ["problem=quadratic", "problem.n=12", "problem.num_samples=1", "outer.steps=2",
                 "baseline=none", "progress=false", "recycle.dim=2"]
    with initialize_config_module(config_module="conf", version_base="1.3"):
        record_cfg = compose(config_name="config", overrides=[*quadratic, "task=record"])
        recorded = run(record_cfg, output_dir=tmp_path / "record")
        resolve_cfg = compose(config_name="config", overrides=[
            *quadratic, "task=resolve", f"sequence.path={recorded.sequence_path}"])
    resolved = run(resolve_cfg, output_dir=tmp_path / "resolve")
    found = MlflowClient(uri).get_run(resolved.run_id)
    assert found.data.tags[names.RECORD_RUN_TAG] == recorded.run_id
    (given,) = found.inputs.dataset_inputs
    assert given.dataset.name == "recording"
    assert json.loads(given.dataset.source)["uri"] == str(recorded.sequence_path)
    assert {(t.key, t.value) for t in given.tags} == {("mlflow.data.context", "resolve")}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pipe sizes: Linux only")
def test_the_pipe_says_what_it_takes_without_blocking():
    from framework.experiment.tracker import _Pipe

    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)  # a write that would block raises instead
    try:
        pipe = _Pipe(write_end, size=1 << 16)
        assert pipe.capacity >= 1 << 16
        free = pipe.capacity - 2 * _Pipe.PAGE
        assert pipe.takes(free) and not pipe.takes(free + 1)
        os.write(write_end, b"x" * 40_000)
        assert pipe.takes(free - 40_000) and not pipe.takes(free - 39_999)
        rest = free - 40_000  # what it said it takes goes in whole, without blocking
        assert os.write(write_end, b"y" * rest) == rest
        os.read(read_end, 10_000)  # the reader frees space
        assert pipe.takes(10_000) and not pipe.takes(10_001)
    finally:
        os.close(read_end)
        os.close(write_end)
