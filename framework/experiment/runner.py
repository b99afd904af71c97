"""One experiment run: config → backend → problems → engine → outer loop → tracker.

``run(cfg)`` validates the config before touching data or the tracking store, then
resumes from ``<output dir>/<checkpoint.filename>`` when that file exists (same MLflow
run, steps continue), checkpoints every ``checkpoint.every`` steps and at the end, and
returns a ``RunSummary``.  Mini-batches come from a NumPy generator seeded by
``SeedSequence(seed)`` (its entropy is logged); its state is part of the checkpoint, so a
resumed run draws the same batches as an uninterrupted one.

Metrics at step k describe the evaluation at θ_k (before the update to θ_{k+1}); the
``cumulative_*`` metrics add up the counts of steps 0..k.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from backends import get_backend, tune_cpu_allocator
from backends.threads import choose_num_threads, limited_threads
from framework.experiment import checkpoint, plots
from framework.experiment.config import Config, ConfigError, flatten, to_yaml, validate
from framework.experiment.console import say
from framework.experiment.engine_setup import make_engine
from framework.experiment.evaluate import prepare_evaluation, run_evaluation
from framework.experiment.record import SequenceRecorder, problem_config_json
from framework.experiment.resolve import (
    load_sequence,
    method_label,
    resolve_params,
    resolve_tags,
    run_resolve,
)
from framework.experiment.tracking import OUTPUT_DIR_TAG, SWEEP_TAG, make_tracker, resolve_uri
from framework.optim import lbfgs, make_optimizer
from problems.base import psnr
from problems.factory import ProblemSet, build_problems

THETA_FILE = "theta.npz"
# Step metrics that are counts: their running sums are logged as cumulative_<key>.
CUMULATIVE_KEYS = (
    "krylov_iterations",
    "lower_iterations",
    "hvp",
    "hvp_passes",
    "jac_t",
    "jac_t_passes",
    "operator_applications",
    "operator_passes",
    "baseline_krylov_iterations",
    "baseline_hvp",
    "batch_size",
    "step_time",
)
_BATCH_STREAM = 2**31 - 1  # spawn key of the mini-batch generator (distinct from sample seeds)


@dataclass(frozen=True)
class RunSummary:
    """What a finished run produced and where to find it."""

    output_dir: Path
    checkpoint_path: Path
    theta_path: Path
    tracking_uri: str | None
    experiment: str | None
    run_id: str | None
    steps: int
    resumed_from_step: int | None
    initial_loss: float
    final_loss: float
    cumulative: Mapping[str, float]
    wall_time: float
    theta: np.ndarray
    sequence_path: Path | None = None


EngineFactory = Callable[[ProblemSet, Config, Any], Any]


# -- helpers ------------------------------------------------------------------------------
def _hydra_context() -> tuple[Path | None, dict[str, str]]:
    """The Hydra output dir and sweep tags when running under Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return None, {}
        hc = HydraConfig.get()
    except Exception:
        return None, {}
    tags: dict[str, str] = {}
    if hc.mode == RunMode.MULTIRUN:
        tags[SWEEP_TAG] = str(hc.sweep.dir)
        tags["hyperkrylov.job_num"] = str(hc.job.num)
        tags["hyperkrylov.overrides"] = " ".join(hc.overrides.task)
    return Path(hc.runtime.output_dir), tags


def _batch_generator(seed: int) -> tuple[np.random.Generator, int]:
    root = np.random.SeedSequence(seed)
    ss = np.random.SeedSequence(root.entropy, spawn_key=(_BATCH_STREAM,))
    return np.random.default_rng(ss), int(root.entropy)


def _batch(rng: np.random.Generator, count: int, size: int | None) -> list[int]:
    if size is None or size >= count:
        return list(range(count))
    return sorted(int(i) for i in rng.choice(count, size=size, replace=False))


def _run_name(c: Config) -> str:
    if c.tracking.run_name:
        return c.tracking.run_name
    dim = "" if c.recycle.strategy == "none" else f"-k{c.recycle.dim}"
    if c.task == "resolve":
        return f"resolve-{method_label(c.recycle.strategy, c.recycle.which, c.stop.rule)}{dim}"
    prefix = "" if c.task == "train" else f"{c.task}-"
    return f"{prefix}{c.problem.name}-{c.recycle.strategy}{dim}"


def _sample_iterations(result: Any, indices: Sequence[int]) -> list[list[float]]:
    """(sample, Krylov iterations, shadow iterations or NaN) of each system of a step."""
    rows = []
    for pos, record in enumerate(getattr(result, "samples", ()) or ()):
        index = indices[pos] if pos < len(indices) else pos
        iters = float(getattr(record, "krylov_iterations", math.nan))
        shadow = getattr(record, "shadow", None)
        shadow_iters = getattr(shadow, "iterations", shadow)
        rows.append([int(index), iters, math.nan if shadow_iters is None else float(shadow_iters)])
    return rows


