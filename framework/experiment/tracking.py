"""Experiment tracking through MLflow — the only module of hyperkrylov that imports mlflow.

The store: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///<cwd>/mlflow/mlflow.db`` with artifacts in ``artifacts/`` beside it.  A new
SQLite file's schema is created under a file lock (parallel jobs would race on it).

Run as a script, this module is the writer process of ``framework.experiment.tracker``.
Outages: HTTP requests are bounded (``HTTP_LIMITS``); a write the store cannot take
(unreachable, 5xx, read-only or I/O error) is appended to ``PENDING_FILE`` in the run's
output folder, and so is every later one until the store takes them all, in order (tried
every ``RETRY_SECONDS``, at the run's end and by the next run in that folder).  Resending is
safe: MLflow's SQL stores keep one copy of a metric with the same key, step, time and value.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.metadata
import json
import logging
import math
import os
import pickle
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock

from framework.experiment import checkpoint, names

MAX_PARAM_LENGTH = 6000  # MLflow's limit, to which it cuts longer values
PENDING_FILE = "mlflow_pending.jsonl"  # in a run's output folder: writes the store has not taken
RETRY_SECONDS = 5.0  # while the store is unavailable, how often the writer tries it again
UPLOAD_SECONDS = 10.0  # the checkpoint artifact: uploaded at most this often, and at the end
# unless set: a dead server costs seconds per try, not MLflow's default of minutes
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
PARENT_RUN_FILE = "mlflow_parent_run_id"  # in a sweep folder: the sweep's parent run
SWEEP_TASK = "sweep"  # the task tag of a sweep's parent run


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable server, bad URI, deleted experiment)."""


