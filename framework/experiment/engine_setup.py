"""The bilevel engine a run uses, built from the typed config (the one mapping from the
Hydra schema's solver/recycle/stop/baseline groups to the engine's settings)."""

from __future__ import annotations

from typing import Any

from framework.bilevel.engine import BilevelEngine, EngineConfig
from framework.experiment.config import Baseline, Config
from problems.factory import ProblemSet


def make_engine(problem_set: ProblemSet, cfg: Config, backend: Any) -> BilevelEngine:
    """The engine (each mini-batch solved as one batch) configured from the
    solver/recycle/stop/baseline groups."""
    return BilevelEngine(list(problem_set.problems), engine_config(cfg), backend=backend,
                         check_every=cfg.solver.check_every)


def engine_config(cfg: Config) -> EngineConfig:
    """``EngineConfig`` (hypergradient settings) from the typed config: the groups
    ``recycle`` and ``stop`` are the library's ``RecycleConfig`` and ``StopConfig``."""
    return EngineConfig(
        recycle=cfg.recycle,
        stop=cfg.stop,
        krylov_maxiter=cfg.solver.maxiter,
        lower_gtol=cfg.solver.lower.gtol,
        lower_maxiter=cfg.solver.lower.maxiter,
        lower_memory=cfg.solver.lower.memory,
        lower_solver=cfg.solver.lower.name,
        lower_preconditioner=cfg.solver.lower.preconditioner,
        preconditioner=cfg.solver.preconditioner,
        shadow_baseline=cfg.baseline.mode == Baseline.shadow,
    )
