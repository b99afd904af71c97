"""The backend, samples and bilevel engine of a run, from the typed config (the one mapping
of the solver/recycle/stop/baseline groups to the engine's settings)."""

from __future__ import annotations

from typing import Any

from backends import get_backend, tune_cpu_allocator
from framework.bilevel.engine import BilevelEngine, EngineConfig
from framework.experiment.config import BackendName, Baseline, Config
from problems.factory import ProblemSet, build_problems


def build_samples(cfg: Config) -> tuple[Any, ProblemSet]:
    """The run's backend (NumPy's with the CPU allocator tuned) and its samples."""
    backend = get_backend(cfg.backend.name, dtype=cfg.backend.dtype, device=cfg.backend.device)
    if backend.name == BackendName.numpy:
        tune_cpu_allocator()  # batched temporaries: avoid an mmap + page faults per array
    return backend, build_problems(cfg.problem, backend, cfg.seed)


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
        compact_rows=cfg.solver.compact_rows,
        shadow_baseline=cfg.baseline.mode == Baseline.shadow,
    )