# Keys that may change between a run and its resumption (length, bookkeeping, display).
_RESUMABLE_CHANGES = ("outer.steps", "checkpoint.", "tracking.", "progress")


def _identity(c: Config) -> dict[str, str]:
    """The flattened config minus the keys a resumed run may change."""
    return {k: v for k, v in flatten(c).items() if not k.startswith(_RESUMABLE_CHANGES)}


def _check_resumable(state: dict[str, Any], c: Config, path: Path) -> None:
    """Refuse to resume a checkpoint written under a different config."""
    old, new = state.get("config", {}), _identity(c)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        detail = ", ".join(f"{k}: {old.get(k)} → {new.get(k)}" for k in changed[:5])
        raise ConfigError(
            f"{changed[0]}: {path} was written by a run with another config ({detail}); "
            "choose another hydra.run.dir, or rerun with the same config to resume"
        )


def _run_other(
    c: Config,
    out: Path,
    sweep_tags: dict[str, str],
    started: float,
    recording: Any,
    run_params: dict[str, str],
) -> Any:
    """``task=resolve`` / ``task=evaluate``: one tracked run, no training loop."""
    tags = {OUTPUT_DIR_TAG: str(out.resolve()), **sweep_tags}
    if c.task == "evaluate":
        prepared = prepare_evaluation(c)  # bad θ file / held-out range: before any run
    else:
        tags.update(resolve_tags(c))
    out.mkdir(parents=True, exist_ok=True)
    tracker = make_tracker(c.tracking)
    run_id = tracker.start(run_name=_run_name(c), tags=tags)
    say(f"output dir {out.resolve()}")
    if tracker.enabled:
        say(f"tracking {tracker.uri} experiment {c.tracking.experiment!r} run {run_id}")
    try:
        if c.task == "resolve":
            tracker.log_params({**resolve_params(c, recording), **run_params})
            tracker.log_text(to_yaml(c), "config.yaml")
            summary = run_resolve(c, recording, out, tracker, say, started)
        else:
            tracker.log_params({**flatten(c), **run_params})
            tracker.log_text(to_yaml(c), "config.yaml")
            summary = run_evaluation(c, prepared, out, tracker, say)
    except BaseException as exc:
        tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    tracker.end("FINISHED")
    if tracker.enabled:
        say(f"MLflow run {run_id} at {tracker.uri}")
    return summary


# -- the run ------------------------------------------------------------------------------
def run(
    cfg: DictConfig | Config,
    *,
    output_dir: str | Path | None = None,
    engine_factory: EngineFactory | None = None,
) -> Any:
    """Run (or resume) the experiment described by ``cfg``; see the module docstring.
    ``task=train``/``record`` return a ``RunSummary``, ``task=resolve`` a
    ``framework.experiment.resolve.ResolveSummary``, ``task=evaluate`` an ``EvaluationSummary``.

    The whole run holds the BLAS/OpenMP thread limit of ``backend.num_threads``
    (``backends.threads``); the count threadpoolctl reports inside the run is logged as
    the parameter ``backend.blas_threads``."""
    started = time.perf_counter()
    c = validate(cfg)
    dense = c.problem.n**2 if c.problem.name == "quadratic" and c.task != "resolve" else 0
    limit = choose_num_threads(c.backend.name, c.backend.num_threads, dense_entries=dense)
    with limited_threads(limit) as blas_threads:
        if limit is not None:
            say(f"threads: {blas_threads} BLAS thread(s) (backend.num_threads="
                 f"{'auto' if c.backend.num_threads is None else c.backend.num_threads})")
        run_params = {"backend.blas_threads": str(blas_threads)}
        return _run(c, started, run_params, output_dir, engine_factory)


