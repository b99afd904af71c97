"""``task=record``: capture θ_t and the recorded samples' x_t = x(θ_t) inside the run loop.

At every outer step a recorded sample in the mini-batch contributes the engine's own
lower-level solution; the others are solved together by the engine's lower solver
(warm-started from their previous recorded x, the engine's states unchanged), so every
recorded step holds x(θ_t) of every recorded sample.  The result is a ``RecordedSequence`` whose
``problem_config`` JSON (``{"problem": ..., "seed": ..., "dtype": ...}``) is enough for
``problems.factory.build_problems`` to rebuild the samples (``problem_from_recording``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from framework.bilevel.recording import RecordedSequence

CONFIG_VERSION = 1


def problem_config_json(c: Any) -> str:
    """The JSON stored in a recording: the problem config, the seed and the dtype."""
    config = {"version": CONFIG_VERSION, "problem": asdict(c.problem), "seed": int(c.seed),
              "dtype": c.backend.dtype}
    return json.dumps(config, sort_keys=True)


class SequenceRecorder:
    """Collects θ_t and x_t of ``samples`` step by step (host NumPy copies)."""

    def __init__(self, samples: Sequence[int]) -> None:
        self.samples = tuple(int(i) for i in samples)
        self.thetas: list[np.ndarray] = []
        self.xs: list[np.ndarray] = []

    def capture(self, engine: Any, theta: Any, indices: Sequence[int], backend: Any) -> None:
        """Record θ (the point the step was evaluated at) and x(θ) of every recorded
        sample; call right after ``engine.evaluate(theta, indices)``.  Samples outside
        the batch are solved together by the engine's lower solver, warm-started from
        their last recorded x (at the first step: from their state or the data)."""
        batch = set(int(i) for i in indices)
        row = [backend.to_numpy(engine.states[i].x)
               if i in batch and engine.states[i].x is not None else None
               for i in self.samples]
        missing = [pos for pos, x in enumerate(row) if x is None]
        if missing:
            x0 = backend.asarray(self.xs[-1][missing]) if self.xs else None
            X = engine.lower_solutions(theta, [self.samples[pos] for pos in missing], x0=x0)
            for r, pos in enumerate(missing):
                row[pos] = backend.to_numpy(X[r, ...])
        self.thetas.append(np.array(backend.to_numpy(theta), copy=True))
        self.xs.append(np.stack(row))

    def state_dict(self) -> dict[str, Any]:
        return {"samples": list(self.samples), "thetas": list(self.thetas), "xs": list(self.xs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["samples"]) != self.samples:
            raise ValueError("the checkpoint recorded other samples (sequence.samples)")
        self.thetas = [np.asarray(t) for t in state["thetas"]]
        self.xs = [np.asarray(x) for x in state["xs"]]

    def recording(
        self, problems: Sequence[Any], backend: Any, config_json: str
    ) -> RecordedSequence:
        """The ``RecordedSequence`` of everything captured so far."""
        if not self.thetas:
            raise ValueError("nothing recorded: the run made no outer step")
        chosen = [problems[i] for i in self.samples]
        return RecordedSequence(
            thetas=np.stack(self.thetas),
            xs=np.stack(self.xs),
            x_true=np.stack([backend.to_numpy(p.x_true) for p in chosen]),
            y=np.stack([backend.to_numpy(p.y) for p in chosen]),
            sample_indices=self.samples,
            problem_config=config_json,
        )
