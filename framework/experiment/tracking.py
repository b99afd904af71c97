"""Experiment tracking through MLflow — the only module of hyperkrylov that imports mlflow.

Where results go: ``tracking.uri`` when set, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///<cwd>/mlflow/mlflow.db``; a SQLite store keeps artifacts in ``artifacts/`` next
to the database file, a tracking server chooses its own artifact store.

Parallel sweep jobs sharing one SQLite file race on schema creation and lock the file: the
experiment is created once up front (``prepare_experiment``, from the sweep's Hydra callback)
and every call retries with backoff while SQLite reports "database is locked".  This module
run as a script is the writer process of ``framework.experiment.tracker`` (``_serve``), so
neither a run's interpreter nor a disabled tracker imports mlflow.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import pickle
import sys
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import filelock
import tenacity

from framework.experiment import checkpoint, names

MAX_PARAM_LENGTH = 6000  # MLflow's limit, to which it cuts longer values
PARENT_RUN_FILE = "mlflow_parent_run_id"  # in a sweep folder: the sweep's parent run
SWEEP_TASK = "sweep"  # the task tag of a sweep's parent run

T = TypeVar("T")


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
        "tracking=disabled"
    )


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
    children = retry(client.search_runs, [retry(client.get_run, parent).info.experiment_id],
                     filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    failed = any(run.info.status != "FINISHED" for run in children)
    retry(client.set_terminated, parent, "FAILED" if failed else "FINISHED")


def _is_locked(exc: BaseException) -> bool:
    return any(s in str(exc).lower() for s in ("database is locked", "database table is locked"))


def retry(fn: Callable[..., T], *args: Any, attempts: int = 10, base: float = 0.05, **kw: Any) -> T:
    """Call ``fn`` and retry with jittered exponential backoff while SQLite is locked."""
    return tenacity.Retrying(retry=tenacity.retry_if_exception(_is_locked), reraise=True,
                             wait=tenacity.wait_random_exponential(multiplier=base),
                             stop=tenacity.stop_after_attempt(attempts))(fn, *args, **kw)


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise store creation (schema migrations) of one SQLite file across processes."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    (db.parent / "artifacts").mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(db.parent / f".{db.name}.lock"):
        yield


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    check_reachable(uri)
    with _store_lock(uri):
        client = retry(MlflowClient, tracking_uri=uri)
        retry(client.search_experiments, max_results=1)  # creates the schema, under the lock
    return client


def _experiment_id(client: Any, uri: str, name: str) -> str | None:
    """The id of the experiment ``name`` (None when there is none); deleted is an error."""
    exp = retry(client.get_experiment_by_name, name)
    if exp is not None and exp.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow experiment {name!r} is deleted at {uri}; restore it "
            "(`mlflow experiments restore`) or choose another tracking.experiment"
        )
    return None if exp is None else exp.experiment_id


def prepare_experiment(uri: str, name: str, client: Any = None) -> str:
    """Create the experiment ``name`` (and the SQLite schema) once; return its id."""
    from mlflow.exceptions import MlflowException

    client = client or _client(uri)
    with _store_lock(uri):
        exp_id = _experiment_id(client, uri, name)
        if exp_id is None:
            root = artifact_root(uri)
            try:
                exp_id = retry(client.create_experiment, name,
                               artifact_location=None if root is None else f"{root}/{name}")
            except MlflowException:  # created meanwhile by a parallel job (a server's store)
                exp_id = _experiment_id(client, uri, name)
                if exp_id is None:
                    raise
    return exp_id


# -- the writer process (run as a script by framework.experiment.tracker) ----------------
class _Writer:
    """The writer process's side of one tracker: the MLflow client and the active run."""

    def __init__(self) -> None:
        self.client: Any = None
        self.uri, self.experiment, self.experiment_id = "", "", ""
        self.active: str | None = None
        self.lock: filelock.FileLock | None = None
        self.monitor: Any = None  # MLflow's system metrics monitor, when enabled
        self.failed = False  # after a failure, requests are only answered

    def open(self, uri: str, experiment: str) -> None:
        self.uri, self.experiment = uri, experiment
        self.client = _client(uri)
        self.experiment_id = prepare_experiment(uri, experiment, self.client)

    def start(self, run_name: str | None, tags: dict[str, str], run_id: str | None,
              command: str, record_to: str | None, adopt: bool,
              sweep: tuple[str, str] | None = None) -> None:
        """Create a run, or resume ``run_id``; ``adopt``: resume it only if it is still
        there, unfinished, in this experiment (else create a run).  ``sweep``: (folder,
        name) of the multirun sweep whose parent run a new run is nested in."""
        from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING
        from mlflow.exceptions import MlflowException
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        run = None
        if run_id is not None:
            try:
                run = retry(self.client.get_run, run_id)
            except MlflowException:
                if not adopt:
                    raise
        if adopt and run is not None and (run.info.status == "FINISHED"
                                          or run.info.lifecycle_stage != "active"
                                          or run.info.experiment_id != self.experiment_id):
            run = None
        resumed = run is not None
        if run is None:
            if sweep is not None:
                tags = {**tags, MLFLOW_PARENT_RUN_ID: self._parent_run(*sweep, command)}
            run = retry(self.client.create_run, self.experiment_id, run_name=run_name,
                        tags=_standard_tags(tags, command))
        elif run.info.experiment_id != self.experiment_id:
            raise TrackingError(f"run {run_id} belongs to experiment "
                                f"{run.info.experiment_id}, not {self.experiment!r}")
        else:
            retry(self.client.update_run, run_id, status="RUNNING")
        self.active = run.info.run_id
        if MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get():  # system/* metrics, sampled here
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(self.active, resume_logging=resumed,
                                                tracking_uri=self.uri)
            self.monitor.start()
        if record_to is not None:  # a rerun in this folder waits for these writes
            self.lock = folder_lock(Path(record_to).parent)
            self.lock.acquire()  # released by ``close`` or the end of this process
        if resumed:
            self.log_batch(tags=tags.items())
            return
        if record_to is not None:  # atomically
            tmp = Path(record_to).with_name(f".{Path(record_to).name}.tmp")
            tmp.write_text(self.active)
            os.replace(tmp, record_to)
        self.call("log_text", _requirements(), "requirements.txt")

    def _parent_run(self, folder: str, name: str, command: str) -> str:
        """The id of the sweep's parent run, created by its first job: under a lock in the
        sweep folder, which keeps the id, so parallel jobs (any launcher) share one."""
        record = Path(folder) / PARENT_RUN_FILE
        with filelock.FileLock(Path(folder) / f".{PARENT_RUN_FILE}.lock"):
            if not record.is_file():
                run = retry(self.client.create_run, self.experiment_id, run_name=name,
                            tags=_standard_tags({names.TASK_TAG: SWEEP_TASK}, command))
                record.write_text(run.info.run_id)
            return record.read_text().strip()

    def fetch(self, run_id: str, artifact: str, folder: str) -> str | None:
        """Download ``artifact`` of the run ``run_id`` of this experiment into ``folder``;
        None, or why it cannot (one line)."""
        try:
            run = retry(self.client.get_run, run_id)
        except Exception:
            return f"no MLflow run {run_id!r} at {self.uri}"
        if run.info.experiment_id != self.experiment_id:
            return (f"run {run_id} is not in experiment {self.experiment!r}; give its "
                    "experiment as tracking.experiment")
        try:
            retry(self.client.download_artifacts, run_id, artifact, folder)
        except Exception:
            return (f"run {run_id} has no checkpoint artifact {artifact!r} (killed before "
                    "its first checkpoint, or run with checkpoint=off)")
        return None

    def end(self, status: str) -> None:
        """Stop the system metrics monitor (logging its last samples), then end the run."""
        if self.monitor is not None:
            self.monitor.finish()
            self.monitor = None
        retry(self.client.set_terminated, self.active, status)

    def log_input(self, path: str, name: str, context: str) -> None:
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        with warnings.catch_warnings():  # a local file matches two equivalent source kinds
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(path)
        dataset = MetaDataset(source, name=name)._to_mlflow_entity()
        retry(self.client.log_inputs, self.active,
              [DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)])])

    def figure(self, fig: Any, artifact_file: str, save_kwargs: dict[str, Any]) -> None:
        retry(self.client.log_figure, self.active, fig, artifact_file, save_kwargs=save_kwargs)

    def flush(self) -> str | None:
        """Nothing to do (the requests run in order); the run's id."""
        return self.active

    def close(self) -> str | None:
        if self.monitor is not None:  # a run that failed before ``end``
            self.monitor.finish()
        if self.lock is not None:
            self.lock.release()
        return self.active

    def checkpoint(self, path: str, state: dict[str, Any], metrics: list[Any]) -> None:
        if metrics:
            self.log_batch(metrics)
        checkpoint.save(path, {**state, "run_id": self.active})
        self.call("log_artifact", path)  # after the metrics before it: resumable elsewhere

    def log_batch(self, metrics=(), params=(), tags=()) -> None:
        """``log_batch`` of (key, value[, timestamp, step]) tuples; MLflow splits the batches
        and cuts values to its length limits."""
        from mlflow.entities import Metric, Param, RunTag

        retry(self.client.log_batch, self.active, [Metric(*m) for m in metrics],
              [Param(*p) for p in params], [RunTag(k, str(v)) for k, v in tags])

    def log_params(self, params: dict[str, str]) -> None:
        existing = retry(self.client.get_run, self.active).data.params
        self.log_batch(
            params=[(k, v) for k, v in params.items() if k not in existing],
            tags=[(f"resume.{k}", v) for k, v in params.items()
                  if k in existing and existing[k] != v[:MAX_PARAM_LENGTH]],
        )

    def call(self, method: str, *args: Any) -> None:
        retry(getattr(self.client, method), self.active, *args)

    def describe(self, exc: Exception) -> str:
        """One line for a failure (the parent raises it as a ``TrackingError``)."""
        first = (str(exc).splitlines() or [""])[0]
        if isinstance(exc, TrackingError | checkpoint.CheckpointError):
            return first
        return f"MLflow {self.uri} ({self.experiment!r}): {type(exc).__name__}: {first}"