def _run(
    c: Config,
    started: float,
    run_params: dict[str, str],
    output_dir: str | Path | None,
    engine_factory: EngineFactory | None,
) -> Any:
    hydra_dir, sweep_tags = _hydra_context()
    if c.tracking.sweep_id:
        sweep_tags[SWEEP_TAG] = c.tracking.sweep_id
    out = Path(output_dir) if output_dir is not None else (hydra_dir or Path.cwd())
    if c.task in ("resolve", "evaluate"):
        recording = None
        if c.task == "resolve":  # a bad recording fails here, before any tracking run exists
            recording = load_sequence(c.sequence.path or "")
        return _run_other(c, out, sweep_tags, started, recording, run_params)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / c.checkpoint.filename
    state = checkpoint.load(ckpt_path) if ckpt_path.is_file() else None
    if state is not None:
        _check_resumable(state, c, ckpt_path)

    tracker = make_tracker(c.tracking)  # an unreachable server fails here, before any work
    run_id = tracker.start(
        run_name=_run_name(c),
        tags={OUTPUT_DIR_TAG: str(out.resolve()), **sweep_tags},
        run_id=None if state is None else state.get("run_id"),
    )
    uri = tracker.uri if tracker.enabled else None
    say(f"output dir {out.resolve()}")
    if tracker.enabled:
        say(f"tracking {uri} experiment {c.tracking.experiment!r} run {run_id}")
    if state is not None:
        say(f"resuming from {ckpt_path} at step {state['step']}")
    try:
        summary = _loop(c, out, ckpt_path, state, tracker, engine_factory or make_engine, started,
                        run_params)
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        tracker.end(status)
        raise
    tracker.end("FINISHED")
    say(
        f"finished {summary.steps} steps in {summary.wall_time:.1f} s; upper loss "
        f"{summary.initial_loss:.6g} → {summary.final_loss:.6g}"
    )
    say(f"results in {out.resolve()} (θ: {summary.theta_path.name})")
    if uri is not None:
        say(f"MLflow run {run_id} at {uri}")
        if uri.startswith("sqlite:///"):
            say(f"browse with: mlflow ui --backend-store-uri {uri}")
    return summary


def _loop(
    c: Config,
    out: Path,
    ckpt_path: Path,
    state: dict[str, Any] | None,
    tracker: Any,
    engine_factory: EngineFactory,
    started: float,
    run_params: dict[str, str],
) -> RunSummary:
    from tqdm import tqdm

    backend = get_backend(c.backend.name, dtype=c.backend.dtype, device=c.backend.device)
    if backend.name == "numpy":
        tune_cpu_allocator()  # batched temporaries: avoid an mmap + page faults per array
    problem_set = build_problems(c.problem, backend, c.seed)
    engine = engine_factory(problem_set, c, backend)
    optimizer = make_optimizer(c.outer, mask=problem_set.mask)
    rng, entropy = _batch_generator(c.seed)
    recorder = None
    if c.task == "record":
        recorder = SequenceRecorder(c.sequence.samples)
        if state is not None and "recording" in state:
            recorder.load_state_dict(state["recording"])

    if state is None:
        start = 0
        theta_host = problem_set.theta0
        history: list[dict[str, float]] = []
        per_sample: list[list[float]] = []
        cumulative: dict[str, float] = {}
        params = flatten(c)
        params.update(
            {
                "seed_entropy": str(entropy),
                "num_samples": str(len(problem_set)),
                "theta_size": str(problem_set.theta0.size),
                "problem_description": problem_set.description,
                "backend_device": str(backend.device),
                **run_params,
            }
        )
        tracker.log_params(params)
        tracker.log_text(to_yaml(c), "config.yaml")
    else:
        start = int(state["step"])
        theta_host = np.asarray(state["theta"])
        optimizer.load_state_dict(state["optimizer"])
        engine.load_state_dict(state["engine"])
        rng.bit_generator.state = state["rng"]
        history = list(state["history"])
        per_sample = [list(r) for r in state["per_sample"]]
        cumulative = {k: float(v) for k, v in state["cumulative"].items()}
    theta = backend.asarray(theta_host)

    def snapshot(step: int, finished: bool) -> None:
        checkpoint.save(
            ckpt_path,
            {
                "step": step,
                "finished": finished,
                "theta": backend.to_numpy(theta),
                "optimizer": optimizer.state_dict(),
                "engine": engine.state_dict(),
                "rng": rng.bit_generator.state,
                "run_id": tracker.run_id,
                "history": history,
                "per_sample": per_sample,
                "cumulative": cumulative,
                "config": _identity(c),
                **({} if recorder is None else {"recording": recorder.state_dict()}),
            },
        )

    show = c.progress and sys.stdout.isatty()
    bar = tqdm(total=c.outer.steps, initial=start, disable=not show, desc="outer", unit="step")
    if state is not None and state.get("finished") and start >= c.outer.steps:
        say("this run had already finished; nothing to do")
    step = start
    try:
        for step in range(start, c.outer.steps):
            indices = _batch(rng, len(problem_set), c.outer.batch_size)
            t0 = time.perf_counter()
            result = engine.evaluate(theta, indices)
            if recorder is not None:
                recorder.capture(engine, theta, indices, backend)
            loss_fn = partial(engine.loss, indices=indices) if c.outer.name == "gd" else None
            update = optimizer.step(theta, result.grad, loss=float(result.loss), loss_fn=loss_fn)
            theta = update.theta
            metrics = {k: float(v) for k, v in result.metrics().items()}
            metrics.setdefault("upper_loss", float(result.loss))
            metrics["step_time"] = time.perf_counter() - t0
            metrics["outer_step_size"] = update.step_size
            metrics["outer_backtracks"] = float(update.backtracks)
            metrics["batch_size"] = float(len(indices))
            for key in CUMULATIVE_KEYS:
                if key in metrics:
                    cumulative[key] = cumulative.get(key, 0.0) + metrics[key]
                    metrics[f"cumulative_{key}"] = cumulative[key]
            tracker.log_metrics(metrics, step)
            history.append({"step": float(step), **metrics})
            per_sample.extend([[float(step), *row] for row in _sample_iterations(result, indices)])
            bar.update(1)
            bar.set_postfix(
                loss=f"{metrics['upper_loss']:.4g}",
                krylov=int(metrics.get("krylov_iterations", 0)),
            )
            if c.checkpoint.every and (step + 1) % c.checkpoint.every == 0:
                snapshot(step + 1, finished=False)
        step = c.outer.steps
    except KeyboardInterrupt:
        bar.close()
        snapshot(step, finished=False)  # resumable; bitwise identity only from periodic ones
        say(f"interrupted; state saved to {ckpt_path} — rerun the same command to resume")
        raise
    bar.close()
    snapshot(c.outer.steps, finished=True)

    theta_np = backend.to_numpy(theta)
    theta_path = out / THETA_FILE
    np.savez(theta_path, theta=theta_np)
    tracker.log_artifact(theta_path)
    sequence_path = None
    if recorder is not None:
        recording = recorder.recording(problem_set.problems, backend, problem_config_json(c))
        sequence_path = recording.save(out / c.sequence.filename).resolve()
        tracker.log_artifact(sequence_path)
        tracker.set_tags({"hyperkrylov.task": "record"})
        say(
            f"recorded sequence ({recording.steps} steps, samples "
            f"{list(recording.sample_indices)}): {sequence_path}"
        )
    _log_figures(c, out, tracker, problem_set, backend, theta, history, per_sample)
    losses = [h["upper_loss"] for h in history]
    return RunSummary(
        output_dir=out.resolve(),
        checkpoint_path=ckpt_path.resolve(),
        theta_path=theta_path.resolve(),
        tracking_uri=resolve_uri(c.tracking.uri) if tracker.enabled else None,
        experiment=c.tracking.experiment if tracker.enabled else None,
        run_id=tracker.run_id,
        steps=len(history),
        resumed_from_step=None if state is None else int(state["step"]),
        initial_loss=losses[0] if losses else math.nan,
        final_loss=losses[-1] if losses else math.nan,
        cumulative=dict(cumulative),
        wall_time=time.perf_counter() - started,
        theta=theta_np,
        sequence_path=sequence_path,
    )


