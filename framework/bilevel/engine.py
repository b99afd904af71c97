"""The outer loop's workhorse: hypergradients of a set of samples at θ.

``BilevelEngine.evaluate(θ, indices)`` solves the given samples at θ and returns the mean
upper loss, the mean hypergradient and one record per sample.  Each sample's warm starts
and recycle carry live in the engine (one ``SampleState`` per sample), so the call is the
unit a later scheduler can ship to a worker.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backends.counting import Counts
from framework.bilevel.hypergradient import (
    HypergradientSettings,
    SampleRecord,
    SampleState,
    hypergradient,
)
from framework.krylov.recycle import RecycleCarry, Recycler

EngineConfig = HypergradientSettings


@dataclass(frozen=True)
class StepResult:
    """Mean upper loss and hypergradient (θ-shaped, on the device) over the samples;
    ``batch_counts`` is what a batched solve spent in total and ``host_syncs`` its
    host transfers in the L-BFGS and Krylov loops (None when unbatched)."""

    loss: float
    grad: Any
    indices: tuple[int, ...]
    samples: tuple[SampleRecord, ...] = field(repr=False)
    batch_counts: Counts | None = None
    host_syncs: int | None = None

    def metrics(self) -> dict[str, float]:
        """Per-step figures for logging (sums over the samples unless named mean_)."""
        recs = self.samples
        total = lambda f: float(sum(f(r) for r in recs))  # noqa: E731
        out = {
            "upper_loss": self.loss,
            "hypergradient_norm": float(_host_norm(self.grad)),
            "lower_iterations": total(lambda r: r.lower_iterations),
            "lower_grad_evals": total(lambda r: r.lower_counts.grad_evals),
            "lower_hvp": total(lambda r: r.lower_counts.hvp),
            "krylov_iterations": total(lambda r: r.krylov_iterations),
            "hvp": total(lambda r: r.counts.hvp),
            "hvp_passes": total(lambda r: r.counts.hvp_passes),
            "jac_t": total(lambda r: r.counts.jac_t),
            "jac_t_passes": total(lambda r: r.counts.jac_t_passes),
            "operator_applications": total(lambda r: r.counts.applications),
            "operator_passes": total(lambda r: r.counts.passes),
            "recycle_dim": total(lambda r: r.recycle_dim) / len(recs),
            "krylov_converged_fraction": total(lambda r: r.krylov_converged) / len(recs),
            "lower_converged_fraction": total(lambda r: r.lower_converged) / len(recs),
            "time_lower": total(lambda r: r.time_lower),
            "time_recycle": total(lambda r: r.time_recycle),
            "time_krylov": total(lambda r: r.time_krylov),
            "time_jac": total(lambda r: r.time_jac),
        }
        if self.batch_counts is not None:
            # what a batched solve really spent (frozen samples' rows included)
            out["batch_passes"] = float(self.batch_counts.passes)
            out["batch_applications"] = float(self.batch_counts.applications)
        if self.host_syncs is not None:
            # transfers of per-sample scalars to the host (each a GPU synchronisation)
            out["batch_host_syncs"] = float(self.host_syncs)
        estimates = [r.hg_error_estimate for r in recs if math.isfinite(r.hg_error_estimate)]
        if estimates:
            out["hg_error_estimate"] = float(np.mean(estimates))
        shadows = [r.shadow for r in recs if r.shadow is not None]
        if len(shadows) == len(recs):
            it = float(sum(s.iterations for s in shadows))
            hvp = float(sum(s.hvp for s in shadows))
            out["baseline_krylov_iterations"] = it
            out["baseline_hvp"] = hvp
            out["savings_iterations"] = 1.0 - out["krylov_iterations"] / it if it else 0.0
            # recycling's applications: HVPs of the Hessian solve (incl. C = HU) plus the
            # Jᵀ products spent on selection/NSC beyond the one −Jᵀw both need
            extra_jt = out["jac_t"] - len(recs)
            mine = total(lambda r: r.counts.hvp) + extra_jt
            out["savings_applications"] = 1.0 - mine / hvp if hvp else 0.0
        return out


def _host_norm(a: Any) -> float:
    from array_api_compat import array_namespace

    xp = array_namespace(a)
    return math.sqrt(float(xp.sum(a * a)))


class BilevelEngine:
    """Hypergradients over a dataset of ``problems`` with per-sample state.

    ``backend`` (from ``backends.get_backend``) is used only to move state to and from
    the host for checkpoints.
    """

    def __init__(
        self,
        problems: Sequence[Any],
        config: EngineConfig | None = None,
        *,
        backend: Any = None,
    ) -> None:
        if not problems:
            raise ValueError("problems must hold at least one sample")
        shapes = {tuple(p.theta_shape) for p in problems}
        if len(shapes) != 1:
            raise ValueError(f"all samples must share one theta shape, got {sorted(shapes)}")
        self.problems = list(problems)
        self.config = config if config is not None else EngineConfig()
        self.backend = backend
        self.theta_shape = shapes.pop()
        self.recycler = Recycler(self.config.recycle)
        self.states = [SampleState() for _ in self.problems]

    def __len__(self) -> int:
        return len(self.problems)

    def evaluate(self, theta: Any, indices: Sequence[int] | None = None) -> StepResult:
        """Solve samples ``indices`` (all when None) at θ; update their states."""
        from array_api_compat import array_namespace

        indices = tuple(range(len(self.problems))) if indices is None else tuple(indices)
        if not indices:
            raise ValueError("indices must name at least one sample")
        xp = array_namespace(theta)
        grad_sum = None
        loss_sum = 0.0
        records = []
        for i in indices:
            grad, self.states[i], record = hypergradient(
                self.problems[i], theta, self.states[i], self.config, self.recycler
            )
            grad_sum = grad if grad_sum is None else grad_sum + grad
            loss_sum += record.upper_loss
            records.append(record)
        grad = xp.reshape(grad_sum / len(indices), self.theta_shape)
        return StepResult(loss_sum / len(indices), grad, indices, tuple(records))

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Per-sample warm starts and recycle carries as host NumPy arrays."""
        if self.backend is None:
            raise ValueError("state_dict needs the engine's backend (pass backend=...)")
        to_np = self.backend.to_numpy
        samples = []
        for s in self.states:
            entry: dict[str, Any] = {}
            for name in ("x", "w", "w_shadow"):
                value = getattr(s, name)
                if value is not None:
                    entry[name] = to_np(value)
            if s.carry is not None:
                entry["carry_basis"] = to_np(s.carry.basis)
                entry["carry_selected"] = bool(s.carry.selected)
            samples.append(entry)
        return {"samples": samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.backend is None:
            raise ValueError("load_state_dict needs the engine's backend (pass backend=...)")
        samples = state["samples"]
        if len(samples) != len(self.problems):
            raise ValueError(
                f"checkpoint holds {len(samples)} samples, the engine has {len(self.problems)}"
            )
        put = self.backend.asarray
        states = []
        for entry in samples:
            carry = None
            if "carry_basis" in entry:
                carry = RecycleCarry(put(entry["carry_basis"]), bool(entry["carry_selected"]))
            states.append(
                SampleState(
                    x=put(entry["x"]) if "x" in entry else None,
                    w=put(entry["w"]) if "w" in entry else None,
                    carry=carry,
                    w_shadow=put(entry["w_shadow"]) if "w_shadow" in entry else None,
                )
            )
        self.states = states