def _standard_tags(tags: dict[str, str], command: str) -> dict[str, str]:
    """``tags`` plus the tags ``mlflow.start_run`` adds (user, source name and type, from
    MLflow's run-context providers, as if run by ``command``) and the git commit, branch and
    remote of hyperkrylov's own source tree when it is a git checkout."""
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
    found = {
        (d.metadata["Name"] or "").lower(): d.version for d in importlib.metadata.distributions()
    }
    return "".join(f"{name}=={version}\n" for name, version in sorted(found.items()) if name)


def _serve() -> None:
    """The writer process (see ``framework.experiment.tracker``): run the requests from
    stdin in order until EOF, each for the run (``_Writer``) its key names.

    Replies and failures are pickled to the original stdout as (key, kind, payload); what a
    library prints goes to stderr.  After a run's first failure its requests are only
    answered, not run."""
    inbox, outbox = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    writers: dict[int, _Writer] = {}
    while True:
        try:
            key, op, args, reply = pickle.load(inbox)
        except (EOFError, pickle.UnpicklingError):  # the parent ended or was killed (maybe
            # in the middle of a message, which is dropped); every write is committed
            outbox.flush()
            os._exit(0)  # skip tearing down mlflow's modules (about a second)
        writer = writers.setdefault(key, _Writer())
        value = None
        if not writer.failed:
            try:
                value = getattr(writer, op)(*args)
            except Exception as exc:
                writer.failed = True
                pickle.dump((key, "failed", writer.describe(exc)), outbox)
        if reply:
            pickle.dump((key, "reply", value), outbox)
        outbox.flush()
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