def _log_figures(
    c: Config,
    out: Path,
    tracker: Any,
    problem_set: ProblemSet,
    backend: Any,
    theta: Any,
    history: list[dict[str, float]],
    per_sample: list[list[float]],
) -> None:
    """Write the run's figures to ``<out>/figures`` and log them as artifacts."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in history:
        for key, value in row.items():
            if key != "step":
                series.setdefault(key, []).append((int(row["step"]), value))
    rows = [r for r in per_sample if math.isfinite(r[2])]
    shadow = [(r[0], r[1], r[3]) for r in per_sample if math.isfinite(r[3])]
    figures = {
        "iterations_per_system.png": plots.iterations_per_system(
            [(r[0], r[1], r[2]) for r in rows], shadow
        ),
        "cumulative_iterations.png": plots.line(
            series,
            ["cumulative_krylov_iterations", "cumulative_baseline_krylov_iterations"],
            "cumulative Krylov iterations",
        ),
        "upper_loss.png": plots.line(series, ["upper_loss"], "upper loss"),
    }
    theta_np = backend.to_numpy(theta)
    if c.problem.name != "quadratic" and c.problem.regularizer == "foe":
        figures["filters.png"] = plots.filters(theta_np, c.problem.kernel_size)
    else:
        figures["parameters.png"] = plots.parameters(theta_np)
    p = problem_set.problems[0]
    x0 = p.y if tuple(p.y.shape) == (p.n,) else backend.zeros((p.n,))
    lower = lbfgs(
        lambda x: p.lower_objective(x, theta),
        lambda x: p.lower_grad(x, theta),
        x0,
        gtol=c.solver.lower.gtol,
        maxiter=c.solver.lower.maxiter,
        memory=c.solver.lower.memory,
    )
    x_true, y, x = (backend.to_numpy(a) for a in (p.x_true, p.y, lower.x))
    figures["reconstruction.png"] = plots.reconstruction(
        x_true, y, x, tuple(p.image_shape), (psnr(p.y, p.x_true), psnr(lower.x, p.x_true))
    )
    for name, fig in figures.items():
        path = plots.save(fig, out / "figures" / name)
        tracker.log_artifact(path, "figures")
