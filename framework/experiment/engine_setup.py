"""The bilevel engine a run uses, built from the typed config (the one mapping from the
Hydra schema's solver/recycle/stop/baseline groups to the engine's settings)."""

from __future__ import annotations

from typing import Any

from framework.bilevel.batched_engine import batching_unsupported, create_engine
from framework.bilevel.engine import EngineConfig
from framework.experiment.config import Config
from framework.experiment.console import say
from framework.krylov.recycle import RecycleConfig
from framework.krylov.stopping import StopConfig
from problems.factory import ProblemSet


def make_engine(problem_set: ProblemSet, cfg: Config, backend: Any) -> Any:
    """The engine configured from the solver/recycle/stop/baseline groups: the batched
    engine (all samples of a step in one block solve) when ``solver.batched`` and the
    configuration allows it, else the per-sample ``BilevelEngine``."""
    problems = list(problem_set.problems)
    config = engine_config(cfg)
    if cfg.solver.batched:
        reason = batching_unsupported(problems, config)
        say("engine: batched" if not reason else f"engine: per-sample ({reason})")
    else:
        say("engine: per-sample (solver.batched=false)")
    return create_engine(problems, config, backend=backend, batched=cfg.solver.batched,
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
