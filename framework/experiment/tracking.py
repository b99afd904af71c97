"""Experiment tracking through MLflow — the only module of hyperkrylov that imports mlflow.

Where results go: ``tracking.uri`` when set, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///<cwd>/mlflow/mlflow.db``.  For a SQLite store, artifacts go to an
``artifacts/`` folder next to the database file (``mlflow/artifacts`` by default); a
tracking server chooses its own artifact store.

Parallel sweep jobs sharing one SQLite file race on schema creation and lock the file:
the experiment is created once up front (``prepare_experiment``, called by the sweep's
Hydra callback) and every write retries with exponential backoff while SQLite reports
"database is locked".  mlflow is imported lazily, so a disabled tracker costs nothing.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from framework.experiment import names

MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000
MAX_METRICS_PER_BATCH = 1000

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
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            if response.status >= 500:
                raise TrackingError(f"MLflow tracking server {uri} answered HTTP {response.status}")
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:
            raise TrackingError(f"MLflow tracking server {uri} answered HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it "
            "(`mlflow server ...`), fix tracking.uri / MLFLOW_TRACKING_URI, or run with "
            "tracking=disabled"
        ) from exc


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


def prepare_experiment(uri: str, name: str) -> str:
    """Create the experiment ``name`` (and the SQLite schema) once; return its id."""
    client = _client(uri)
    with _store_lock(uri):
        exp_id = _experiment_id(client, uri, name, create=True)
    assert exp_id is not None
    return exp_id


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."


class Tracker:
    """One MLflow run: params, stepped metrics, tags and artifacts."""

    enabled = True

    def __init__(self, uri: str | None = None, experiment: str = "hyperkrylov") -> None:
        self.uri = resolve_uri(uri)
        self.experiment = experiment
        self.run_id: str | None = None
        self._client = _client(self.uri)
        with _store_lock(self.uri):
            self.experiment_id = _experiment_id(self._client, self.uri, experiment, create=True)

    def start(
        self,
        *,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        run_id: str | None = None,
    ) -> str:
        """Create a run, or resume the run ``run_id`` (same run, status back to RUNNING)."""
        if run_id is not None:
            run = retry(self._client.get_run, run_id)
            if run.info.experiment_id != self.experiment_id:
                raise TrackingError(
                    f"run {run_id} belongs to experiment {run.info.experiment_id}, "
                    f"not {self.experiment!r}"
                )
            retry(self._client.update_run, run_id, status="RUNNING")
            self.run_id = run_id
        else:
            run = retry(
                self._client.create_run,
                self.experiment_id,
                run_name=run_name,
                tags=dict(tags or {}),
            )
            self.run_id = run.info.run_id
        if run_id is not None and tags:
            self.set_tags(tags)
        return self.run_id

    def _require_run(self) -> str:
        if self.run_id is None:
            raise TrackingError("no active run: call Tracker.start() first")
        return self.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params in batches of 100 (values cut to 6000 characters).

        On a resumed run, params already logged are skipped; a changed value is recorded
        as the tag ``resume.<key>`` (MLflow forbids changing a param within a run).
        """
        from mlflow.entities import Param

        run_id = self._require_run()
        existing = retry(self._client.get_run, run_id).data.params
        items, changed = [], {}
        for key, value in params.items():
            text = _param_value(value)
            if key not in existing:
                items.append(Param(key, text))
            elif existing[key] != text:
                changed[f"resume.{key}"] = text
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            retry(self._client.log_batch, run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])
        if changed:
            self.set_tags(changed)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log numeric metrics at ``step`` (non-numeric values are skipped)."""
        from mlflow.entities import Metric

        run_id = self._require_run()
        stamp = int(time.time() * 1000)
        items = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            items.append(Metric(key, number, stamp, int(step)))
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            retry(self._client.log_batch, run_id, metrics=items[i : i + MAX_METRICS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        run_id = self._require_run()
        items = [RunTag(k, _param_value(v)) for k, v in tags.items()]
        if items:
            retry(self._client.log_batch, run_id, tags=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        retry(self._client.log_artifact, self._require_run(), str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        retry(self._client.log_text, self._require_run(), text, artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED (or FAILED / KILLED)."""
        if self.run_id is not None:
            retry(self._client.set_terminated, self.run_id, status)

    def describe(self) -> str:
        return f"MLflow {self.uri} experiment {self.experiment!r} run {self.run_id}"


class NullTracker:
    """A tracker that records nothing (``tracking.enabled=false``, tests, benchmarks)."""

    enabled = False
    uri: str | None = None
    experiment = ""
    experiment_id = None

    def __init__(self) -> None:
        self.run_id: str | None = None

    def start(
        self,
        *,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        run_id: str | None = None,
    ) -> None:
        return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass

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
        keys = list(run.data.metrics) if history_keys is None else [
            k for k in history_keys if k in run.data.metrics
        ]
        history = {}
        for key in keys:
            points = retry(client.get_metric_history, run.info.run_id, key)
            history[key] = tuple(sorted((int(m.step), float(m.value)) for m in points))
        records.append(
            RunRecord(
                run_id=run.info.run_id,
                name=run.info.run_name or run.info.run_id,
                status=run.info.status,
                start_time=None if run.info.start_time is None else run.info.start_time / 1000,
                end_time=None if run.info.end_time is None else run.info.end_time / 1000,
                params=dict(run.data.params),
                tags=dict(run.data.tags),
                metrics={k: float(v) for k, v in run.data.metrics.items() if not math.isnan(v)},
                history=history,
            )
        )
    return records


def percent_saved(mine: float, reference: float) -> float:
    """100·(1 − mine/reference); NaN when either is missing or the reference is ≤ 0."""
    if not (math.isfinite(mine) and math.isfinite(reference)) or reference <= 0:
        return math.nan
    return 100.0 * (1.0 - mine / reference)