def resolve_uri(uri: str | None = None, cwd: str | Path | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow/mlflow.db``."""
    default = (Path(cwd or Path.cwd()) / "mlflow" / "mlflow.db").resolve()
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{default}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores)."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def artifact_root(uri: str) -> str | None:
    """Artifact root for new experiments: ``<db folder>/artifacts`` for SQLite, else None."""
    db = sqlite_path(uri)
    return None if db is None else (db.parent / "artifacts").resolve().as_uri()


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise ``TrackingError`` when an http(s) tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
        return
    except urllib.error.HTTPError as exc:  # an answer; 5xx: the server is broken
        if exc.code < 500:
            return
        reason: Any = f"HTTP {exc.code}"
    except OSError as exc:  # URLError included
        reason = getattr(exc, "reason", exc)
    raise TrackingError(
        f"MLflow tracking server {uri} is unreachable ({reason}); start it "
        "(`mlflow server ...`), fix tracking.uri / MLFLOW_TRACKING_URI, or run with "
        "tracking=disabled")


def check_writable(uri: str) -> None:
    """Raise ``TrackingError`` when a SQLite store (its file, folder or artifact folder, or
    the nearest existing folder above) cannot be written."""
    db = sqlite_path(uri)
    if db is None:
        return
    nearest = next(p for p in (db.parent, *db.parent.parents) if p.exists())
    for path in (db, db.parent / "artifacts", nearest):
        if path.exists() and not os.access(path, os.W_OK):
            raise TrackingError(
                f"the MLflow store {db} is read-only ({path} cannot be written); make it "
                "writable, choose another store (tracking.uri or MLFLOW_TRACKING_URI), or "
                "run with tracking=disabled")


def end_sweep(uri: str, folder: str | Path) -> None:
    """End the parent run of the sweep in ``folder`` (when a job created one): FINISHED, or
    FAILED when a nested run did not finish."""
    record = Path(folder) / PARENT_RUN_FILE
    if not record.is_file():
        return
    client, parent = _client(uri), record.read_text().strip()
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    failed = any(run.info.status != "FINISHED" for run in children)
    client.set_terminated(parent, "FAILED" if failed else "FINISHED")


def _store_lock(uri: str) -> contextlib.AbstractContextManager[Any]:
    """Serialises store creation (schema migrations) of one SQLite file across processes."""
    if (db := sqlite_path(uri)) is None:
        return contextlib.nullcontext()
    (db.parent / "artifacts").mkdir(parents=True, exist_ok=True)
    return filelock.FileLock(db.parent / f".{db.name}.lock")


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    check_reachable(uri)
    with _store_lock(uri):
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # creates the schema, under the lock
    return client


def _experiment_id(client: Any, uri: str, name: str) -> str | None:
    """The id of the experiment ``name`` (None when there is none); deleted is an error."""
    exp = client.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow experiment {name!r} is deleted at {uri}; restore it "
            "(`mlflow experiments restore`) or choose another tracking.experiment")
    return None if exp is None else exp.experiment_id


def prepare_experiment(uri: str, name: str, client: Any = None) -> str:
    """Create the experiment ``name`` (and the SQLite schema) once; return its id."""
    from mlflow.exceptions import MlflowException

    client = client or _client(uri)
    with _store_lock(uri):
        if (exp_id := _experiment_id(client, uri, name)) is not None:
            return exp_id
        root = artifact_root(uri)
        try:
            return client.create_experiment(
                name, artifact_location=None if root is None else f"{root}/{name}")
        except MlflowException:  # created meanwhile by a parallel job (a server's store)
            if (exp_id := _experiment_id(client, uri, name)) is None:
                raise
            return exp_id


# -- the writer process (run as a script by framework.experiment.tracker) ----------------
class _Writer:
    """The writer process's side of one tracker: the MLflow client and the active run."""

    def __init__(self, notify: Callable[[int, str], None]) -> None:
        self.notify = notify  # (logging level, message) for the run's console
        self.client: Any = None
        self.uri = self.experiment = self.experiment_id = ""
        self.active: str | None = None
        self.lock: filelock.FileLock | None = None
        self.monitor: Any = None  # MLflow's system metrics monitor, when enabled
        self.failed = False  # after a failure, requests are only answered
        self.pending: Path | None = None  # the output folder's PENDING_FILE (None: no folder)
        self.waiting = 0  # writes in it: while > 0, every write is appended to it
        self.retry_at = 0.0  # time.monotonic() of the next try to send them
        self.logged: dict[str, int] = {}  # a resumed run's last step in the store, per metric
        self.unsent: str | None = None  # a checkpoint saved but not uploaded yet
        self.upload_at = 0.0  # time.monotonic() from which a checkpoint is uploaded

    def open(self, uri: str, experiment: str) -> None:
        self.uri, self.experiment = uri, experiment
        self.client = _client(uri)
        self.experiment_id = prepare_experiment(uri, experiment, self.client)

    def start(self, run_name: str | None, tags: dict[str, str], run_id: str | None,
              command: str, record_to: str | None,
              sweep: tuple[str, str] | None = None) -> None:
        """``Tracker.start``, run as ``command``; a resumed run's ``tags`` are set again."""
        from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        run = None
        if record_to is not None:  # a rerun in this folder waits for these writes
            self.lock = folder_lock(Path(record_to).parent)
            self.lock.acquire()  # released by ``close`` or the end of this process
            self.pending = Path(record_to).parent / PENDING_FILE
            self.waiting = len(_pending_writes(self.pending))
            if self.waiting:  # a previous run's writes go first
                self._send_pending()
            if run_id is None:  # looked up under the lock: after the killed run's writes
                run = self._left_run(Path(record_to), tags)
        adopted = run is not None
        if run_id is not None:
            run = self.client.get_run(run_id)
            if run.info.experiment_id != self.experiment_id:
                raise TrackingError(f"run {run_id} belongs to experiment "
                                    f"{run.info.experiment_id}, not {self.experiment!r}")
        resumed = run is not None
        if run is None:
            if sweep is not None:
                tags = {**tags, MLFLOW_PARENT_RUN_ID: self._parent_run(*sweep, command)}
            run = self.client.create_run(self.experiment_id, run_name=run_name,
                                         tags=_standard_tags(tags, command))
        else:
            self.client.update_run(run.info.run_id, status="RUNNING")
            self.logged = {key: max(m.step for m in self.client.get_metric_history(
                run.info.run_id, key)) for key in run.data.metrics}
            _remove_staged_artifacts(run.info.artifact_uri)
        self.active = run.info.run_id
        if MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get():  # system/* metrics, sampled here
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(self.active, resume_logging=resumed,
                                                tracking_uri=self.uri)
            self.monitor.start()
        if resumed:
            self.write("log_batch", [], [], list(tags.items()))
        if resumed and not adopted:
            return
        if record_to is not None:  # atomically
            tmp = Path(record_to).with_name(f".{Path(record_to).name}.tmp")
            tmp.write_text(self.active)
            os.replace(tmp, record_to)
        self.write("log_text", _requirements(), "requirements.txt")

    def _left_run(self, record: Path, tags: dict[str, str]) -> Any:
        """The unfinished run a run killed in ``record``'s folder left: the one it recorded,
        else (killed before recording it) a RUNNING one tagged with that folder; or None."""
        from mlflow.exceptions import MlflowException

        with contextlib.suppress(MlflowException, FileNotFoundError):
            run = self.client.get_run(record.read_text().strip())
            if (run.info.status != "FINISHED" and run.info.lifecycle_stage == "active"
                    and run.info.experiment_id == self.experiment_id):
                return run
        folder = tags.get(names.OUTPUT_DIR_TAG)
        if folder is None or "'" in folder:  # a quote: not expressible in a filter string
            return None
        runs = self.client.search_runs(
            [self.experiment_id], max_results=1, filter_string=(
                f"tags.`{names.OUTPUT_DIR_TAG}` = '{folder}' and attributes.status = 'RUNNING'"))
        return runs[0] if runs else None

    def _parent_run(self, folder: str, name: str, command: str) -> str:
        """The sweep's parent run id, created by its first job under a lock in the sweep
        folder, which keeps the id: parallel jobs (any launcher) share one."""
        record = Path(folder) / PARENT_RUN_FILE
        with filelock.FileLock(Path(folder) / f".{PARENT_RUN_FILE}.lock"):
            if not record.is_file():
                run = self.client.create_run(
                    self.experiment_id, run_name=name,
                    tags=_standard_tags({names.TASK_TAG: SWEEP_TASK}, command))
                record.write_text(run.info.run_id)
            return record.read_text().strip()

    def fetch(self, run_id: str, artifact: str, folder: str) -> str | None:
        """``Tracker.fetch``."""
        try:
            run = self.client.get_run(run_id)
        except Exception:
            return f"no MLflow run {run_id!r} at {self.uri}"
        if run.info.experiment_id != self.experiment_id:
            return (f"run {run_id} is not in experiment {self.experiment!r}; give its "
                    "experiment as tracking.experiment")
        try:
            self.client.download_artifacts(run_id, artifact, folder)
        except Exception:
            return (f"run {run_id} has no checkpoint artifact {artifact!r} (killed before "
                    "its first checkpoint, or run with checkpoint=off)")
        return None

    def end(self, status: str) -> None:
        """Upload the last checkpoint, stop the system metrics monitor (logging its last
        samples, then one more taken now: a run shorter than the sampling interval still
        gets its system metrics), then end the run."""
        self._upload_checkpoint()
        if self.monitor is not None:
            self.monitor.finish()  # its thread has stopped: the sample below is the last
            with contextlib.suppress(Exception):  # as MLflow's own flush: never fails a run
                self.monitor.collect_metrics()
                self.monitor.publish_metrics(self.monitor.aggregate_metrics())
                self.monitor.mlflow_logger.flush()
            self.monitor = None
        self.write("set_terminated", status)  # buffered, like any write, in an outage

    def log_input(self, path: str, name: str, context: str) -> None:
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        with warnings.catch_warnings():  # a local file matches two equivalent source kinds
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(path)
        dataset = MetaDataset(source, name=name)._to_mlflow_entity()
        self.client.log_inputs(
            self.active, [DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)])])

    def flush(self) -> str | None:
        """The run's id (the requests run in order: nothing to wait for)."""
        return self.active

    def close(self) -> str | None:
        self._upload_checkpoint()  # a run that failed before ``end``
        if self.waiting:
            self._send_pending()  # a last try, whenever it was due
        if self.waiting:
            self.notify(logging.WARNING, f"{self.waiting} writes buffered in {self.pending}; "
                        "they will be sent by the next run in this folder")
        if self.monitor is not None:  # a run that failed before ``end``
            self.monitor.finish()
        if self.lock is not None:
            self.lock.release()
        return self.active

    def checkpoint(self, path: str, state: dict[str, Any], metrics: list[Any]) -> None:
        if metrics:
            self.write("log_batch", metrics, [], [])
        checkpoint.save(path, {**state, "run_id": self.active})
        self.unsent = path
        if time.monotonic() >= self.upload_at:
            self._upload_checkpoint()

    def _upload_checkpoint(self) -> None:
        """Log the last saved checkpoint as an artifact (after the metrics before it: a run
        resumes elsewhere from it), at most every UPLOAD_SECONDS: the file grows with the
        run's history, and a writer uploading it every step falls behind the run."""
        if self.unsent is not None:
            self.write("log_artifact", self.unsent)
            self.unsent, self.upload_at = None, time.monotonic() + UPLOAD_SECONDS

    def write(self, op: str, *args: Any) -> None:
        """Write to the active run (``_apply``), or, while the store is unavailable, to the
        pending file (one warning when an outage starts), sent every ``RETRY_SECONDS``."""
        if op == "log_batch":  # leave out steps a resumed run has in the store (a rerun's)
            args = ([m for m in args[0] if m[3] > self.logged.get(m[0], -1)], *args[1:])
        write = [self.active, op, list(args)]
        if not self.waiting:
            try:
                self._apply(*write)
                return
            except Exception as exc:
                if self.pending is None or not _unavailable(exc):
                    raise
                self.retry_at = time.monotonic() + RETRY_SECONDS
                self.notify(logging.WARNING, f"tracking store {self.uri} unavailable "
                            f"({self.describe(exc, short=True)}); training continues, writes "
                            f"are buffered in {self.pending} until it answers")
        with self.pending.open("a") as fh:  # on disk before a checkpoint that follows them;
            fh.write(f"\n{json.dumps(write)}")  # a line cut short by a kill stays on its own
            fh.flush()
            os.fsync(fh.fileno())
        self.waiting += 1
        if time.monotonic() >= self.retry_at:
            self._send_pending()

    def _send_pending(self) -> None:
        """Send the pending writes in order, counted in each run's tag
        ``names.BUFFERED_WRITES_TAG``; the file goes once the store took them all."""
        writes = _pending_writes(self.pending)
        # an artifact uploads its file as it is now: of repeated uploads only the last counts
        last = {json.dumps(w): i for i, w in enumerate(writes) if w[1] == "log_artifact"}
        try:
            check_reachable(self.uri, timeout=2.0)  # a dead server: at once, not retried
            for i, write in enumerate(writes):
                if write[1] != "log_artifact" or last[json.dumps(write)] == i:
                    self._apply(*write)
            for run_id, count in Counter(run_id for run_id, *_ in writes).items():
                count += int(self.client.get_run(run_id).data.tags.get(
                    names.BUFFERED_WRITES_TAG, 0))
                self.client.set_tag(run_id, names.BUFFERED_WRITES_TAG, str(count))
        except Exception as exc:
            self.retry_at = time.monotonic() + RETRY_SECONDS
            if isinstance(exc, TrackingError) or _unavailable(exc):
                return
            rejected = self.pending.with_suffix(".rejected")
            os.replace(self.pending, rejected)
            self.waiting = 0
            raise TrackingError(f"{self.describe(exc)}; the buffered writes were not all "
                                f"sent (kept in {rejected})") from exc
        self.pending.unlink()
        self.waiting = 0
        self.notify(logging.INFO, f"tracking store {self.uri} answers: sent the "
                    f"{len(writes)} writes buffered in {self.pending}")

    def _apply(self, run_id: str, op: str, args: list[Any]) -> None:
        """One write to the store: ``log_batch`` of (key, value, timestamp, step) metrics,
        (key, value) params and tags (MLflow splits the batch and cuts values to its
        limits); ``log_params`` (those not logged yet; a changed one as the tag
        ``resume.<key>``); or a client method taking the run id first (``log_artifact``...)."""
        from mlflow.entities import Metric, Param, RunTag

        if op == "log_params":
            existing = self.client.get_run(run_id).data.params
            op, args = "log_batch", [
                [], [(k, v) for k, v in args[0].items() if k not in existing],
                [(f"resume.{k}", v) for k, v in args[0].items()
                 if k in existing and existing[k] != v[:MAX_PARAM_LENGTH]],
            ]
        if op == "log_batch":
            metrics, params, tags = args
            self.client.log_batch(run_id, [Metric(*m) for m in metrics],
                                  [Param(*p) for p in params], [RunTag(*t) for t in tags])
        else:
            getattr(self.client, op)(run_id, *args)

    def describe(self, exc: BaseException, short: bool = False) -> str:
        """One line for a failure (the parent raises it as a ``TrackingError``); ``short``:
        the exception at the root of it (e.g. "ConnectionRefusedError: ..."), cut short."""
        while short and (exc.__cause__ or exc.__context__) is not None:
            exc = exc.__cause__ or exc.__context__
        first = (str(exc).splitlines() or [""])[0]
        if short:
            return f"{type(exc).__name__}: {first[:160]}"
        if isinstance(exc, TrackingError | checkpoint.CheckpointError):
            return first
        return f"MLflow {self.uri} ({self.experiment!r}): {type(exc).__name__}: {first}"


