"""Experiment tracking through MLflow — the only module of hyperkrylov that imports mlflow.

Where results go: ``tracking.uri`` when set, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///<cwd>/mlflow/mlflow.db``.  For a SQLite store, artifacts go to an
``artifacts/`` folder next to the database file (``mlflow/artifacts`` by default); a
tracking server chooses its own artifact store.

Parallel sweep jobs sharing one SQLite file race on schema creation and lock the file:
the experiment is created once up front (``prepare_experiment``, called by the sweep's
Hydra callback) and every write retries with exponential backoff while SQLite reports
"database is locked".  mlflow is imported lazily (by a run's ``Tracker``, on its writer
thread), so a disabled tracker costs nothing.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from framework.experiment import names

MAX_PARAM_LENGTH = 6000  # MLflow's limit, to which it cuts longer values

T = TypeVar("T")


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable server, bad URI, deleted experiment)."""


def default_uri(cwd: str | Path | None = None) -> str:
    """``sqlite:///<cwd>/mlflow/mlflow.db``."""
    base = Path(cwd) if cwd is not None else Path.cwd()
    return f"sqlite:///{(base / 'mlflow' / 'mlflow.db').resolve()}"


def resolve_uri(uri: str | None = None, cwd: str | Path | None = None) -> str:
    """The tracking URI: ``uri``, else ``$MLFLOW_TRACKING_URI``, else ``default_uri(cwd)``."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(cwd)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :])


def artifact_root(uri: str) -> str | None:
    """Artifact root for new experiments: ``<db folder>/artifacts`` for SQLite, else None."""
    db = sqlite_path(uri)
    if db is None:
        return None
    return (db.parent / "artifacts").resolve().as_uri()


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
        reason = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
    raise TrackingError(
        f"MLflow tracking server {uri} is unreachable ({reason}); start it "
        "(`mlflow server ...`), fix tracking.uri / MLFLOW_TRACKING_URI, or run with "
        "tracking=disabled"
    )


def _is_locked(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "database is locked" in text or "database table is locked" in text


def retry(fn: Callable[..., T], *args: Any, attempts: int = 10, base: float = 0.05, **kw: Any) -> T:
    """Call ``fn`` and retry with jittered exponential backoff while SQLite is locked."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kw)
        except Exception as exc:
            if not _is_locked(exc) or attempt == attempts - 1:
                raise
            time.sleep(base * 2**attempt * (1.0 + random.random()))
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise store creation (schema migrations) of one SQLite file across processes."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    (db.parent / "artifacts").mkdir(exist_ok=True)
    with open(db.parent / f".{db.name}.lock", "a") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except (ImportError, OSError):  # no flock (Windows, some network file systems)
            pass
        yield


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    check_reachable(uri)
    with _store_lock(uri):
        client = retry(MlflowClient, tracking_uri=uri)
        retry(client.search_experiments, max_results=1)  # creates the schema, under the lock
    return client


def _experiment_id(client: Any, uri: str, name: str, *, create: bool) -> str | None:
    from mlflow.exceptions import MlflowException

    exp = retry(client.get_experiment_by_name, name)
    if exp is None and create:
        root = artifact_root(uri)
        location = None if root is None else f"{root}/{name}"
        try:
            return retry(client.create_experiment, name, artifact_location=location)
        except MlflowException:  # created meanwhile by a parallel job
            exp = retry(client.get_experiment_by_name, name)
            if exp is None:
                raise
    if exp is None:
        return None
    if exp.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow experiment {name!r} is deleted at {uri}; restore it "
            "(`mlflow experiments restore`) or choose another tracking.experiment"
        )
    return exp.experiment_id


def prepare_experiment(uri: str, name: str, client: Any = None) -> str:
    """Create the experiment ``name`` (and the SQLite schema) once; return its id."""
    client = client or _client(uri)
    with _store_lock(uri):
        exp_id = _experiment_id(client, uri, name, create=True)
    assert exp_id is not None
    return exp_id