def read_runs(
    uri: str | None,
    experiment: str,
    *,
    sweep_id: str | None = None,
    history_keys: Iterable[str] | None = None,
) -> list[RunRecord]:
    """Runs of ``experiment`` (optionally only those of one sweep: the nested runs of the
    parent run with id or name ``sweep_id``, else the runs tagged with it), oldest first, with
    the step histories of ``history_keys`` (all metrics when None); parent runs left out."""
    uri = resolve_uri(uri)
    db = sqlite_path(uri)
    if db is not None and not db.is_file():  # reading never creates a store
        raise TrackingError(f"no tracking store at {db}; run hyperkrylov first, or give the "
                            "store's URI (--uri or MLFLOW_TRACKING_URI)")
    client = _client(uri)
    exp_id = _experiment_id(client, uri, experiment)
    if exp_id is None:
        raise TrackingError(f"no MLflow experiment named {experiment!r} at {uri}")
    flt = f"tags.`{names.SWEEP_TAG}` = '{sweep_id}'" if sweep_id else ""  # a parent's name
    if sweep_id and sweep_id in _sweep_parents(client, exp_id, sweep_id):  # a parent's id
        flt = f"tags.`mlflow.parentRunId` = '{sweep_id}'"
    runs = retry(client.search_runs, [exp_id], filter_string=flt,
                 order_by=["attributes.start_time ASC"], max_results=5000)
    records = []
    for run in runs:
        info, data = run.info, run.data
        if data.tags.get(names.TASK_TAG) == SWEEP_TASK:
            continue
        keys = [k for k in (data.metrics if history_keys is None else history_keys)
                if k in data.metrics]
        history = {
            key: tuple(sorted((int(m.step), float(m.value))
                              for m in retry(client.get_metric_history, info.run_id, key)))
            for key in keys
        }
        records.append(RunRecord(
            run_id=info.run_id, name=info.run_name or info.run_id, status=info.status,
            start_time=None if info.start_time is None else info.start_time / 1000,
            end_time=None if info.end_time is None else info.end_time / 1000,
            params=dict(data.params), tags=dict(data.tags),
            metrics={k: float(v) for k, v in data.metrics.items() if not math.isnan(v)},
            history=history,
        ))
    return records