def _remove_staged_artifacts(artifact_uri: str) -> None:
    """Remove the hidden files a killed writer left in a local artifact store (MLflow copies
    an artifact to one, then renames it)."""
    from mlflow.store.artifact import local_artifact_repo
    from mlflow.utils.file_utils import local_file_uri_to_path

    prefix = getattr(local_artifact_repo, "_TEMP_ARTIFACT_PREFIX", None)
    if prefix is None or urllib.parse.urlparse(artifact_uri).scheme not in ("", "file"):
        return
    root = Path(local_file_uri_to_path(artifact_uri))
    for stale in root.rglob(f"{glob.escape(prefix)}*") if root.is_dir() else ():
        stale.unlink(missing_ok=True)


def _unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` is the store failing (unreachable, timing out, 5xx, read-only or I/O
    error), not the request: the write may succeed later."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.get_http_status_code() >= 500
    return isinstance(exc, OSError)


def _pending_writes(path: Path) -> list[list[Any]]:
    """The writes in a pending file, in order (a line cut short by a kill is skipped)."""
    writes = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(json.JSONDecodeError):
            writes.append(json.loads(line))
    return writes


def _standard_tags(tags: dict[str, str], command: str) -> dict[str, str]:
    """``tags`` plus those ``mlflow.start_run`` adds (MLflow's run-context providers, as if
    run by ``command``) and the git commit, branch and remote of hyperkrylov's source tree."""
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils import git_utils, mlflow_tags

    sys.argv[0] = command  # what the providers read as the run's main file
    source = str(Path(__file__).resolve().parents[2])
    git = {
        mlflow_tags.MLFLOW_GIT_COMMIT: git_utils.get_git_commit(source),
        mlflow_tags.MLFLOW_GIT_BRANCH: git_utils.get_git_branch(source),
        mlflow_tags.MLFLOW_GIT_REPO_URL: git_utils.get_git_repo_url(source),
    }
    return {**resolve_tags(tags), **{k: v for k, v in git.items() if v}}


def folder_lock(folder: Path) -> filelock.FileLock:
    """The lock of a run's output folder, held by the writer of the run's tracking."""
    return filelock.FileLock(folder / ".tracking.lock")


def _requirements() -> str:
    """The installed distributions, one ``name==version`` per line (pip freeze style)."""
    found = {(d.metadata["Name"] or "").lower(): d.version
             for d in importlib.metadata.distributions()}
    return "".join(f"{name}=={version}\n" for name, version in sorted(found.items()) if name)


def _serve() -> None:
    """The writer process: run the requests from stdin in order until EOF, each for the
    ``_Writer`` its key names.  Replies, notices (level, message) and failures go pickled to
    the original stdout as (key, kind, payload); what a library prints goes to stderr.  After
    a run's first failure its requests are only answered, not run."""
    for name, value in HTTP_LIMITS.items():
        os.environ.setdefault(name, value)
    # its tracebacks of SQLite errors (the writer reports them once)
    logging.getLogger("mlflow.store.db.utils").addFilter(lambda r: r.levelno < logging.ERROR)
    inbox, outbox = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    writers: dict[int, _Writer] = {}

    def send(key: int, kind: str, payload: Any) -> None:
        pickle.dump((key, kind, payload), outbox)
        outbox.flush()

    while True:
        try:
            key, op, args, reply = pickle.load(inbox)
        except (EOFError, pickle.UnpicklingError):  # the parent ended or died (a message cut
            os._exit(0)  # short is dropped); skip tearing down mlflow's modules (a second)
        if key not in writers:
            writers[key] = _Writer(lambda *notice, key=key: send(key, "notice", notice))
        writer = writers[key]
        value = None
        if not writer.failed:
            try:
                value = getattr(writer, op)(*args)
            except Exception as exc:
                writer.failed = True
                send(key, "failed", writer.describe(exc))
        if reply:
            send(key, "reply", value)
        if op == "close":
            writers.pop(key, None)


# -- reading runs back (the compare view) ------------------------------------------------
@dataclass(frozen=True)
class RunRecord:
    """One finished or running run as read back from the tracking store."""

    run_id: str
    name: str
    status: str
    start_time: float | None
    end_time: float | None
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]
    history: dict[str, tuple[tuple[int, float], ...]] = field(default_factory=dict)

    def metric(self, key: str) -> float:
        """The last logged value of ``key`` (NaN when the run never logged it)."""
        return self.metrics.get(key, math.nan)


def read_runs(uri: str | None, experiment: str, *, sweep_id: str | None = None,
              history_keys: Iterable[str] | None = None) -> list[RunRecord]:
    """Runs of ``experiment``, oldest first, parent runs left out, with the step histories
    of ``history_keys`` (None: all); ``sweep_id``: only the nested runs of the parent run with
    that id, else the runs tagged with it (a parent's name)."""
    uri = resolve_uri(uri)
    db = sqlite_path(uri)
    if db is not None and not db.is_file():  # reading never creates a store
        raise TrackingError(f"no tracking store at {db}; run hyperkrylov first, or give the "
                            "store's URI (--uri or MLFLOW_TRACKING_URI)")
    client = _client(uri)
    if (exp_id := _experiment_id(client, uri, experiment)) is None:
        raise TrackingError(f"no MLflow experiment named {experiment!r} at {uri}")
    flt = f"tags.`{names.SWEEP_TAG}` = '{sweep_id}'" if sweep_id else ""  # a parent's name
    if sweep_id and sweep_id in _sweep_parents(client, exp_id, sweep_id):  # a parent's id
        flt = f"tags.`mlflow.parentRunId` = '{sweep_id}'"
    runs = client.search_runs([exp_id], filter_string=flt,
                              order_by=["attributes.start_time ASC"], max_results=5000)
    return [_record(client, run, history_keys) for run in runs
            if run.data.tags.get(names.TASK_TAG) != SWEEP_TASK]


def _record(client: Any, run: Any, history_keys: Iterable[str] | None) -> RunRecord:
    info, data = run.info, run.data
    keys = [k for k in (data.metrics if history_keys is None else history_keys)
            if k in data.metrics]
    return RunRecord(
        run_id=info.run_id, name=info.run_name or info.run_id, status=info.status,
        start_time=None if info.start_time is None else info.start_time / 1000,
        end_time=None if info.end_time is None else info.end_time / 1000,
        params=dict(data.params), tags=dict(data.tags),
        metrics={k: float(v) for k, v in data.metrics.items() if not math.isnan(v)},
        history={key: tuple(sorted((int(m.step), float(m.value))
                                   for m in client.get_metric_history(info.run_id, key)))
                 for key in keys})


def _sweep_parents(client: Any, experiment_id: str, sweep: str) -> list[str]:
    """The ids of the parent runs with id or name ``sweep`` (several multiruns may share a
    name), newest first."""
    parents = client.search_runs([experiment_id],
                                 filter_string=f"tags.`{names.TASK_TAG}` = '{SWEEP_TASK}'",
                                 order_by=["attributes.start_time DESC"])
    return [run.info.run_id for run in parents if sweep in (run.info.run_id, run.info.run_name)]


def log_to_sweep(uri: str | None, experiment: str, sweep: str,
                 paths: Iterable[str | Path]) -> str | None:
    """Log the files ``paths`` to the newest parent run of ``sweep``; its id (None: none)."""
    uri = resolve_uri(uri)
    client = _client(uri)
    parents = _sweep_parents(client, _experiment_id(client, uri, experiment) or "", sweep)
    for path in paths if parents else ():
        client.log_artifact(parents[0], str(path), "compare")
    return parents[0] if parents else None


def percent_saved(mine: float, reference: float) -> float:
    """100·(1 − mine/reference); NaN when either is missing or the reference is ≤ 0."""
    if not (math.isfinite(mine) and math.isfinite(reference)) or reference <= 0:
        return math.nan
    return 100.0 * (1.0 - mine / reference)


if __name__ == "__main__":
    _serve()
