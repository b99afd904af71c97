"""The bilevel engine a run uses, built from the typed config (the one mapping from the
Hydra schema's solver/recycle/stop/baseline groups to the engine's settings)."""

from __future__ import annotations

from typing import Any

from framework.bilevel.engine import BilevelEngine, EngineConfig
from framework.experiment.config import Config
from framework.krylov.recycle import RecycleConfig
from framework.krylov.stopping import StopConfig
from problems.factory import ProblemSet


def make_engine(problem_set: ProblemSet, cfg: Config, backend: Any) -> BilevelEngine:
    """The engine (each mini-batch solved as one batch) configured from the
    solver/recycle/stop/baseline groups."""
    return BilevelEngine(list(problem_set.problems), engine_config(cfg), backend=backend,
                         check_every=cfg.solver.check_every)


def engine_config(cfg: Config) -> EngineConfig:
    """``EngineConfig`` (hypergradient settings) from the typed config."""
    strategy = cfg.recycle.strategy
    return EngineConfig(
        recycle=RecycleConfig(
            strategy=strategy,
            k=0 if strategy == "none" else cfg.recycle.dim,
            which=cfg.recycle.which,
            max_vectors=cfg.solver.max_vectors,
        ),
        stop=StopConfig(
            kind=cfg.stop.rule,
            rtol=cfg.solver.rtol,
            atol=cfg.solver.atol,
            hg_rtol=cfg.stop.tol,
            safety=cfg.stop.safety,
        ),
        krylov_maxiter=cfg.solver.maxiter,
        lower_gtol=cfg.solver.lower.gtol,
        lower_maxiter=cfg.solver.lower.maxiter,
        lower_memory=cfg.solver.lower.memory,
        shadow_baseline=cfg.baseline.mode == "shadow",
    )
