"""``task=train`` / ``task=record``: the outer loop, its checkpoints and its figures.

Mini-batches come from a NumPy generator seeded by ``SeedSequence(seed)`` (entropy logged,
state checkpointed: a resumed run draws the batches of an uninterrupted one).  Metrics at
step k describe the evaluation at θ_k (before the update to θ_{k+1}); the
``names.cumulative(key)`` metrics add up the ``names.TRAIN_COUNTS`` of steps 0..k.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from tqdm import tqdm

from framework.bilevel.engine import NonFiniteError
from framework.bilevel.recording import SequenceRecorder
from framework.experiment import names, plots
from framework.experiment.checkpoint import CheckpointError
from framework.experiment.config import (
    Config,
    ConfigError,
    Optimizer,
    ProblemName,
    Regularizer,
    Task,
    flatten,
    to_yaml,
)
from framework.experiment.console import say
from framework.experiment.engine_setup import build_samples
from framework.experiment.evaluate import original
from framework.experiment.resolve import problem_config_json
from framework.experiment.stop_signals import StepBoundary
from framework.experiment.theta_file import THETA_FILE, write_theta
from framework.optim import make_optimizer
from problems.base import psnr
from problems.factory import ProblemSet

PROGRESS_SECONDS = 10.0  # without a terminal: a progress line at most this often
_BATCH_STREAM = 2**31 - 1  # spawn key of the mini-batch generator (distinct from sample seeds)
EngineFactory = Callable[[ProblemSet, Config, Any], Any]


@dataclass(frozen=True)
class RunSummary:
    """What a finished run produced and where to find it."""

    checkpoint_path: Path
    theta_path: Path
    tracking_uri: str | None
    run_id: str | None
    steps: int
    resumed_from_step: int | None
    final_loss: float
    cumulative: Mapping[str, float]
    theta: np.ndarray
    sequence_path: Path | None = None


class DivergedError(RuntimeError):
    """θ or the upper loss became non-finite during training."""


def _batch_generator(seed: int) -> tuple[np.random.Generator, int]:
    root = np.random.SeedSequence(seed)
    ss = np.random.SeedSequence(root.entropy, spawn_key=(_BATCH_STREAM,))
    return np.random.default_rng(ss), int(root.entropy)


def _batch(rng: np.random.Generator, count: int, size: int | None) -> list[int]:
    if size is None or size >= count:
        return list(range(count))
    return sorted(int(i) for i in rng.choice(count, size=size, replace=False))


# Keys a resumed run may change (length, bookkeeping, display, its SLURM workers' jobs)
_RESUMABLE_CHANGES = ("outer.steps", "checkpoint.", "tracking.", "progress", "resume_from",
                      "cluster.slurm")
_STATE_KEYS = ("step", "theta", "optimizer", "engine", "rng", "history", "per_sample",
               "cumulative", "config")


def resume_identity(c: Config) -> dict[str, str]:
    """The flattened config minus the keys a resumed run may change."""
    return {k: v for k, v in flatten(c).items() if not k.startswith(_RESUMABLE_CHANGES)}


def check_resumable(state: dict[str, Any], c: Config, path: Path) -> None:
    """Refuse a checkpoint that cannot resume the run ``c`` exactly: keys missing, θ not
    finite, a random state the mini-batch generator does not accept (``CheckpointError``),
    or written under another config (``ConfigError``)."""
    fix = f"delete {path} to start afresh (or choose another hydra.run.dir)"
    missing = [key for key in _STATE_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path}: not a training checkpoint (no {', '.join(missing)}); "
                              f"{fix}")
    theta = np.asarray(state["theta"])
    if theta.dtype.kind != "f" or not np.all(np.isfinite(theta)):
        raise CheckpointError(f"{path}: θ is not a finite float array; {fix}")
    try:
        _batch_generator(0)[0].bit_generator.state = state["rng"]
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: the mini-batch generator's state is invalid ({exc}); "
                              f"{fix}") from exc
    old, new = state["config"], resume_identity(c)
    defaults = flatten(Config)  # a key the schema gained after the checkpoint: its default
    changed = sorted(k for k in old.keys() | new.keys()
                     if (old[k] if k in old else defaults.get(k)) != new.get(k))
    if changed:
        detail = ", ".join(f"{k}: {old.get(k)} → {new.get(k)}" for k in changed[:5])
        raise ConfigError(
            f"{changed[0]}: {path} was written by a run with another config ({detail}); "
            "choose another hydra.run.dir, or rerun with the same config to resume"
        )


def train(c: Config, out: Path, ckpt_path: Path, state: dict[str, Any] | None, tracker: Any,
          engine_factory: EngineFactory, run_params: dict[str, str],
          init_theta: np.ndarray | None = None) -> RunSummary:
    """Run (or resume, from a checkpoint ``state``) the outer loop from ``init_theta`` (None:
    the problem's θ₀; the caller checked its shape): one engine evaluation
    and one optimiser step per step, a checkpoint every ``checkpoint.every`` steps (written
    by the tracker after the metrics it follows) and at the end; then θ, the recording
    (``task=record``) and the figures."""
    if state is not None:
        say(f"resuming from {ckpt_path} at step {state['step']}")
    backend, problem_set = build_samples(c)
    engine = engine_factory(problem_set, c, backend)
    optimizer = make_optimizer(c.outer, mask=problem_set.mask)
    rng, entropy = _batch_generator(c.seed)
    recorder = SequenceRecorder(c.sequence.samples, backend) if c.task == Task.record else None
    resumed_from = None if state is None else int(state["step"])
    if state is None:
        tracker.log_params({
            **flatten(c),
            "seed_entropy": str(entropy),
            "num_samples": str(len(problem_set)),
            "theta_size": str(problem_set.theta0.size),
            "problem_description": problem_set.description,
            "backend_device": str(backend.device),
            **run_params,
        })
        tracker.log_text(to_yaml(c), "config.yaml")
        start_theta = problem_set.theta0 if init_theta is None else init_theta
        state = {"step": 0, "theta": start_theta, "history": [], "per_sample": [],
                 "cumulative": {}}
    else:
        optimizer.load_state_dict(state["optimizer"])
        engine.load_state_dict(state["engine"])
        rng.bit_generator.state = state["rng"]
        if recorder is not None and "recording" in state:
            recorder.load_state_dict(state["recording"])
    start = int(state["step"])
    theta = backend.asarray(np.asarray(state["theta"]))
    # the checkpoint's lists and sums (JSON: exact), extended in place
    history, per_sample, sums = state["history"], state["per_sample"], state["cumulative"]
    identity = resume_identity(c)
    # with checkpoints, a step's metrics go to the store with the next checkpoint, so a run
    # killed between checkpoints and resumed logs every step once
    pending: list[tuple[dict[str, float], int]] = []
    saved = [] if resumed_from is None else [resumed_from]  # the last checkpoint's step
    # the step after which a full-batch line search found no lower loss (the run ends there)
    stalled: list[int] = [int(state["stalled"])] if state.get("stalled") else []

    def snapshot(step: int, finished: bool) -> None:
        if not c.checkpoint.every:  # checkpoint=off: no file (metrics were logged at once)
            return
        steps = [(metrics, at) for metrics, at in pending if at < step]
        pending.clear()
        saved[:] = [step]
        tracker.save_checkpoint(  # written right after the metrics of the steps before it
            ckpt_path,
            {
                "step": step,
                "finished": finished,
                "theta": backend.to_numpy(theta),
                "optimizer": optimizer.state_dict(),
                "engine": engine.state_dict(),
                "rng": rng.bit_generator.state,
                "history": history,
                "per_sample": per_sample,
                "cumulative": sums,
                "config": identity,
                **({"stalled": stalled[0]} if stalled else {}),
                **({} if recorder is None else {"recording": recorder.state_dict()}),
            },
            metrics=steps,
        )

    def _diverged(step: int, what: str) -> NoReturn:
        for metrics, at in pending:  # the steps that led there, for diagnosis
            tracker.log_metrics(metrics, at)
        kept = (f"the checkpoint of step {saved[0]} ({ckpt_path}) is kept" if saved
                else "no checkpoint was written")
        raise DivergedError(f"step {step}: {what}; {kept}; lower outer.lr")

    show = c.progress and sys.stdout.isatty()
    last_line = time.perf_counter()
    bar = tqdm(total=c.outer.steps, initial=start, disable=not show, desc="outer", unit="step")
    if stalled:
        say(f"this run stopped after step {stalled[0]}: no step lowered its loss; nothing to do")
    elif state.get("finished") and start >= c.outer.steps:
        say("this run had already finished; nothing to do")
    done = start  # steps whose every update is made (a step's updates: all or none)
    boundary = StepBoundary()
    try:
        for step in range(start, start if stalled else c.outer.steps):
            with boundary.step():  # Ctrl-C, SIGTERM: when this step ends
                indices = _batch(rng, len(problem_set), c.outer.batch_size)
                t0 = time.perf_counter()
                try:
                    result = engine.evaluate(theta, indices)
                except NonFiniteError as exc:
                    _diverged(step, str(exc))
                if recorder is not None:
                    recorder.capture(engine, theta, indices)
                backtracks = c.outer.name != Optimizer.adam  # needs the batch's loss
                loss_fn = partial(engine.loss, indices=indices) if backtracks else None
                update = optimizer.step(theta, result.grad, loss=float(result.loss),
                                        loss_fn=loss_fn)
                finite = bool(backend.xp.all(backend.xp.isfinite(update.theta)))  # one transfer
                if not (math.isfinite(result.loss) and finite):
                    _diverged(step, f"θ became non-finite (upper loss {result.loss:.6g})")
                theta = update.theta
                metrics = {k: float(v) for k, v in result.metrics().items()}
                metrics[names.STEP_TIME] = time.perf_counter() - t0
                metrics[names.OUTER_STEP_SIZE] = update.step_size
                metrics[names.OUTER_BACKTRACKS] = float(update.backtracks)
                metrics[names.BATCH_SIZE] = float(len(indices))
                for key in names.TRAIN_COUNTS:
                    if key in metrics:
                        sums[key] = sums.get(key, 0.0) + metrics[key]
                        metrics[names.cumulative(key)] = sums[key]
                pending.append((metrics, step))
                if not c.checkpoint.every:
                    tracker.log_metrics(*pending.pop())
                history.append({"step": float(step), **metrics})
                if metrics.get(names.WORKERS_LOST):  # a Dask worker died: tag the run now
                    lost = {int(h["step"]): h[names.WORKERS_LOST] for h in history
                            if h.get(names.WORKERS_LOST)}
                    tracker.set_tags({names.LOST_WORKERS_TAG: int(sum(lost.values())),
                                      names.LOST_WORKER_STEPS_TAG: ",".join(map(str, lost))})
                per_sample.extend(  # [step, sample, Krylov iterations, shadow iterations or NaN]
                    [float(step), int(i), float(s.krylov_iterations),
                     math.nan if s.shadow is None else float(s.shadow.iterations)]
                    for i, s in zip(indices, result.samples, strict=True)
                )
                loss = metrics[names.UPPER_LOSS]
                krylov = int(metrics.get(names.KRYLOV_ITERATIONS, 0))
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4g}", krylov=krylov)
                now = time.perf_counter()
                if c.progress and not show and (step in (start, c.outer.steps - 1)
                                                or now - last_line >= PROGRESS_SECONDS):
                    last_line = now  # no terminal (a log file, a scheduler): a line now and then
                    say(f"step {step + 1}/{c.outer.steps}: upper loss {loss:.6g}, Krylov "
                        f"iterations {krylov}, {metrics[names.STEP_TIME]:.3g} s/step")
                if c.checkpoint.every and (step + 1) % c.checkpoint.every == 0:
                    snapshot(step + 1, finished=False)
                done = step + 1
                if not update.accepted and len(indices) == len(problem_set):
                    stalled.append(done)  # every later step would repeat this line search
                    say(f"step {done}: no trial step lowered the full-batch upper loss "
                        f"({update.loss_evals} trials); θ cannot move, so the run stops here. "
                        "The lower solves' error may be larger than what a step changes the "
                        f"loss by: lower solver.lower.gtol (now {c.solver.lower.gtol:g}) for "
                        "more accurate losses, or stop.rtol for a more accurate hypergradient")
                    tracker.set_tags({names.STALLED_TAG: str(done)})
                    break
    except KeyboardInterrupt:
        bar.close()
        if boundary.forced:  # a second signal stopped a step half-way: its state is partial
            say(f"stopped at once; the checkpoint of step {saved[0]} ({ckpt_path}) is kept — "
                "rerun the same command to resume from it" if saved else
                "stopped at once; no checkpoint was written")
            raise
        snapshot(done, finished=False)  # a step boundary: the rerun resumes bit-identically
        tracker.flush()  # the checkpoint is on disk before we say so
        say(f"interrupted after step {done}; state saved to {ckpt_path} — rerun the same "
            "command to resume" if c.checkpoint.every
            else "interrupted (checkpoint=off: no state saved)")
        raise
    bar.close()
    snapshot(stalled[0] if stalled else c.outer.steps, finished=True)

    theta_np = backend.to_numpy(theta)
    theta_path = out / THETA_FILE
    write_theta(theta_path, theta_np)
    tracker.log_artifact(theta_path)
    sequence_path = None
    if recorder is not None:
        recording = recorder.recording(problem_set.problems, problem_config_json(c))
        sequence_path = recording.save(out / c.sequence.filename).resolve()
        tracker.log_artifact(sequence_path)
        tracker.set_tags({names.TASK_TAG: Task.record})
        say(f"recorded sequence ({recording.steps} steps, samples "
            f"{list(recording.sample_indices)}): {sequence_path}")
    _log_figures(c, out, tracker, problem_set, backend, engine, theta, history, per_sample)
    losses = [h[names.UPPER_LOSS] for h in history]
    if losses:
        say(f"finished {len(history)} steps; upper loss {losses[0]:.6g} → {losses[-1]:.6g}")
    say(f"results in {out.resolve()} (θ: {theta_path.name})")
    return RunSummary(
        checkpoint_path=ckpt_path.resolve(),
        theta_path=theta_path.resolve(),
        tracking_uri=tracker.uri,
        run_id=tracker.run_id,
        steps=len(history),
        resumed_from_step=resumed_from,
        final_loss=losses[-1] if losses else math.nan,
        cumulative=sums,
        theta=theta_np,
        sequence_path=sequence_path,
    )


def _log_figures(c: Config, out: Path, tracker: Any, problem_set: ProblemSet, backend: Any,
                 engine: Any, theta: Any, history: list[dict[str, float]],
                 per_sample: list[list[float]]) -> None:
    """Write the run's figures to ``<out>/figures`` and log those files; the
    reconstruction is the engine's lower-level solution (``solver.lower``) of sample 0."""
    counts = [names.cumulative(k) for k in (names.KRYLOV_ITERATIONS,
                                            names.BASELINE_KRYLOV_ITERATIONS)]
    figures = {
        "iterations_per_system.png": plots.iterations_per_system(
            per_sample, "recycled" if c.recycle.enabled else "MINRES"),
        "cumulative_iterations.png": plots.line(history, counts, "cumulative Krylov iterations"),
        "upper_loss.png": plots.line(history, [names.UPPER_LOSS], "upper loss"),
    }
    theta_np = backend.to_numpy(theta)  # θ's figure: FoE filters, else a bar per entry
    imaging = c.problem.name != ProblemName.quadratic
    if imaging and c.problem.regularizer == Regularizer.foe:
        figures["filters.png"] = plots.filters(theta_np, c.problem.kernel_size)
    elif imaging and c.problem.regularizer == Regularizer.tv_foe:  # θ = (TV's p, the FoE's θ)
        foe = theta_np.reshape(-1)[1:].reshape(
            -1, c.problem.kernel_size**2 + len(c.problem.expert_widths))
        figures["filters.png"] = plots.filters(foe, c.problem.kernel_size,
                                               f"TV weight 10^{theta_np.reshape(-1)[0]:.2f}")
    else:
        figures["parameters.png"] = plots.parameters(theta_np)
    p, x = problem_set.problems[0], engine.lower_solutions(theta, [0])[0, ...]
    truth, y, x = (original(v, p) for v in (p.x_true, p.y, x))  # the image's own scale
    figures["reconstruction.png"] = plots.reconstruction(
        tuple(p.image_shape), truth, (("data", y, psnr(y, truth)), ("x(θ)", x, psnr(x, truth))),
    )
    for name, fig in figures.items():  # drawn once: the PNG file is the artifact
        tracker.log_artifact(plots.save(fig, out / "figures" / name), "figures")