def _sweep_parents(client: Any, experiment_id: str, sweep: str) -> list[str]:
    """The ids of the parent runs with id or name ``sweep`` (the name is the sweep's
    ``hyperkrylov.sweep_id`` tag, which several multiruns may share), newest first."""
    parents = retry(client.search_runs, [experiment_id],
                    filter_string=f"tags.`{names.TASK_TAG}` = '{SWEEP_TASK}'",
                    order_by=["attributes.start_time DESC"])
    return [run.info.run_id for run in parents if sweep in (run.info.run_id, run.info.run_name)]


def log_to_sweep(uri: str | None, experiment: str, sweep: str,
                 paths: Iterable[str | Path]) -> str | None:
    """Log the files ``paths`` (the compare figures) to the newest parent run of ``sweep``;
    its id, None when there is none (single runs grouped by ``tracking.sweep_id``)."""
    uri = resolve_uri(uri)
    client = _client(uri)
    parents = _sweep_parents(client, _experiment_id(client, uri, experiment) or "", sweep)
    parent = parents[0] if parents else None
    for path in paths if parent else ():
        retry(client.log_artifact, parent, str(path), "compare")
    return parent


def percent_saved(mine: float, reference: float) -> float:
    """100·(1 − mine/reference); NaN when either is missing or the reference is ≤ 0."""
    if not (math.isfinite(mine) and math.isfinite(reference)) or reference <= 0:
        return math.nan
    return 100.0 * (1.0 - mine / reference)


if __name__ == "__main__":
    _serve()
