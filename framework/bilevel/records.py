"""What one evaluation of the bilevel engine reports: per-sample records (counts measured
per row), the batch's passes and phase times, and the step's metrics."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from backends.counting import Counts
from framework.krylov.recycle import RecycleCarry


@dataclass(frozen=True)
class SampleState:
    """Warm starts (x*, w), the recycle carry, and the shadow baseline's own warm start."""

    x: Any = None
    w: Any = None
    carry: RecycleCarry | None = None
    w_shadow: Any = None


@dataclass(frozen=True)
class ShadowRecord:
    """The same Hessian system solved without recycling (warm-started from its own previous
    solution), what recycling is compared against; ``hvp``: its operator applications."""

    iterations: int
    hvp: int


@dataclass(frozen=True)
class SampleRecord:
    """Figures of one sample's hypergradient, measured for its row of the batch.

    ``hvp``/``jac_t``: applications to this sample's operators in the Hessian phase (the
    solver's per-sample count, plus the recycle set-up, selection, NSC set-up and −Jᵀw
    counted per row); ``preconditioner``: its applications of M (rows of M's blocks, the
    solver's and the recycle set-up's).  ``lower_*``: the lower-level solve, a Newton polish
    included.  The shadow baseline is not included."""

    upper_loss: float
    lower_iterations: int
    lower_converged: bool
    lower_grad_evals: int
    lower_hvp: int
    lower_preconditioner: int
    krylov_iterations: int
    krylov_converged: bool
    krylov_status: str
    recycle_dim: int
    hvp: int
    jac_t: int
    preconditioner: int
    hg_error_estimate: float
    shadow: ShadowRecord | None = None


@dataclass(frozen=True)
class PhaseTimes:
    """Wall-clock seconds of each phase of one batch evaluation (the whole batch): lower
    solve, recycle/stopping set-up, Krylov solve, −Jᵀw, shadow."""

    lower: float
    recycle: float
    krylov: float
    jac: float
    shadow: float = 0.0


@dataclass(frozen=True)
class StepResult:
    """Mean upper loss and hypergradient (θ-shaped, on the device) over the samples.

    ``counts``: the batch's Hessian phase as counted by the problem's counter (passes:
    batched operator calls; applications: every row of every call, frozen and padding
    included); ``lower_counts`` the same for the lower solve; ``host_syncs`` the transfers
    of per-sample scalars to the host; ``sample_grads`` the samples' hypergradients (B, p),
    whose ``mean_gradient`` is ``grad``; ``extra`` further step metrics (a Dask step's)."""

    loss: float
    grad: Any
    indices: tuple[int, ...]
    samples: tuple[SampleRecord, ...] = field(repr=False)
    counts: Counts
    lower_counts: Counts
    times: PhaseTimes
    host_syncs: int
    sample_grads: Any = field(default=None, repr=False)
    extra: Mapping[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Per-step figures for logging (sums over the samples unless named mean_ or
        fraction; passes, batch applications and times are the batch's)."""
        recs = self.samples
        total = lambda name: float(sum(getattr(r, name) for r in recs))  # noqa: E731
        summed = ("lower_iterations", "lower_grad_evals", "lower_hvp", "lower_preconditioner",
                  "krylov_iterations", "hvp", "jac_t", "preconditioner")
        xp = array_namespace(self.grad)
        out = {
            "upper_loss": self.loss,
            "hypergradient_norm": math.sqrt(float(xp.sum(self.grad * self.grad))),
            **{name: total(name) for name in summed},
            "hvp_passes": float(self.counts.hvp_passes),
            "jac_t_passes": float(self.counts.jac_t_passes),
            "operator_applications": total("hvp") + total("jac_t"),
            "operator_passes": float(self.counts.passes),
            "batch_applications": float(self.counts.applications),
            "batch_host_syncs": float(self.host_syncs),
            "recycle_dim": total("recycle_dim") / len(recs),
            "krylov_converged_fraction": total("krylov_converged") / len(recs),
            "lower_converged_fraction": total("lower_converged") / len(recs),
            **{f"time_{phase}": t for phase, t in asdict(self.times).items() if phase != "shadow"},
        }
        estimates = [r.hg_error_estimate for r in recs if math.isfinite(r.hg_error_estimate)]
        if estimates:
            out["hg_error_estimate"] = float(np.mean(estimates))
        shadows = [r.shadow for r in recs if r.shadow is not None]
        if len(shadows) == len(recs):
            out["baseline_krylov_iterations"] = it = float(sum(s.iterations for s in shadows))
            out["baseline_hvp"] = hvp = float(sum(s.hvp for s in shadows))
            out["time_shadow"] = self.times.shadow
            out["savings_iterations"] = 1.0 - out["krylov_iterations"] / it if it else 0.0
            # recycling's applications: HVPs of the Hessian solve (incl. C = HU) plus the
            # Jᵀ products spent on selection/NSC beyond the one −Jᵀw both need
            mine = out["hvp"] + out["jac_t"] - len(recs)
            out["savings_applications"] = 1.0 - mine / hvp if hvp else 0.0
        return {**out, **self.extra}


def mean_gradient(sample_grads: Any, shape: tuple[int, ...]) -> Any:
    """The mean of the rows of ``sample_grads`` (B, p) shaped as θ: one reduction over the
    rows in their order, so the same rows give the same bits wherever they were solved."""
    xp = array_namespace(sample_grads)
    return xp.reshape(xp.sum(sample_grads, axis=0) / sample_grads.shape[0], shape)
