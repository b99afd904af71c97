"""The bilevel engine a run uses, built from the typed config (the one mapping from the
Hydra schema's solver/recycle/stop/baseline groups to the engine's settings)."""

from __future__ import annotations

from typing import Any

from framework.bilevel.batched_engine import batching_unsupported, create_engine
from framework.bilevel.engine import EngineConfig
from framework.experiment.config import Baseline, Config
from framework.experiment.console import say
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
    """``EngineConfig`` (hypergradient settings) from the typed config: the groups
    ``recycle`` and ``stop`` are the library's ``RecycleConfig`` and ``StopConfig``."""
    return EngineConfig(
        recycle=cfg.recycle,
        stop=cfg.stop,
        krylov_maxiter=cfg.solver.maxiter,
        lower_gtol=cfg.solver.lower.gtol,
        lower_maxiter=cfg.solver.lower.maxiter,
        lower_memory=cfg.solver.lower.memory,
        shadow_baseline=cfg.baseline.mode == Baseline.shadow,
    )
