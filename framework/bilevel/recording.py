"""Recording the Hessian systems of a training run (θ_t and x_t = x(θ_t) of chosen
samples, ``SequenceRecorder``), so that every solver configuration re-solves the identical
systems H(x_t, θ_t) w = ∇ℓ(x_t); ``RecordedSequence.save`` writes one ``.npz``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from framework.bilevel.engine import BilevelEngine
from framework.krylov.sequence import LinearSystem, solve_sequence
from framework.krylov.stopping import StopConfig


@dataclass(frozen=True)
class RecordedSequence:
    """θ_t (T, *theta_shape) and x_t (T, S, n) for S samples over T outer steps."""

    thetas: np.ndarray
    xs: np.ndarray
    x_true: np.ndarray
    y: np.ndarray
    sample_indices: tuple[int, ...]
    problem_config: str = "{}"

    @property
    def steps(self) -> int:
        return int(self.thetas.shape[0])

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        np.savez_compressed(path, **vars(self))
        return path if path.suffix == ".npz" else path.with_suffix(".npz")

    @classmethod
    def load(cls, path: str | Path) -> RecordedSequence:
        with np.load(Path(path)) as data:
            return cls(**{name: data[name] for name in ("thetas", "xs", "x_true", "y")},
                       sample_indices=tuple(int(i) for i in data["sample_indices"]),
                       problem_config=str(data["problem_config"]))

    def config(self) -> dict[str, Any]:
        return json.loads(self.problem_config)

    def systems(self, problem: Any, backend: Any, *, sample: int = 0, references: bool = False,
                reference_rtol: float = 1e-10) -> list[LinearSystem]:
        """The systems of one recorded sample, bound to ``problem`` (rebuilt from the
        config; its data must match the recording).  With ``references``, each system
        carries −Jᵀw* from a tight MINRES solve (``reference_rtol``)."""
        which = self.sample_indices.index(sample) if sample in self.sample_indices else sample
        for name, mine in (("x_true", self.x_true[which]), ("y", self.y[which])):
            theirs = backend.to_numpy(getattr(problem, name))
            if theirs.shape != mine.shape or not np.allclose(theirs, mine, atol=1e-12):
                raise ValueError(f"problem data does not match the recording ({name} differs)")
        out = []
        for t in range(self.steps):
            theta, x = backend.asarray(self.thetas[t]), backend.asarray(self.xs[t, which])
            out.append(LinearSystem(H=partial(problem.hvp, x, theta), g=problem.upper_grad(x),
                                    jac_t=partial(problem.jac_t, x, theta)))
        if references:
            tight = solve_sequence(out, stop=StopConfig(rtol=reference_rtol))
            out = [replace(s, reference=r.hypergradient)
                   for s, r in zip(out, tight.records, strict=True)]
        return out


class SequenceRecorder:
    """Collects θ_t and x_t = x(θ_t) of ``samples`` step by step (host NumPy copies)."""

    def __init__(self, samples: Sequence[int], backend: Any) -> None:
        self.samples, self.backend = tuple(int(i) for i in samples), backend
        self.thetas: list[np.ndarray] = []
        self.xs: list[np.ndarray] = []

    def capture(self, engine: BilevelEngine, theta: Any, indices: Sequence[int]) -> None:
        """Record θ and x(θ) of every recorded sample, right after ``engine.evaluate(theta,
        indices)``: the engine's x for a sample of the batch; the others solved together
        (states unchanged), warm-started from their last recorded x (first: state or data)."""
        to_np, batch = self.backend.to_numpy, set(int(i) for i in indices)
        row = [to_np(engine.states[i].x) if i in batch and engine.states[i].x is not None
               else None for i in self.samples]
        missing = [pos for pos, x in enumerate(row) if x is None]
        if missing:
            x0 = self.backend.asarray(self.xs[-1][missing]) if self.xs else None
            X = engine.lower_solutions(theta, [self.samples[pos] for pos in missing], x0=x0)
            for r, pos in enumerate(missing):
                row[pos] = to_np(X[r, ...])
        self.thetas.append(np.array(to_np(theta), copy=True))
        self.xs.append(np.stack(row))

    def state_dict(self) -> dict[str, Any]:
        return {"samples": list(self.samples), "thetas": list(self.thetas), "xs": list(self.xs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["samples"]) != self.samples:
            raise ValueError("the checkpoint recorded other samples (sequence.samples)")
        self.thetas = [np.asarray(t) for t in state["thetas"]]
        self.xs = [np.asarray(x) for x in state["xs"]]

    def recording(self, problems: Sequence[Any], problem_config: str) -> RecordedSequence:
        """The ``RecordedSequence`` of everything captured so far (``problems``: all the
        samples, indexed as ``samples``; ``problem_config``: the JSON to store)."""
        if not self.thetas:
            raise ValueError("nothing recorded: the run made no outer step")
        chosen = [problems[i] for i in self.samples]
        return RecordedSequence(
            thetas=np.stack(self.thetas), xs=np.stack(self.xs),
            x_true=np.stack([self.backend.to_numpy(p.x_true) for p in chosen]),
            y=np.stack([self.backend.to_numpy(p.y) for p in chosen]),
            sample_indices=self.samples, problem_config=problem_config)


def record_training(engine: BilevelEngine, optimizer: Any, theta0: Any, steps: int, *,
                    problem_config: dict[str, Any] | None = None
                    ) -> tuple[RecordedSequence, list[float]]:
    """Run ``steps`` outer steps on all the samples, recording θ_t and their x_t; returns
    the recording and the upper losses."""
    if engine.backend is None:
        raise ValueError("record_training needs an engine with a backend")
    everyone = range(len(engine.problems))
    recorder, losses, theta = SequenceRecorder(everyone, engine.backend), [], theta0
    for _ in range(steps):
        result = engine.evaluate(theta)
        recorder.capture(engine, theta, everyone)
        losses.append(result.loss)
        theta = optimizer.step(theta, result.grad).theta
    return recorder.recording(engine.problems, json.dumps(problem_config or {})), losses
