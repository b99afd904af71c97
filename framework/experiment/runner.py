"""One experiment run: validate the config, hold the thread limit, run the task tracked
(``task=train``/``record`` resume from the output folder's checkpoint)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import filelock
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from backends import BackendUnavailableError, get_backend
from backends.threads import choose_num_threads, limited_threads
from framework.experiment import checkpoint, names, resolve
from framework.experiment.cluster import DaskEngine, cluster_client
from framework.experiment.config import (
    Config,
    ConfigError,
    ProblemName,
    Task,
    flatten,
    to_yaml,
    validate,
)
from framework.experiment.console import label_job, say
from framework.experiment.engine_setup import build_samples, make_engine
from framework.experiment.evaluate import prepare_evaluation, run_evaluation
from framework.experiment.theta_file import read_theta
from framework.experiment.tracker import Tracker, make_tracker
from framework.experiment.tracking import folder_lock, resolve_uri, sqlite_path
from framework.experiment.train import EngineFactory, check_resumable, train


def _hydra_context() -> tuple[Path | None, dict[str, str]]:
    """The Hydra output dir when running under Hydra, and a multirun job's sweep tags."""
    if not HydraConfig.initialized():
        return None, {}
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    label_job(hc.job.num if multirun else None)
    tags = {names.SWEEP_TAG: str(hc.sweep.dir), names.JOB_NUM_TAG: str(hc.job.num),
            names.OVERRIDES_TAG: " ".join(hc.overrides.task)} if multirun else {}
    return Path(hc.runtime.output_dir), tags


def _wait_for_previous_writer(out: Path) -> None:
    """A killed run's tracking writer may still be logging its last steps and checkpoint:
    wait until it lets go of the folder."""
    if not out.is_dir():
        return
    lock = folder_lock(out)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        say(f"waiting for the tracking writes of the previous run in {out} to finish")
        lock.acquire()
    lock.release()


def _run_name(c: Config) -> str:
    if c.tracking.run_name:
        return c.tracking.run_name
    dim = f"-k{c.recycle.dim}" if c.recycle.enabled else ""
    if c.task == Task.resolve:
        return f"resolve-{resolve.method_label(c.recycle, c.stop)}{dim}"
    prefix = "" if c.task == Task.train else f"{c.task}-"
    return f"{prefix}{c.problem.name}-{c.recycle.strategy}{dim}"


