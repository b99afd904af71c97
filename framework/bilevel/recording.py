"""Recording the Hessian systems of a training run, to re-solve them per strategy.

During one training run the lower-level solutions x_t and parameters θ_t are recorded;
afterwards H(x_t, θ_t) w = ∇ℓ(x_t) can be solved again by any solver configuration —
on identical systems, as the paper compares strategies.  ``RecordedSequence.save``
writes one ``.npz`` (θ_t, x_t, the samples' data x_true / y, and the problem config as
JSON) so others can compare solvers on the same systems.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
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
        arrays = {f.name: np.asarray(getattr(self, f.name)) for f in fields(self)}
        np.savez_compressed(path, **arrays)
        return path if path.suffix == ".npz" else path.with_suffix(".npz")

    @classmethod
    def load(cls, path: str | Path) -> RecordedSequence:
        with np.load(Path(path)) as data:
            return cls(
                **{name: data[name] for name in ("thetas", "xs", "x_true", "y")},
                sample_indices=tuple(int(i) for i in data["sample_indices"]),
                problem_config=str(data["problem_config"]),
            )

    def config(self) -> dict[str, Any]:
        return json.loads(self.problem_config)

    def systems(
        self, problem: Any, backend: Any, *, sample: int = 0, references: bool = False,
        reference_rtol: float = 1e-10,
    ) -> list[LinearSystem]:
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
            theta = backend.asarray(self.thetas[t])
            x = backend.asarray(self.xs[t, which])
            out.append(LinearSystem(H=partial(problem.hvp, x, theta), g=problem.upper_grad(x),
                                    jac_t=partial(problem.jac_t, x, theta)))
        if references:
            tight = solve_sequence(out, stop=StopConfig(rtol=reference_rtol))
            out = [replace(s, reference=r.hypergradient)
                   for s, r in zip(out, tight.records, strict=True)]
        return out


def record_training(
    engine: BilevelEngine,
    optimizer: Any,
    theta0: Any,
    steps: int,
    *,
    indices: Sequence[int] | None = None,
    problem_config: dict[str, Any] | None = None,
) -> tuple[RecordedSequence, list[float]]:
    """Run ``steps`` outer steps on samples ``indices`` (all by default), recording θ_t
    and every sample's x_t; returns the recording and the upper losses."""
    if engine.backend is None:
        raise ValueError("record_training needs an engine with a backend")
    to_np = engine.backend.to_numpy
    idx = tuple(range(len(engine))) if indices is None else tuple(indices)
    thetas, xs, losses = [], [], []
    theta = theta0
    for _ in range(steps):
        result = engine.evaluate(theta, idx)
        thetas.append(to_np(theta))
        xs.append(np.stack([to_np(engine.states[i].x) for i in idx]))
        losses.append(result.loss)
        theta = optimizer.step(theta, result.grad).theta
    problems = [engine.problems[i] for i in idx]
    return RecordedSequence(
        thetas=np.stack(thetas),
        xs=np.stack(xs),
        x_true=np.stack([to_np(p.x_true) for p in problems]),
        y=np.stack([to_np(p.y) for p in problems]),
        sample_indices=idx,
        problem_config=json.dumps(problem_config or {}),
    ), losses