class Tracker:
    """One MLflow run, written in call order by one background thread.

    Opening the store (for a new SQLite file: importing mlflow and creating the schema, some
    seconds) and every write run on that thread while the computation goes on; ``run_id``
    waits for the run to exist and ``end`` for every write.  An http(s) server that does not
    answer is reported at once; any other failure stops the writes and is raised as one
    ``TrackingError`` by the next call, ``run_id`` or ``end``."""

    enabled = True

    def __init__(self, uri: str | None = None, experiment: str = "hyperkrylov") -> None:
        self.uri = resolve_uri(uri)
        self.experiment = experiment
        check_reachable(self.uri)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow")
        self._failure: Exception | None = None
        self._run: Future[str | None] | None = None
        self._active: str | None = None  # the run id, as the worker knows it
        self._submit(self._open)

    def _open(self) -> None:
        self._client = _client(self.uri)
        self.experiment_id = prepare_experiment(self.uri, self.experiment, self._client)

    def _guarded(self, fn: Callable[..., T], *args: Any) -> T | None:
        if self._failure is None:
            try:
                return fn(*args)
            except Exception as exc:
                self._failure = exc
        return None

    def _raise_failure(self) -> None:
        exc = self._failure
        if exc is not None:
            first = (str(exc).splitlines() or [""])[0]
            if not isinstance(exc, TrackingError):
                first = f"MLflow {self.uri} ({self.experiment!r}): {type(exc).__name__}: {first}"
            raise TrackingError(first) from exc

    def _submit(self, fn: Callable[..., T], *args: Any) -> Future[T | None]:
        self._raise_failure()
        return self._worker.submit(self._guarded, fn, *args)

    def _write(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._run is None:
            raise TrackingError("no active run: call Tracker.start() first")
        self._submit(fn, *args)

    def start(
        self,
        *,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        run_id: str | None = None,
    ) -> None:
        """Create a run, or resume the run ``run_id`` (same run, status back to RUNNING)."""
        self._run = self._submit(self._start, run_name, dict(tags or {}), run_id)

    def _start(self, run_name: str | None, tags: dict[str, str], run_id: str | None) -> str:
        if run_id is None:
            run = retry(self._client.create_run, self.experiment_id, run_name=run_name, tags=tags)
            self._active = run.info.run_id
            return self._active
        run = retry(self._client.get_run, run_id)
        if run.info.experiment_id != self.experiment_id:
            raise TrackingError(
                f"run {run_id} belongs to experiment {run.info.experiment_id}, "
                f"not {self.experiment!r}"
            )
        retry(self._client.update_run, run_id, status="RUNNING")
        self._active = run_id
        self._log_batch(tags=tags.items())
        return run_id

    @property
    def run_id(self) -> str | None:
        """The run's id, once it exists (None before ``start``)."""
        run_id = None if self._run is None else self._run.result()
        self._raise_failure()
        return run_id

    def flush(self) -> None:
        """Wait until every write so far is in the store (a checkpoint must not name
        metrics that a kill could still lose)."""
        self._worker.submit(lambda: None).result()
        self._raise_failure()

    def _log_batch(self, metrics=(), params=(), tags=()) -> None:
        """``log_batch`` of (key, value[, timestamp, step]) tuples; MLflow splits the batches
        and cuts values to its length limits."""
        from mlflow.entities import Metric, Param, RunTag

        retry(self._client.log_batch, self._active, [Metric(*m) for m in metrics],
              [Param(*p) for p in params], [RunTag(k, str(v)) for k, v in tags])

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params.  On a resumed run, params already logged are skipped; a changed value is
        recorded as the tag ``resume.<key>`` (MLflow forbids changing a param within a run)."""
        self._write(self._log_params, {key: str(value) for key, value in params.items()})

    def _log_params(self, params: dict[str, str]) -> None:
        existing = retry(self._client.get_run, self._active).data.params
        self._log_batch(
            params=[(k, v) for k, v in params.items() if k not in existing],
            tags=[(f"resume.{k}", v) for k, v in params.items()
                  if k in existing and existing[k] != v[:MAX_PARAM_LENGTH]],
        )

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log numeric metrics at ``step`` (non-numeric values are skipped)."""
        stamp, numbers = int(time.time() * 1000), []
        for key, value in metrics.items():
            with contextlib.suppress(TypeError, ValueError):
                numbers.append((key, float(value), stamp, int(step)))
        self._write(self._log_batch, numbers)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._write(self._log_batch, (), (), list(tags.items()))

    def _call(self, method: str, *args: Any) -> None:
        retry(getattr(self._client, method), self._active, *args)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._write(self._call, "log_artifact", str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._write(self._call, "log_text", text, artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED (or FAILED / KILLED) once every write is done; only a run
        ending FINISHED raises a failure (a failed run reports its own error)."""
        if self._run is not None:
            self._worker.submit(self._guarded, self._call, "set_terminated", status)
        self._worker.shutdown(wait=True)
        if status == "FINISHED":
            self._raise_failure()


class NullTracker:
    """A tracker that records nothing (``tracking.enabled=false``, tests, benchmarks)."""

    enabled = False
    uri: str | None = None
    run_id = None

    def _ignore(self, *args: Any, **kwargs: Any) -> None:
        return None

    start = log_params = log_metrics = set_tags = log_artifact = log_text = end = _ignore
    flush = _ignore

    def describe(self) -> str:
        return "tracking disabled"


def make_tracker(cfg: Any) -> Tracker | NullTracker:
    """A ``Tracker`` for a ``TrackingConfig`` (``NullTracker`` when ``enabled`` is false)."""
    if not cfg.enabled:
        return NullTracker()
    return Tracker(cfg.uri, cfg.experiment)


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
    """Runs of ``experiment`` (optionally only those tagged with ``sweep_id``), oldest first,
    with the step histories of ``history_keys`` (all metrics when None)."""
    uri = resolve_uri(uri)
    client = _client(uri)
    exp_id = _experiment_id(client, uri, experiment, create=False)
    if exp_id is None:
        raise TrackingError(f"no MLflow experiment named {experiment!r} at {uri}")
    flt = f"tags.`{names.SWEEP_TAG}` = '{sweep_id}'" if sweep_id else ""
    runs = retry(
        client.search_runs, [exp_id], filter_string=flt, order_by=["attributes.start_time ASC"],
        max_results=5000,
    )
    records = []
    for run in runs:
        info, data = run.info, run.data
        keys = data.metrics if history_keys is None else [
            k for k in history_keys if k in data.metrics
        ]
        history = {
            key: tuple(sorted((int(m.step), float(m.value))
                              for m in retry(client.get_metric_history, info.run_id, key)))
            for key in keys
        }
        records.append(RunRecord(
            run_id=info.run_id,
            name=info.run_name or info.run_id,
            status=info.status,
            start_time=None if info.start_time is None else info.start_time / 1000,
            end_time=None if info.end_time is None else info.end_time / 1000,
            params=dict(data.params),
            tags=dict(data.tags),
            metrics={k: float(v) for k, v in data.metrics.items() if not math.isnan(v)},
            history=history,
        ))
    return records


def percent_saved(mine: float, reference: float) -> float:
    """100·(1 − mine/reference); NaN when either is missing or the reference is ≤ 0."""
    if not (math.isfinite(mine) and math.isfinite(reference)) or reference <= 0:
        return math.nan
    return 100.0 * (1.0 - mine / reference)
