"""``task=resolve``: re-solve a recorded Hessian sequence with one solver configuration
(the paper's protocol, README "Results").  References come from a tight MINRES
(``sequence.reference_rtol``), cached as ``<stem>.refs.npz`` next to the recording (keyed
by its SHA-256 and the tolerance; rewritten atomically when stale).  Per system t (MLflow
step t) the run logs the ``SystemRecord`` figures (``hg_error``: the relative error of
−Jᵀw against the reference), ``solve_time``, ``upper_loss`` and the ``cumulative_*`` of
``names.RESOLVE_COUNTS``; at the end ``total_*``, ``mean_hg_error`` and ``max_hg_error``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import zipfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from backends import get_backend
from framework.bilevel.recording import RecordedSequence
from framework.experiment import checkpoint, names
from framework.experiment.config import Config, ConfigError, ProblemConfig, Task, flatten
from framework.experiment.console import say
from framework.experiment.engine_setup import engine_config
from framework.krylov.recycle import RecycleConfig
from framework.krylov.selection import DEFAULT_WHICH, Strategy, Which
from framework.krylov.sequence import LinearSystem, SequenceResult, solve_sequence
from framework.krylov.stopping import StopConfig, StopKind
from problems.factory import build_problems

_END = {Which.small: "S", Which.large: "L", Which.mix: "M"}
_PAPER_NAMES = {Strategy.ritz: "Ritz-{}", Strategy.harmonic_ritz: "HRitz-{}",
                Strategy.rgen_right: "RGen-{}(R)", Strategy.rgen_left: "RGen-{}(L)",
                Strategy.rgen_both: "RGen-{}(B)"}
# Per-system metrics that are fields of ``SystemRecord`` under the same name.
_SYSTEM_METRICS = (names.ITERATIONS, names.HVP, "hvp_passes", names.JAC_T, "jac_t_passes",
                   names.APPLICATIONS, names.PASSES, names.HG_ERROR, names.HG_ERROR_ESTIMATE,
                   "residual_norm", "converged", "recycle_dim")


def method_label(recycle: RecycleConfig, stop: StopConfig) -> str:
    """The paper's name of a configuration: none, Ritz-S, HRitz-S, RGen-L(R), RGen-L(L),
    RGen-L(B), with "+NSC" for the hypergradient stopping rule."""
    strategy = recycle.strategy
    end = _END[recycle.which or DEFAULT_WHICH.get(strategy, Which.large)]
    base = _PAPER_NAMES.get(strategy, str(strategy)).format(end)
    suffix = {StopKind.hypergradient: "+NSC", StopKind.hypergradient_change: "+NSC+change"}
    return base + suffix.get(stop.kind, "")


def load_sequence(path: str | Path) -> RecordedSequence:
    """Read a recording, or raise ``ConfigError`` naming ``sequence.path``."""
    path = Path(path).expanduser()
    try:
        recording = RecordedSequence.load(path)
        config = recording.config()
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise ConfigError(
            f"sequence.path: {str(path)!r} is not a readable recording ({type(exc).__name__}: "
            f"{exc}); write one with task=record"
        ) from exc
    shape = (recording.steps, len(recording.sample_indices))
    if "problem" not in config or recording.xs.ndim != 3 or recording.xs.shape[:2] != shape:
        raise ConfigError(
            f"sequence.path: {str(path)!r} lacks the problem config or has malformed arrays; "
            "write it with task=record"
        )
    return recording


def problem_from_recording(recording: RecordedSequence, sample: int, backend: Any) -> Any:
    """Rebuild recorded sample ``sample`` from the stored config (``build_problems``)."""
    config = recording.config()
    seed = int(config.get("seed", 0))
    return build_problems(ProblemConfig(**config["problem"]), backend, seed).problems[sample]


def problem_config_json(c: Config) -> str:
    """The JSON a recording stores for ``problem_from_recording``: the problem config, the
    seed and the dtype."""
    config = {"version": 1, "problem": asdict(c.problem), "seed": int(c.seed),
              "dtype": c.backend.dtype}
    return json.dumps(config, sort_keys=True)


def refs_path(sequence_path: str | Path) -> Path:
    """``<folder>/<stem>.refs.npz`` next to the recording."""
    p = Path(sequence_path)
    return p.with_name(p.name.removesuffix(".npz") + ".refs.npz")


def reference_hypergradients(
    sequence_path: str | Path, systems: list[LinearSystem], sample: int, rtol: float, backend: Any
) -> tuple[np.ndarray, bool]:
    """−Jᵀw* of every system (tight MINRES at ``rtol``), from the cache when it matches the
    recording's digest and the tolerance; returns (references, taken_from_cache)."""
    cache, key = refs_path(sequence_path), f"sample_{sample}"
    with Path(sequence_path).open("rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    stored: dict[str, Any] = {}
    with contextlib.suppress(checkpoint.CheckpointError):  # missing or unreadable: rewritten
        stored = checkpoint.load(cache)
    if stored.get("digest") != digest or stored.get("rtol") != rtol:
        stored = {"digest": digest, "rtol": rtol}
    elif key in stored and stored[key].shape[0] == len(systems):
        return stored[key], True
    tight = solve_sequence(systems, stop=StopConfig(rtol=rtol))
    stored[key] = np.stack([backend.to_numpy(r.hypergradient) for r in tight.records])
    checkpoint.save(cache, stored)
    return stored[key], False


@dataclass(frozen=True)
class ResolveSummary:
    """What a re-solve produced: per-system counts and totals, the last system's upper
    loss."""

    run_id: str | None
    label: str
    sample: int
    result: SequenceResult
    final_loss: float
    references_cached: bool


def resolve_params(c: Config, recording: RecordedSequence) -> dict[str, str]:
    """Params of a re-solve run: the solver settings and the recorded problem."""
    config = recording.config()
    params = {
        k: v for k, v in flatten(c).items()
        if k.startswith(("recycle.", "stop.", "solver.", "sequence.", "backend."))
    }
    params.update(flatten(config["problem"], prefix="recorded.problem."))
    params.update({
        "task": c.task,
        "seed": str(c.seed),
        "recorded.seed": str(config.get("seed")),
        "recorded.steps": str(recording.steps),
        "recorded.samples": json.dumps(list(recording.sample_indices)),
    })
    return params


def recycle_dim(recycle: RecycleConfig) -> int:
    """The recycle dimension a run uses (0 without recycling)."""
    return recycle.dim if recycle.enabled else 0


def resolve_tags(c: Config) -> dict[str, str]:
    """The tags of a re-solve; the recording run's id when its folder names it."""
    which = c.recycle.which or ("-" if c.recycle.strategy == Strategy.none else "default")
    sequence = Path(c.sequence.path or "").expanduser().resolve()
    recorded_by = sequence.parent / names.RUN_ID_FILE
    return {
        **({names.RECORD_RUN_TAG: recorded_by.read_text().strip()}
           if recorded_by.is_file() else {}),
        names.TASK_TAG: Task.resolve,
        names.STRATEGY_TAG: c.recycle.strategy,
        names.DIM_TAG: str(recycle_dim(c.recycle)),
        names.STOP_TAG: c.stop.kind,
        names.WHICH_TAG: which,
        names.LABEL_TAG: method_label(c.recycle, c.stop),
        names.SEQUENCE_TAG: str(sequence),
    }


def run_resolve(c: Config, recording: RecordedSequence, tracker: Any) -> ResolveSummary:
    """Re-solve the recorded sequence of one sample with ``c``'s solver settings."""
    tracker.log_input(Path(c.sequence.path or "").expanduser().resolve(), "recording", "resolve")
    dtype = recording.config().get("dtype", c.backend.dtype)
    backend = get_backend(c.backend.name, dtype=dtype, device=c.backend.device)
    sample = recording.sample_indices[0] if c.sequence.sample is None else c.sequence.sample
    if sample not in recording.sample_indices:
        raise ConfigError(
            f"sequence.sample: {sample} was not recorded; the recording holds samples "
            f"{list(recording.sample_indices)}"
        )
    problem = problem_from_recording(recording, sample, backend)
    systems = recording.systems(problem, backend, sample=sample)
    refs, cached = reference_hypergradients(
        c.sequence.path, systems, sample, c.sequence.reference_rtol, backend
    )
    say(f"{'reused' if cached else 'computed'} reference hypergradients in "
        f"{refs_path(c.sequence.path)}")
    systems = [replace(s, reference=backend.asarray(r)) for s, r in zip(systems, refs, strict=True)]
    ec = engine_config(c)
    result = solve_sequence(systems, recycle=ec.recycle, stop=ec.stop, maxiter=ec.krylov_maxiter)
    xs = recording.xs[:, recording.sample_indices.index(sample)]
    losses = tuple(float(problem.upper_loss(backend.asarray(x))) for x in xs)
    sums = dict.fromkeys(names.RESOLVE_COUNTS, 0.0)
    for r, loss in zip(result.records, losses, strict=True):
        metrics = {key: float(getattr(r, key)) for key in _SYSTEM_METRICS}
        metrics.update({names.SOLVE_TIME: r.seconds, names.UPPER_LOSS: loss})
        for key in names.RESOLVE_COUNTS:
            sums[key] += float(metrics[key])
            metrics[names.cumulative(key)] = sums[key]
        tracker.log_metrics(metrics, r.index)
    errors = [r.hg_error for r in result.records]
    totals = {
        **{names.total(k): v for k, v in sums.items()},
        "systems": float(len(result.records)),
        names.MEAN_HG_ERROR: float(np.mean(errors)),
        names.MAX_HG_ERROR: float(np.max(errors)),
        "unconverged": float(sum(not r.converged for r in result.records)),
    }
    tracker.log_metrics(totals, len(result.records))
    label = method_label(c.recycle, c.stop)
    say(f"{label} k={recycle_dim(c.recycle)}: {int(sums[names.ITERATIONS])} iterations, "
        f"{int(sums[names.APPLICATIONS])} operator applications, {int(sums[names.PASSES])} "
        f"passes over {len(result.records)} systems; hypergradient error mean "
        f"{totals[names.MEAN_HG_ERROR]:.3g} max {totals[names.MAX_HG_ERROR]:.3g}")
    return ResolveSummary(tracker.run_id, label, sample, result, losses[-1], cached)