def run(
    cfg: DictConfig | Config,
    *,
    output_dir: str | Path | None = None,
    engine_factory: EngineFactory | None = None,
) -> Any:
    """Run (or resume) the experiment ``cfg``; return the task's ``RunSummary``,
    ``ResolveSummary`` or ``EvaluationSummary``.  Bad inputs (a recording, a θ file, a
    checkpoint of another config) fail before the tracking run is created.  The run holds
    the BLAS/OpenMP thread limit of ``backend.num_threads`` (``backends.threads``) and logs
    the count threadpoolctl reports as the param ``backend.blas_threads``."""
    c = validate(cfg)
    try:  # the backend and device exist, before any run is created
        get_backend(c.backend.name, dtype=c.backend.dtype, device=c.backend.device)
    except BackendUnavailableError as exc:
        raise ConfigError(f"backend.name: {exc}") from exc
    quadratic = c.problem.name == ProblemName.quadratic and c.task != Task.resolve
    dense = c.problem.n**2 if quadratic else 0
    limit = choose_num_threads(c.backend.name, c.backend.num_threads, dense_entries=dense)
    hydra_dir, tags = _hydra_context()
    sweep_dir = tags.get(names.SWEEP_TAG)
    with limited_threads(limit) as blas_threads:
        if limit is not None:
            say(f"threads: {blas_threads} BLAS thread(s) (backend.num_threads="
                f"{'auto' if c.backend.num_threads is None else c.backend.num_threads})")
        run_params = {"backend.blas_threads": str(blas_threads)}
        if c.tracking.sweep_id:
            tags[names.SWEEP_TAG] = c.tracking.sweep_id
        out = Path(output_dir) if output_dir is not None else (hydra_dir or Path.cwd())
        tags[names.OUTPUT_DIR_TAG] = str(out.resolve())
        state, params, tracker = None, None, None  # params: logged here for resolve/evaluate
        init_theta = None  # outer.init_theta_path's θ, read and checked before the run
        if c.task == Task.resolve:
            recording = resolve.load_sequence(c.sequence.path or "")
            tags.update(resolve.resolve_tags(c))
            params = resolve.resolve_params(c, recording)
            work = partial(resolve.run_resolve, c, recording)
        elif c.task == Task.evaluate:
            params = flatten(c)
            work = partial(run_evaluation, c, prepare_evaluation(c), out)
        else:
            ckpt_path = out / c.checkpoint.filename
            _wait_for_previous_writer(out)
            if c.resume_from and not ckpt_path.is_file():
                tracker = _fetch_checkpoint(c, out)
            state = checkpoint.load(ckpt_path) if ckpt_path.is_file() else None
            if state is not None:
                check_resumable(state, c, ckpt_path)
            elif c.outer.init_theta_path is not None:  # readable and of this problem's shape
                init_theta = read_theta("outer.init_theta_path", c.outer.init_theta_path,
                                        build_samples(c)[1].theta0.shape)
            work = partial(train, c, out, ckpt_path, state,
                           engine_factory=engine_factory or make_engine, run_params=run_params,
                           init_theta=init_theta)
        out.mkdir(parents=True, exist_ok=True)
        params = None if params is None else {**params, **run_params}
        sweep = None if sweep_dir is None else (sweep_dir, tags[names.SWEEP_TAG])
        with cluster_client(c.cluster) as client:  # started (or reached) before the run
            if client is not None and engine_factory is None:
                work = partial(work, engine_factory=partial(DaskEngine, client))
            return _tracked(c, out, tags, state, params, work, tracker, sweep)


def _fetch_checkpoint(c: Config, out: Path) -> Tracker:
    """The run's tracker, once the checkpoint artifact of the run ``resume_from`` is in
    ``out`` (another machine's run resumes here)."""
    db = sqlite_path(resolve_uri(c.tracking.uri))
    if db is not None and not db.is_file():  # not created to find nothing in it
        raise ConfigError(f"resume_from: no MLflow store at {db}; give the store of run "
                          f"{c.resume_from} (tracking.uri or MLFLOW_TRACKING_URI)")
    tracker = make_tracker(c.tracking)
    out.mkdir(parents=True, exist_ok=True)
    why = tracker.fetch(c.resume_from, c.checkpoint.filename, out)
    if why is not None:
        tracker.end()
        raise ConfigError(f"resume_from: {why}; give the id of a run with a checkpoint "
                          f"({names.RUN_ID_FILE} in its output folder)")
    say(f"downloaded the checkpoint of MLflow run {c.resume_from}")
    return tracker


def _tracked(c: Config, out: Path, tags: dict[str, str], state: dict[str, Any] | None,
             params: dict[str, str] | None, work: Any, tracker: Tracker | None,
             sweep: tuple[str, str] | None) -> Any:
    """``work(tracker)`` as one tracked run: a new one (nested in the ``sweep``'s parent
    run), the checkpoint's (``state``), or the one left by a run killed in ``out`` before
    its first checkpoint."""
    tracker = tracker or make_tracker(c.tracking)  # unreachable or read-only store: here
    tracker.start(run_name=_run_name(c), tags=tags,
                  run_id=None if state is None else state.get("run_id"),
                  record_to=out / names.RUN_ID_FILE, sweep=sweep)
    say(f"output dir {out.resolve()}")
    if tracker.enabled:
        say(f"tracking {tracker.uri} experiment {c.tracking.experiment!r}")
    try:
        if params is not None:
            tracker.log_params(params)
            tracker.log_text(to_yaml(c), "config.yaml")
        summary = work(tracker)
    except BaseException as exc:
        tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    tracker.end("FINISHED")
    if tracker.enabled:
        say(f"MLflow run {tracker.run_id} at {tracker.uri}")
        if tracker.uri.startswith("sqlite:///"):
            say(f"browse with: mlflow ui --backend-store-uri {tracker.uri}")
    return summary
